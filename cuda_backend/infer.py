"""The PyTorch :class:`~macft.inference.ChatModel` and scorer: transformers + peft."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from macft.inference import Generation, IncrementalText, Sampling, stop_ids

from .engine import batch_inputs, batch_loss


class TorchChatModel:
    kind = "cuda"

    def __init__(self, model_path: Path, adapter_dir: Path | None, end_tokens: list[str]):
        import torch
        from transformers import AutoModelForCausalLM

        from macft.data.tokenizer import load_tokenizer

        from .hardware import probe

        facts = probe()
        self.device = torch.device("cuda" if facts.cuda_available else "cpu")
        if not facts.cuda_available:
            torch.set_flush_denormal(True)  # see cuda_backend/backend.py
        dtype = torch.bfloat16 if facts.cuda_available and facts.bf16_supported else torch.float32
        base = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=dtype).to(self.device)
        if adapter_dir:
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(base, str(adapter_dir))
        else:
            self.model = base
        self.model.eval()
        self.has_adapter = adapter_dir is not None
        self.tokenizer = load_tokenizer(str(model_path))
        self.stop = stop_ids(self.tokenizer, end_tokens)
        self.description = f"{model_path} + {adapter_dir} (PyTorch)" if adapter_dir else f"{model_path} (PyTorch)"
        self.last: Generation | None = None
        self._enabled = True

    @contextmanager
    def adapters(self, enabled: bool) -> Iterator[None]:
        if enabled or not self.has_adapter:
            yield
            return
        with self.model.disable_adapter():
            yield

    def prompt(self, messages: list[dict[str, str]]) -> list[int]:
        from macft.data.render import Renderer

        return Renderer(self.tokenizer).prompt_ids(messages)

    def stream(self, prompt_ids: list[int], sampling: Sampling) -> Iterator[str]:
        import torch

        gen = torch.Generator(device="cpu").manual_seed(sampling.seed)
        text = IncrementalText(self.tokenizer)
        stopped = False
        ids = torch.tensor([prompt_ids], device=self.device)
        past = None
        with torch.no_grad():
            for _ in range(sampling.max_new_tokens):
                out = self.model(input_ids=ids, past_key_values=past, use_cache=True)
                past = out.past_key_values
                t = _sample(out.logits[0, -1].float().cpu(), sampling, gen)
                if t in self.stop:
                    stopped = True
                    break
                piece = text.add(t)
                if piece:
                    yield piece
                ids = torch.tensor([[t]], device=self.device)
        self.last = Generation(self.tokenizer.decode(text.ids, skip_special_tokens=True), text.ids, stopped,
                               len(prompt_ids))

    # -- scoring ----------------------------------------------------------------------

    def loss(self, batch: Any) -> tuple[float, int]:
        import torch

        with torch.no_grad():
            s, n = batch_loss(self.model, batch, self.device)
        return float(s), int(n)

    def base_loss(self, batch: Any) -> tuple[float, int]:
        with self.adapters(False):
            return self.loss(batch)

    def kl_to_base(self, batch: Any) -> tuple[float, int]:
        import torch
        import torch.nn.functional as F

        inputs = batch_inputs(batch, self.device)
        with torch.no_grad():
            logits = self.model(**inputs).logits[:, :-1].float()
            with self.adapters(False):
                base = self.model(**inputs).logits[:, :-1].float()
            real = torch.from_numpy((batch.segment_ids[:, 1:] > 0).astype(np.float32)).to(self.device)
            lp, lq = F.log_softmax(logits, -1), F.log_softmax(base, -1)
            kl = ((lp.exp() * (lp - lq)).sum(-1) * real).sum()
        return float(kl), int(real.sum())

    def close(self) -> None:
        pass


def _sample(logits: Any, s: Sampling, gen: Any) -> int:
    import torch

    if s.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / s.temperature, -1)
    if s.top_p < 1.0:
        sp, si = torch.sort(probs, descending=True)
        keep = torch.cumsum(sp, 0) - sp < s.top_p
        probs = torch.zeros_like(probs).scatter(0, si[keep], sp[keep])
        probs /= probs.sum()
    return int(torch.multinomial(probs, 1, generator=gen))


