"""Verify GGUF files with llama.cpp itself, against the Hugging Face reference.

For every GGUF (and the GGUF LoRA on its base):

1. **Tokenization**: each rendered validation prompt, tokenized by ``llama-tokenize``,
   must give exactly the Hugging Face tokenizer's ids (special tokens included).
2. **Perplexity and next-token agreement** on the validation stream, by
   ``llama-perplexity --kl-divergence``: macft writes the reference model's log-probabilities
   in llama.cpp's ``--kl-divergence-base`` format, tokens included, so llama.cpp scores the
   exact token ids the HF model saw. It reports the GGUF's perplexity, the KL divergence and
   how often its top token equals the reference's ("same top").
3. **Greedy generation** from each prompt with ``llama-completion`` (argmax sampling):
   how many of the reference's greedy tokens llama.cpp reproduces before the first
   difference (compared as text), and whether it stops at an end-of-turn token.

The chunks of the stream follow llama.cpp's perplexity layout: ``n_ctx`` tokens each, the
first half is context and positions ``n_ctx/2 .. n_ctx-2`` are scored. Consecutive chunks
overlap so that every token after the first chunk's context is scored once. Position 0 of
a chunk is the BOS token when the model adds one, as llama.cpp does.
"""

from __future__ import annotations

import re
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from macft.errors import MacftError, ToolError

from .llama_cpp import LlamaCpp

MAX_KLD_FILE = 512 << 20  # bytes of reference log-probs (262k-token vocabularies: ~1000 tokens)
MIN_STREAM = 32
RETRIES = 6

# A 16-bit GGUF is a conversion of the merged model, not a quantization: beyond these limits
# the conversion is wrong. The reference has the GGUF's 16-bit weights; what remains is
# llama.cpp's arithmetic (16-bit activations in matrix products), measured on the tiny test
# models: KL divergence 4e-5 (trained Gemma-3) and 1.4e-3 (random Qwen2, 151k vocabulary),
# same top token 95-99.9 %, |ln PPL ratio| <= 0.005. A GGUF of the base without the
# adapter, checked against the merged model, is far outside (see tests/test_export_pipeline.py).
TOL_KLD = 0.01
TOL_SAME_TOP = 0.90
TOL_LN_PPL = 0.03


@dataclass
class KLDInput:
    n_ctx: int
    chunks: list[list[int]]

    @property
    def scored_per_chunk(self) -> int:
        return self.n_ctx - 1 - self.n_ctx // 2

    @property
    def scored(self) -> int:
        return self.scored_per_chunk * len(self.chunks)


@dataclass
class Reference:
    """What the HF reference model produced, for comparing with every GGUF."""

    name: str
    kld_file: Path | None
    kld: KLDInput | None
    ppl: float | None
    prompts: list[str]  # rendered prompt texts passed to llama.cpp
    prompt_ids: list[list[int]]
    greedy_ids: list[list[int]]
    stopped: list[bool]
    end_ids: list[int]
    decode: Callable[[list[int]], str] | None = None

    @property
    def stop_rate(self) -> float | None:
        return sum(self.stopped) / len(self.stopped) if self.stopped else None


@dataclass
class GGUFCheck:
    file: str
    kind: str  # quant type, "f16", "bf16" or "lora"
    size: int
    tokenization_ok: bool | None = None
    tokenization_problems: list[str] = field(default_factory=list)
    agreement: float | None = None  # mean share of reference greedy tokens reproduced
    identical: int | None = None  # generations identical to the reference
    generations: int = 0
    stop_rate: float | None = None
    ref_stop_rate: float | None = None
    perplexity: float | None = None
    ref_perplexity: float | None = None
    ln_ppl_ratio: float | None = None
    kl_divergence: float | None = None
    kl_divergence_err: float | None = None  # llama-perplexity's uncertainty of the mean
    same_top: float | None = None
    scored_tokens: int = 0
    seconds: float = 0.0
    samples: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- the reference side


def plan_kld(stream: list[int], *, add_bos: bool, bos_id: int | None, n_vocab: int,
             max_scored: int, max_ctx: int) -> KLDInput | None:
    """Overlapping llama.cpp-style chunks covering the stream, within the token and file budgets."""
    nv = 2 * ((n_vocab + 1) // 2) + 4
    budget = min(max_scored, MAX_KLD_FILE // (2 * nv))
    if len(stream) < MIN_STREAM or budget < 8:
        return None
    n_ctx = 512
    while n_ctx > 32 and (n_ctx > max_ctx or len(stream) < 2 * n_ctx):
        n_ctx //= 2
    if n_ctx > len(stream):
        return None
    h = n_ctx // 2
    step = n_ctx - 1 - h  # scored per chunk; chunks overlap so scored spans are contiguous
    chunks = []
    start = 0
    while start + n_ctx <= len(stream) and (len(chunks) + 1) * step <= budget:
        c = list(stream[start:start + n_ctx])
        if add_bos and bos_id is not None:
            c[0] = bos_id
        chunks.append(c)
        start += step
    if not chunks:
        return None
    return KLDInput(n_ctx, chunks)


def encode_log_probs(logits: np.ndarray) -> np.ndarray:
    """Rows of fp32 logits in llama.cpp's compact log-prob format (uint16 [n, nv])."""
    logits = np.ascontiguousarray(logits, dtype=np.float32)
    n, v = logits.shape
    nv = 2 * ((v + 1) // 2) + 4
    out = np.zeros((n, nv), dtype=np.uint16)
    mx = logits.max(1)
    mn = np.maximum(logits.min(1), mx - np.float32(16))
    lse = np.log(np.exp((logits - mx[:, None]).astype(np.float64)).sum(1)).astype(np.float32)
    min_lp = (mn - mx - lse).astype(np.float32)
    scale = ((mx - mn) / np.float32(65535)).astype(np.float32)
    head = np.stack([scale, min_lp], 1).astype(np.float32)
    out[:, :4] = head.view(np.uint16).reshape(n, 4)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(scale > 0, np.float32(1) / scale, np.float32(0)).astype(np.float32)
        q = np.rint(inv[:, None] * (logits - mn[:, None]))
    q = np.where(logits > mn[:, None], np.clip(q, 0, 65535), 0)
    out[:, 4:4 + v] = q.astype(np.uint16)
    return out


def write_kld_file(path: Path, kld: KLDInput, n_vocab: int,
                   logits_of: Callable[[list[int], int], np.ndarray],
                   on_chunk: Callable[[], None] | None = None) -> float:
    """Write the reference log-probs; returns the reference perplexity on the scored tokens."""
    h = kld.n_ctx // 2
    k = kld.scored_per_chunk
    nll_sum, count = 0.0, 0
    with open(path, "wb") as f:
        f.write(b"_logits_")
        f.write(struct.pack("<Iii", kld.n_ctx, n_vocab, len(kld.chunks)))
        for c in kld.chunks:
            f.write(np.asarray(c, dtype="<i4").tobytes())
        for c in kld.chunks:
            logits = logits_of(c, kld.n_ctx - h)[: k]  # positions h .. n_ctx-2
            if logits.shape != (k, n_vocab):
                raise MacftError(f"The reference model gave logits of shape {logits.shape}, expected "
                                 f"({k}, {n_vocab}): its vocabulary differs from the GGUF's.")
            targets = np.asarray(c[h + 1:], dtype=np.int64)
            lg = logits.astype(np.float64)
            m = lg.max(1)
            lse = m + np.log(np.exp(lg - m[:, None]).sum(1))
            nll_sum += float((lse - lg[np.arange(k), targets]).sum())
            count += k
            f.write(encode_log_probs(logits).astype("<u2").tobytes())
            if on_chunk:
                on_chunk()
    return float(np.exp(nll_sum / count))


# --------------------------------------------------------------------------- llama.cpp side


class LlamaRunner:
    def __init__(self, tools: LlamaCpp, threads: int = 0):
        self.tools = tools
        self.threads = threads

    def _common(self) -> list[str]:
        return ["-t", str(self.threads)] if self.threads else []

    def _run(self, cmd: list[str], hint: str, complete=None, timeout: float = 1800) -> tuple[str, str]:
        """Run a tool; retry when its output came back incomplete.

        llama.cpp's tools print through a logging thread that the program does not wait for
        at exit (the pinned version says so in common/log.cpp), so the last lines of stdout
        are sometimes lost. ``complete(stdout, stderr)`` recognises a whole output.
        """
        for _attempt in range(RETRIES):
            try:
                r = subprocess.run(cmd, capture_output=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                raise ToolError(cmd, f"(no result after {timeout:.0f} s)", hint) from None
            except OSError as e:
                raise ToolError(cmd, str(e), hint) from None
            out = r.stdout.decode("utf-8", errors="replace")
            err = r.stderr.decode("utf-8", errors="replace")
            if r.returncode != 0:
                raise ToolError(cmd, out + "\n" + err, hint)
            if complete is None or complete(out, err):
                return out, err
        raise ToolError(cmd, out + "\n" + err,
                        f"Its output was incomplete {RETRIES} times in a row. " + hint)

    def tokenize(self, gguf: Path, text: str) -> list[int]:
        cmd = [str(self.tools.tool("llama-tokenize")), "-m", str(gguf), "-p", text, "--ids",
               "--no-escape", "--log-disable"]
        out, _ = self._run(cmd, "The GGUF's vocabulary could not be loaded; re-run the export.")
        m = re.search(r"\[([\d,\s]*)\]\s*$", out.strip())
        if not m:
            raise ToolError(cmd, out, "llama-tokenize printed no id list.")
        return [int(x) for x in m.group(1).split(",") if x.strip()]

    def generate(self, gguf: Path, text: str, max_new: int, n_ctx: int, workdir: Path,
                 lora: Path | None = None) -> list[int]:
        """Token ids of the prompt followed by the greedy continuation (argmax sampling).

        The ids are read from the session file llama-completion saves at the end
        (``--prompt-cache ... --prompt-cache-all``), written by the main thread before exit,
        unlike its stdout (see :meth:`_run`).
        """
        session = workdir / "session.bin"
        session.unlink(missing_ok=True)
        cmd = [str(self.tools.tool("llama-completion")), "-m", str(gguf), "-p", text,
               "-n", str(max_new), "-c", str(n_ctx), "--temp", "0", "--top-k", "1",
               "--repeat-penalty", "1.0", "--seed", "0", "-no-cnv", "--no-display-prompt",
               "--no-escape", "--no-warmup", "--prompt-cache", str(session), "--prompt-cache-all",
               *self._common()]
        if lora:
            cmd += ["--lora", str(lora)]
        out, err = self._run(cmd, "llama.cpp could not generate with this GGUF; see its output above.")
        try:
            ids = read_session_tokens(session)
        except (OSError, ValueError) as e:
            raise ToolError(cmd, out + "\n" + err, f"llama-completion left no usable session file ({e}).") from None
        finally:
            session.unlink(missing_ok=True)
        return ids

    def kl_divergence(self, gguf: Path, base_file: Path, n_ctx: int,
                      lora: Path | None = None) -> dict[str, float]:
        cmd = [str(self.tools.tool("llama-perplexity")), "-m", str(gguf), "--kl-divergence-base",
               str(base_file), "--kl-divergence", "-c", str(n_ctx), "-b", str(max(n_ctx, 512)),
               "--no-warmup", *self._common()]
        if lora:
            cmd += ["--lora", str(lora)]
        n_chunks = _chunk_count(base_file)
        out, err = self._run(cmd, "llama-perplexity failed on this GGUF; see its output above.",
                             lambda o, e: len(_CHUNK_LINE.findall(o + "\n" + e)) >= n_chunks)
        return parse_kld(out + "\n" + err, cmd)


_NUM = r"(-?(?:\d+(?:\.\d*)?|nan|inf|-nan))"
_CHUNK_LINE = re.compile(
    rf"^\s*(\d+)\s+{_NUM}\s+±\s+{_NUM}\s+{_NUM}\s+±\s+{_NUM}\s+{_NUM}\s+±\s+{_NUM}\s+"
    rf"{_NUM}\s+±\s+{_NUM}\s+%\s+{_NUM}\s+±\s+{_NUM}\s+%\s*$", re.M)


SESSION_MAGIC = 0x6767736E  # 'ggsn'


def read_session_tokens(path: Path) -> list[int]:
    """The token ids at the head of a llama.cpp session file."""
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12:
            raise ValueError("session file too short")
        magic, _version, n = struct.unpack("<III", head)
        if magic != SESSION_MAGIC:
            raise ValueError(f"not a llama.cpp session file (magic {magic:#x})")
        raw = f.read(4 * n)
    if len(raw) != 4 * n:
        raise ValueError("session file truncated")
    return list(struct.unpack(f"<{n}i", raw))


def _chunk_count(base_file: Path) -> int:
    with open(base_file, "rb") as f:
        head = f.read(20)
    return struct.unpack("<Iii", head[8:20])[2]


_MEAN_KLD = re.compile(rf"^Mean\s+KLD:\s+{_NUM}\s+±\s+{_NUM}\s*$", re.M)


def parse_kld(text: str, cmd: list[str]) -> dict[str, float]:
    """Cumulative figures from the last chunk line of ``llama-perplexity --kl-divergence``;
    the KL divergence and its uncertainty from the final "Mean KLD" line when it is there
    (6 decimals instead of the chunk line's 5: KL divergences of 1e-4 are common)."""
    rows = _CHUNK_LINE.findall(text)
    if not rows:
        raise ToolError(cmd, text[-3000:], "llama-perplexity printed no KL-divergence results; "
                        "the output format of this llama.cpp may differ from the pinned one.")
    r = rows[-1]
    f = [float(x) for x in r[1:]]
    out = {"chunks": int(r[0]), "ppl": f[0], "ln_ppl_ratio": f[2], "kld": f[4], "kld_err": f[5],
           "dp_rms": f[6] / 100, "same_top": f[8] / 100, "same_top_err": f[9] / 100}
    m = _MEAN_KLD.findall(text)
    if m:
        out["kld"], out["kld_err"] = float(m[-1][0]), float(m[-1][1])
    return out


# --------------------------------------------------------------------------- comparing


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def check_gguf(runner: LlamaRunner, gguf: Path, kind: str, ref: Reference, *, max_new: int,
               n_ctx: int, workdir: Path, lora: Path | None = None, label: str | None = None,
               on_step: Callable[[str], None] | None = None, scores_only: bool = False) -> GGUFCheck:
    """Tokenization, perplexity / KL divergence / same top, and greedy generations of one
    GGUF against ``ref``. ``scores_only``: the perplexity run alone (a variant of a file whose
    vocabulary is already checked, measured for comparison)."""
    t0 = time.time()
    target = lora or gguf
    chk = GGUFCheck(label or target.name, kind, target.stat().st_size, ref_stop_rate=ref.stop_rate,
                    ref_perplexity=ref.ppl)
    # 1. tokenization
    problems = []
    llama_ids = []
    for i, (text, ids) in enumerate(zip(ref.prompts, ref.prompt_ids, strict=True)):
        if scores_only:
            break
        got = runner.tokenize(gguf, text)
        llama_ids.append(got)
        if got != ids:
            j = common_prefix(got, ids)
            problems.append(f"prompt {i + 1}: llama.cpp gives {len(got)} tokens, Hugging Face {len(ids)}; "
                            f"first difference at token {j}: llama.cpp {got[j:j + 6]} vs HF {ids[j:j + 6]}")
    chk.tokenization_ok = None if scores_only else not problems
    chk.tokenization_problems = problems
    if on_step:
        on_step("tokenization")
    # 2. perplexity / next-token agreement on the stream
    if ref.kld_file is not None and ref.kld is not None:
        r = runner.kl_divergence(gguf, ref.kld_file, ref.kld.n_ctx, lora)
        # llama.cpp's own ln(PPL(Q)/PPL(base)) uses the stored log-probs, floored at 16 nats
        # below the top token: with a poor model that floor caps the base. Use the exact one.
        chk.perplexity = r["ppl"]
        if ref.ppl and r["ppl"] > 0:
            chk.ln_ppl_ratio = float(np.log(r["ppl"]) - np.log(ref.ppl))
        chk.kl_divergence, chk.kl_divergence_err, chk.same_top = r["kld"], r["kld_err"], r["same_top"]
        chk.scored_tokens = ref.kld.scored
    if on_step:
        on_step("perplexity")
    if scores_only:
        chk.seconds = round(time.time() - t0, 2)
        return chk
    # 3. greedy generations, compared token by token
    agreed, identical, stops = [], 0, []
    for i, text in enumerate(ref.prompts):
        ids = runner.generate(gguf, text, max_new, n_ctx, workdir, lora)
        n_prompt = len(llama_ids[i])
        if ids[:n_prompt] != llama_ids[i]:
            problems.append(f"prompt {i + 1}: llama-completion evaluated other prompt tokens than "
                            "llama-tokenize gives")
            chk.tokenization_ok = False
        gen = ids[n_prompt:]
        want = ref.greedy_ids[i]
        n = common_prefix(gen, want)
        stopped = bool(gen) and (len(gen) < max_new or gen[-1] in ref.end_ids)
        agreed.append(n / len(want) if want else 1.0)
        identical += gen == want
        stops.append(stopped)
        if len(chk.samples) < 3:
            dec = ref.decode or (lambda x: " ".join(map(str, x)))
            chk.samples.append({"prompt": text[-300:], "llama_cpp": dec(gen)[:400],
                                "reference": dec(want)[:400], "agreed_tokens": n,
                                "reference_tokens": len(want), "stopped": stopped})
        if on_step:
            on_step("generation")
    chk.generations = len(ref.prompts)
    chk.agreement = float(np.mean(agreed)) if agreed else None
    chk.identical = identical
    chk.stop_rate = sum(stops) / len(stops) if stops else None
    chk.seconds = round(time.time() - t0, 2)
    return chk


def conversion_problems(chk: GGUFCheck) -> list[str]:
    """Why a 16-bit GGUF (a plain conversion) disagrees with the HF model beyond tolerance."""
    p = []
    if chk.tokenization_ok is False:
        p.append("llama.cpp tokenizes the chat prompts differently from the Hugging Face tokenizer:\n"
                 + "\n".join(f"      {x}" for x in chk.tokenization_problems[:5]))
    if chk.kl_divergence is not None and chk.kl_divergence > TOL_KLD:
        p.append(f"the KL divergence of its next-token distribution from the Hugging Face model's is "
                 f"{chk.kl_divergence:.4g} on {chk.scored_tokens} validation tokens (tolerance: at most {TOL_KLD})")
    misses = round((1 - (chk.same_top or 0)) * chk.scored_tokens)
    if chk.same_top is not None and chk.same_top < TOL_SAME_TOP and misses > 2:
        p.append(f"its next-token choice matches the Hugging Face model on {chk.same_top:.1%} of "
                 f"{chk.scored_tokens} validation tokens (tolerance: at least {TOL_SAME_TOP:.0%})")
    if chk.ln_ppl_ratio is not None and abs(chk.ln_ppl_ratio) > TOL_LN_PPL:
        p.append(f"its perplexity {chk.perplexity:.4g} differs from the Hugging Face model's "
                 f"{chk.ref_perplexity:.4g} by ln ratio {chk.ln_ppl_ratio:+.4f} (tolerance: ±{TOL_LN_PPL})")
    return p
