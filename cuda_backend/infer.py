"""The PyTorch :class:`~macft.inference.ChatModel` and scorer: transformers + peft."""

from __future__ import annotations

import queue
import threading
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
        from transformers import AutoModelForCausalLM, GenerationConfig

        from macft.data.tokenizer import load_tokenizer

        from .hardware import probe

        facts = probe()
        self.device = torch.device("cuda" if facts.cuda_available else "cpu")
        if not facts.cuda_available:
            torch.set_flush_denormal(True)  # see cuda_backend/backend.py
        dtype = torch.bfloat16 if facts.cuda_available and facts.bf16_supported else torch.float32
        base = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=dtype).to(self.device)
        # Sampling (below) is the whole decoding policy, as on the MLX backend: the checkpoint's
        # generation_config.json (Gemma's top_k=64 and top_p=0.95, ...) does not apply.
        base.generation_config = GenerationConfig()
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
        """transformers' ``generate`` runs on a thread of its own and hands each new token
        over a queue; closing this iterator early stops it at the next token."""
        import torch

        if sampling.max_new_tokens <= 0:  # generate refuses a limit of 0: the answer is empty
            self.last = Generation("", [], False, len(prompt_ids))
            return
        tokens: queue.Queue[int | None] = queue.Queue()
        cancel = threading.Event()
        failed: list[BaseException] = []
        config = self._generation_config(sampling)

        def run() -> None:
            # the seed applies to this answer only: the process's random state is put back after
            cuda = [self.device] if self.device.type == "cuda" else []
            try:
                with torch.random.fork_rng(devices=cuda), torch.no_grad():
                    torch.manual_seed(sampling.seed)
                    self.model.generate(input_ids=torch.tensor([prompt_ids], device=self.device),
                                        attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long,
                                                                  device=self.device),
                                        generation_config=config, streamer=_TokenQueue(tokens),
                                        stopping_criteria=[_Cancelled(cancel)])
            except BaseException as e:  # noqa: BLE001 - raised again on the caller's thread
                failed.append(e)
            finally:
                tokens.put(None)

        worker = threading.Thread(target=run, name="macft-generate", daemon=True)
        worker.start()
        text = IncrementalText(self.tokenizer)
        stopped = False
        try:
            while (t := tokens.get()) is not None:
                if t in self.stop:
                    stopped = True
                    break
                piece = text.add(t)
                if piece:
                    yield piece
        finally:
            cancel.set()
            worker.join()
        if failed:
            raise failed[0]
        self.last = Generation(self.tokenizer.decode(text.ids, skip_special_tokens=True), text.ids, stopped,
                               len(prompt_ids))

    def _generation_config(self, s: Sampling) -> Any:
        from transformers import GenerationConfig

        stop = sorted(self.stop)
        pad = self.tokenizer.pad_token_id
        ends = {"eos_token_id": stop or None, "pad_token_id": pad if pad is not None else (stop[0] if stop else None)}
        if s.temperature <= 0:
            return GenerationConfig(max_new_tokens=s.max_new_tokens, do_sample=False, **ends)
        # top_k=0: no top-k cut (transformers' default is 50), only temperature and top-p
        return GenerationConfig(max_new_tokens=s.max_new_tokens, do_sample=True, temperature=s.temperature,
                                top_p=s.top_p, top_k=0, **ends)

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


class _TokenQueue:
    """A ``generate`` streamer (transformers' BaseStreamer interface) that passes the new
    token ids on; the first call carries the prompt, which is skipped."""

    def __init__(self, out: queue.Queue[int | None]):
        self.out = out
        self.prompt = True

    def put(self, value: Any) -> None:
        if self.prompt:
            self.prompt = False
            return
        for t in value.reshape(-1).tolist():
            self.out.put(int(t))

    def end(self) -> None:
        pass


class _Cancelled:
    """A stopping criterion: true once the reader has stopped reading."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)
