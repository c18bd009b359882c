"""A GGUF as a :class:`macft.inference.ChatModel`, through the pinned llama.cpp's ``llama-completion``.

The conversation is rendered to text with the model's chat template: through the Hugging
Face tokenizer when one is at hand (a run's base model), else from the template the GGUF
carries (``tokenizer.chat_template``, rendered with Jinja as transformers does). Generation
streams llama-completion's output; the exact token ids come from the session file it
writes at exit (its stdout may lose its last lines, see :class:`export.verify.LlamaRunner`),
and whether it stopped on an end token from their count.
"""

from __future__ import annotations

import codecs
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from macft.errors import MacftError, ToolError
from macft.inference import Generation, Sampling

from .gguf_info import read_gguf
from .llama_cpp import LlamaCpp
from .verify import read_session_tokens

N_CTX = 4096
EOT_MARKER = "[end of text]"  # llama-completion prints this when generation ends on an end token
# where the answer ends on llama-completion's stdout: the marker, or its closing log line
STDOUT_END = (EOT_MARKER, "\n\nllama_completion:")


class GGUFTemplate:
    """The chat template stored in a GGUF, rendered like transformers' apply_chat_template."""

    def __init__(self, gguf: Path):
        info = read_gguf(gguf)
        md = info.metadata
        self.template = md.get("tokenizer.chat_template")
        if not self.template:
            raise MacftError(f"{gguf} carries no chat template (tokenizer.chat_template).",
                             "Pass the base model with --model so its tokenizer renders the chat.")
        toks = info.tokens

        def tok(key: str) -> str:
            i = md.get(key)
            return toks[i] if isinstance(i, int) and 0 <= i < len(toks) else ""

        self.bos, self.eos = tok("tokenizer.ggml.bos_token_id"), tok("tokenizer.ggml.eos_token_id")
        self.add_bos = info.add_bos

    def render(self, messages: list[dict[str, str]]) -> str:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg: str) -> None:
            raise MacftError(f"The GGUF's chat template refused the conversation: {msg}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.template).render(
            messages=messages, add_generation_prompt=True, bos_token=self.bos, eos_token=self.eos)


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-to-unicode table, inverted (byte-level BPE tokens -> bytes)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class GGUFDecoder:
    """Token ids -> text with the vocabulary stored in the GGUF (SentencePiece or byte-level BPE),
    for when no Hugging Face tokenizer is at hand. Control tokens are left out."""

    BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")

    def __init__(self, gguf: Path):
        info = read_gguf(gguf)
        self.tokens = info.tokens
        self.types = info.token_types
        self.model = str(info.metadata.get("tokenizer.ggml.model", "llama"))
        self._bytes = _byte_decoder() if self.model == "gpt2" else None

    def decode(self, ids: list[int]) -> str:
        out = bytearray()
        for i in ids:
            if not 0 <= i < len(self.tokens) or (i < len(self.types) and self.types[i] == 3):
                continue  # control tokens (type 3) are not text
            t = self.tokens[i]
            if self._bytes is not None:
                out += bytes(self._bytes.get(ch, 0) for ch in t)
            elif (m := self.BYTE.match(t)):
                out.append(int(m.group(1), 16))
            else:
                out += t.replace("\u2581", " ").encode("utf-8")
        return out.decode("utf-8", errors="replace")


class GGUFChatModel:
    kind = "gguf"

    def __init__(self, gguf: Path, tools: LlamaCpp, tokenizer: Any | None = None,
                 lora: Path | None = None, threads: int = 0):
        self.gguf, self.tools, self.tokenizer, self.lora = Path(gguf), tools, tokenizer, lora
        if not self.gguf.is_file():
            raise MacftError(f"GGUF file {gguf} does not exist.", "Check the path given to --gguf.")
        self.threads = threads
        self.template = None if tokenizer is not None else GGUFTemplate(self.gguf)
        info = read_gguf(self.gguf)
        # llama.cpp adds the model's BOS itself: a rendered prompt must not bring a second one
        self.add_bos = info.add_bos
        bos_id = info.metadata.get("tokenizer.ggml.bos_token_id")
        self.bos_id = bos_id if isinstance(bos_id, int) else None
        self.bos_text = info.tokens[bos_id] if self.bos_id is not None and bos_id < len(info.tokens) else None
        self.description = f"{self.gguf.name} (llama.cpp {tools.description})"
        self.last: Generation | None = None
        self._lora_on = True

    @contextmanager
    def adapters(self, enabled: bool) -> Iterator[None]:
        """A GGUF LoRA (--lora) can be switched off; a merged GGUF has no adapter to switch."""
        prev, self._lora_on = self._lora_on, enabled
        try:
            yield
        finally:
            self._lora_on = prev

    def prompt(self, messages: list[dict[str, str]]) -> str:
        if self.tokenizer is not None:
            from macft.data.render import Renderer

            text = Renderer(self.tokenizer).render_text(messages, add_generation_prompt=True)
        else:
            text = self.template.render(messages)  # type: ignore[union-attr]
        if self.add_bos and self.bos_text and text.startswith(self.bos_text):
            text = text[len(self.bos_text):]
        return text

    def stream(self, prompt: str, sampling: Sampling) -> Iterator[str]:
        with tempfile.TemporaryDirectory(prefix="macft-gguf-") as tmp:
            session = Path(tmp) / "session.bin"
            # -p with --no-escape keeps the prompt byte for byte (-f drops a trailing newline,
            # and Gemma's generation prompt ends in "model\n")
            cmd = [str(self.tools.tool("llama-completion")), "-m", str(self.gguf), "-p", prompt,
                   "-n", str(sampling.max_new_tokens), "-c", str(N_CTX), "--seed", str(sampling.seed),
                   "--repeat-penalty", "1.0", "-no-cnv", "--no-display-prompt", "--no-escape",
                   "--no-warmup", "--prompt-cache", str(session), "--prompt-cache-all"]
            if sampling.temperature <= 0:
                cmd += ["--temp", "0", "--top-k", "1"]
            else:
                cmd += ["--temp", str(sampling.temperature), "--top-p", str(sampling.top_p), "--top-k", "0"]
            if self.threads:
                cmd += ["-t", str(self.threads)]
            if self.lora is not None and self._lora_on:
                cmd += ["--lora", str(self.lora)]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
            shown, pending, ended = "", "", False
            assert proc.stdout is not None
            while True:
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                pending += dec.decode(chunk)
                if ended:
                    continue
                hits = [i for i in (pending.find(m) for m in STDOUT_END) if i >= 0]
                at = min(hits) if hits else -1
                if at >= 0:  # the answer is complete; what follows is llama.cpp's own logging
                    pending, ended = pending[:at].rstrip(" "), True
                    if pending:
                        shown += pending
                        yield pending
                    pending = ""
                    continue
                # hold back what could be the start of one of those markers
                cut = max(0, len(pending) - max(map(len, STDOUT_END)) - 1)
                if cut:
                    shown += pending[:cut]
                    yield pending[:cut]
                    pending = pending[cut:]
            tail = "" if ended else pending.rstrip("\n")
            if tail:
                shown += tail
                yield tail
            err = proc.stderr.read().decode("utf-8", "replace") if proc.stderr else ""
            if proc.wait() != 0:
                raise ToolError(cmd, shown + "\n" + err, "llama.cpp could not generate with this GGUF.")
            try:
                ids = read_session_tokens(session)
            except (OSError, ValueError):
                ids = []
        if self.tokenizer is not None:
            prompt_ids = list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        else:
            from .verify import LlamaRunner

            prompt_ids = LlamaRunner(self.tools).tokenize(self.gguf, prompt)
        n_prompt = len(prompt_ids)
        if self.add_bos and self.bos_id is not None and (not prompt_ids or prompt_ids[0] != self.bos_id):
            n_prompt += 1  # the BOS llama.cpp put in front
        gen = ids[n_prompt:]
        text = shown
        if gen:
            # the session file is exact; stdout may have lost its last lines
            if self.tokenizer is not None:
                text = self.tokenizer.decode(gen, skip_special_tokens=True)
            else:
                self._decoder = getattr(self, "_decoder", None) or GGUFDecoder(self.gguf)
                text = self._decoder.decode(gen)
            if text.startswith(shown) and len(text) > len(shown):
                yield text[len(shown):]
        # llama-completion ends early only on an end-of-generation token
        stopped = bool(ids) and len(gen) < sampling.max_new_tokens
        self.last = Generation(text, gen, stopped, n_prompt)

    def close(self) -> None:
        pass
