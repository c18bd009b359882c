"""The Hugging Face side of every comparison: fp32 logits and greedy generations.

Three models can be the reference, loaded one at a time (fp32, CPU):

- the merged model (what the GGUF files were converted from);
- the training-time model: the base as training saw it (dequantized for QLoRA) with the
  adapter applied by peft, unmerged: the merge is measured against it;
- the original base with the adapter applied by peft, for the GGUF LoRA.

torch, transformers and peft are imported only here.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from macft.errors import MacftError

from .dequant import BaseQuantization


@contextlib.contextmanager
def flush_denormals(torch: Any) -> Iterator[None]:
    """Flush denormal floats to zero while computing, then restore torch's default (off).

    Random-init test models produce many denormals, which are 10-100x slower on x86 CPUs.
    """
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


class HFModel:
    def __init__(self, model_dir: Path, adapter_dir: Path | None = None,
                 quant: BaseQuantization | None = None, threads: int = 0):
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        try:
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        except Exception as e:  # noqa: BLE001 - transformers raises many types
            raise MacftError(f"transformers could not load {model_dir}: {str(e).splitlines()[0]}",
                             "Check that the model directory is complete.") from None
        if quant is not None:
            self._roundtrip_base(model, quant)
        self.applied = None
        if adapter_dir is not None:
            model = self._apply_adapter(model, adapter_dir)
        self.model = model.eval()

    def _roundtrip_base(self, model: Any, quant: BaseQuantization) -> None:
        torch = self.torch
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".weight") and quant.applies_to(name[:-7], tuple(p.shape)):
                    p.copy_(torch.from_numpy(quant.roundtrip(p.detach().float().numpy())))

    def round_weights(self, outtype: str) -> None:
        """Round every weight the converter stores at 16 bits (all but 1-D tensors) to
        ``outtype`` ("bf16" or "f16"), still computing in fp32: the GGUF's weights, without
        llama.cpp's arithmetic. A no-op for weights already stored at that precision."""
        torch = self.torch
        dtype = {"bf16": torch.bfloat16, "f16": torch.float16}[outtype]
        with torch.no_grad():
            for p in self.model.parameters():
                if p.dim() >= 2:
                    p.copy_(p.to(dtype).to(torch.float32))

    def _apply_adapter(self, model: Any, adapter_dir: Path) -> Any:
        from peft import PeftModel

        pm = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
        self.applied = sum(1 for n, _ in pm.named_modules() if n.endswith(".lora_A"))
        return pm

    def add_adapter(self, adapter_dir: Path, round_to: str | None = None) -> None:
        """Apply a PEFT adapter (unmerged), its weights optionally rounded like a GGUF LoRA's."""
        self.model = self._apply_adapter(self.model, adapter_dir).eval()
        if round_to:
            torch = self.torch
            dtype = {"bf16": torch.bfloat16, "f16": torch.float16}[round_to]
            with torch.no_grad():
                for n, p in self.model.named_parameters():
                    if "lora_" in n:
                        p.copy_(p.to(dtype).to(torch.float32))

    def logits(self, ids: list[int], keep_last: int | None = None) -> np.ndarray:
        """fp32 logits [len, vocab] (or of the last ``keep_last`` positions)."""
        torch = self.torch
        with torch.no_grad(), flush_denormals(torch):
            x = torch.tensor([ids], dtype=torch.long)
            kw = {"logits_to_keep": keep_last} if keep_last else {}
            out = self.model(input_ids=x, use_cache=False, **kw).logits[0]
        return out.float().numpy()

    def greedy(self, ids: list[int], max_new: int, stop_ids: list[int]) -> list[int]:
        """Greedy continuation (argmax every step), stopping after a stop token."""
        torch = self.torch
        out: list[int] = []
        past = None
        x = torch.tensor([ids], dtype=torch.long)
        with torch.no_grad(), flush_denormals(torch):
            for _ in range(max_new):
                res = self.model(input_ids=x, past_key_values=past, use_cache=True)
                past = res.past_key_values
                nxt = int(torch.argmax(res.logits[0, -1]).item())
                out.append(nxt)
                if nxt in stop_ids:
                    break
                x = torch.tensor([[nxt]], dtype=torch.long)
        return out

    def close(self) -> None:
        del self.model
        gc.collect()


def compare_logits(a: list[np.ndarray], b: list[np.ndarray]) -> dict[str, float]:
    """Max / mean absolute logit difference and top-1 agreement over all prompt positions."""
    if not a:
        return {}
    diffs = [np.abs(x - y) for x, y in zip(a, b, strict=True)]
    top = [np.mean(np.argmax(x, -1) == np.argmax(y, -1)) for x, y in zip(a, b, strict=True)]
    n = [len(x) for x in a]
    return {
        "max_abs_logit_diff": float(max(d.max() for d in diffs)),
        "mean_abs_logit_diff": float(sum(d.mean() * k for d, k in zip(diffs, n, strict=True)) / sum(n)),
        "top1_agreement": float(sum(t * k for t, k in zip(top, n, strict=True)) / sum(n)),
        "positions": int(sum(n)),
    }
