"""An importance matrix from the user's own data, for the K- and i-quants.

``llama-quantize`` rounds each row of a weight to a few bits; with an importance matrix it
weighs every column by how strongly the model's activations use it (the mean square of the
inputs that column multiplies), so the rounding error lands where it matters least. llama.cpp
computes that matrix with ``llama-imatrix`` over a text. The usual text is a generic corpus;
here it is the run's own training conversations, rendered with the chat template exactly as
training rendered them, so the matrix measures the activations of the inputs the fine-tune
will see (chat-template tokens included, parsed as special tokens).

Which rows: the training rows, not the validation rows. Every GGUF is measured on the
validation rows (export/verify.py), and a matrix computed from them would make the
with/without-imatrix comparison in the report a measurement on data the matrix has seen.
When the training rows are too few for one chunk, the validation rows are added (and the
report says so).

Bounded: at most :data:`MAX_CHUNKS` chunks of up to :data:`MAX_CTX` tokens (rows are
shuffled with a fixed seed before the cut, so a large data set is sampled, not truncated
to its first rows), and about :data:`MAX_SECONDS`: when llama-imatrix's first pass predicts
more (a 4B model on a CPU), it is stopped and run again over the chunks that fit.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from macft.errors import MacftError, ToolError

from .llama_cpp import IMATRIX_TOOL, LlamaCpp
from .quantize import IMATRIX_TYPES, NEEDS_IMATRIX

MAX_CHUNKS = 200
MAX_CTX = 512
MIN_CTX = 32  # below this the matrix rests on too few tokens to mean anything
DATA_NAME = "imatrix-data.txt"  # recorded by llama-quantize in the GGUF as the imatrix data set
SEED = "imatrix"


@dataclass
class ImatrixPlan:
    """Decided before anything is written: where the matrix comes from."""

    mode: str  # "data" (computed from the run's rows), "file" (--imatrix FILE), "off"
    file: Path | None = None
    why: str = ""  # one line for the report when mode is "off" or the data is missing
    samples: list[Any] = field(default_factory=list)  # training rows (mode "data")
    extra: list[Any] = field(default_factory=list)  # validation rows, used only when needed
    source: str = ""

    @property
    def active(self) -> bool:
        return self.mode != "off"


@dataclass
class Imatrix:
    """The matrix used for this export."""

    path: Path
    source: str
    chunks: int | None = None
    n_ctx: int | None = None
    tokens: int | None = None
    rows: int | None = None
    perplexity: float | None = None  # llama-imatrix's own estimate on the 16-bit GGUF
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.path.name, "source": self.source, "chunks": self.chunks, "n_ctx": self.n_ctx,
                "tokens": self.tokens, "rows": self.rows, "perplexity": self.perplexity,
                "seconds": round(self.seconds, 1)}


def wants_imatrix(quants: list[str]) -> list[str]:
    return [q for q in quants if q in IMATRIX_TYPES]


def plan_imatrix(setting: str | None, quants: list[str], cfg: Any, *, from_run: bool) -> ImatrixPlan:
    """``setting``: "auto", "off" or a file. Refuses the i-quants without a matrix, naming the
    fix; without data to compute one from (an adapter exported without its run), "auto" falls
    back to no matrix with a one-line reason."""
    setting = (setting or "auto").strip()
    needs = [q for q in quants if q in NEEDS_IMATRIX]
    if setting.lower() in ("off", "none", "false", "no"):
        if needs:
            raise MacftError(
                f"{', '.join(needs)} {'is an i-quant' if len(needs) == 1 else 'are i-quants'}, made for an "
                "importance matrix, and --no-imatrix turns it off.",
                "Drop --no-imatrix (the matrix is computed from the run's data), pass --imatrix FILE, "
                "or ask for a K-quant such as q4_k_m or q3_k_m instead.")
        return ImatrixPlan("off", why="turned off (--no-imatrix)")
    if setting.lower() != "auto":
        path = Path(setting).expanduser()
        if not path.is_file():
            raise MacftError(f"--imatrix {setting} does not exist.",
                             "Pass a file written by llama-imatrix (.gguf or .dat), or leave --imatrix out "
                             "to compute one from the run's data.")
        return ImatrixPlan("file", file=path, source=f"--imatrix {setting}")
    if not wants_imatrix(quants):
        return ImatrixPlan("off", why=f"none of {', '.join(quants)} uses an importance matrix")
    train, valid, source, why = training_samples(cfg) if cfg is not None else (
        [], [], "", "the adapter was given without its run directory, so the run's data is unknown"
        if not from_run else "the run names no data")
    if not train and not valid:
        if needs:
            raise MacftError(
                f"{', '.join(needs)} needs an importance matrix, and there is no data to compute one from: "
                f"{why}.",
                "Export with --run RUN (its training data is used), pass --imatrix FILE (made by "
                "llama-imatrix), or ask for q4_k_m / q3_k_m instead.")
        return ImatrixPlan("off", why=f"no importance matrix: {why}")
    return ImatrixPlan("data", samples=train, extra=valid, source=source)


def training_samples(cfg: Any) -> tuple[list[Any], list[Any], str, str]:
    """The run's training rows and validation rows as training split them; (train, valid,
    source, why-empty)."""
    from macft.data.dataset import load_samples, split_valid
    from macft.data.readers import resolve_sources

    data = cfg.data
    if not data.train:
        return [], [], "", "the run's config names no training data"
    enc = getattr(data, "encoding", "auto")
    try:
        train_src, valid_src = resolve_sources(data.train, data.valid)
        _, rows = load_samples(train_src, data.format, data.split, enc)
        if valid_src:
            _, valid = load_samples(valid_src, data.format, "validation", enc)
            return rows, valid, f"training data {train_src}", ""
        train, held = split_valid(rows, data.valid_fraction, cfg.train.seed)
        return train, held, f"training rows of {train_src} (the validation rows held out)", ""
    except MacftError as e:
        return [], [], "", f"the run's data could not be read ({e.message.splitlines()[0]})"


def render_rows(renderer: Any, samples: list[Any], budget_tokens: int) -> tuple[list[str], int, int]:
    """Texts of the rows as training rendered them (chat template, special tokens as text),
    in a seeded random order, until ``budget_tokens``; (texts, tokens, rows)."""
    order = list(range(len(samples)))
    random.Random(SEED).shuffle(order)
    texts, tokens = [], 0
    for i in order:
        s = samples[i]
        try:
            if getattr(s, "is_chat", False):
                text = renderer.render_text(s.messages)
                n = len(renderer.encode(text))
            else:
                text = s.text or ""
                n = len(renderer.render(s).ids)
        except MacftError:
            continue  # a row the chat template refuses: training dropped it too
        if not text:
            continue
        texts.append(text)
        tokens += n
        if tokens >= budget_tokens:
            break
    return texts, tokens, len(texts)


def context_for(tokens: int) -> int | None:
    """The chunk length llama-imatrix gets: MAX_CTX, halved until the data holds two chunks."""
    n = MAX_CTX
    while n > MIN_CTX and tokens < 2 * n:
        n //= 2
    return n if tokens >= 2 * n else None


_CHUNK = re.compile(r"\[(\d+)\](-?[\d.]+|nan|inf)")
_TOTAL = re.compile(r"computing over (\d+) chunks, n_ctx=(\d+)")
_ETA = re.compile(r"([\d.]+) seconds per pass - ETA")
_FINAL = re.compile(r"Final estimate: PPL = ([\d.]+)")


def compute(tools: LlamaCpp, gguf: Path, plan: ImatrixPlan, renderer: Any, work: Path, name: str,
            threads: int = 0, say=None) -> tuple[Imatrix | None, str | None]:
    """Run llama-imatrix over the run's rows on the 16-bit GGUF; (matrix, None) or (None, why
    not) when the data is too small for one chunk."""
    from macft.ui import console

    say = say or console.print
    budget = MAX_CHUNKS * MAX_CTX + MAX_CTX
    texts, tokens, rows = render_rows(renderer, plan.samples, budget)
    source = plan.source
    if context_for(tokens) is None and plan.extra:
        more, t2, r2 = render_rows(renderer, plan.extra, budget - tokens)
        texts, tokens, rows = texts + more, tokens + t2, rows + r2
        source += " and the validation rows (the training rows alone were too few)"
    n_ctx = context_for(tokens)
    if n_ctx is None:
        return None, (f"the run's data has {tokens} tokens, fewer than {2 * MIN_CTX} needed for an importance "
                      "matrix")
    n_chunks = min(MAX_CHUNKS, tokens // n_ctx)
    data = work / DATA_NAME
    data.write_text("".join(t if t.endswith("\n") else t + "\n" for t in texts), encoding="utf-8")
    out = work / f"{name}-imatrix.gguf"
    tmp = out.with_name(out.name + ".tmp.gguf")
    n_seq = max(1, BATCH // n_ctx)  # llama-imatrix evaluates n_seq chunks per pass
    t0 = time.time()
    res = _imatrix_run(tools, gguf, tmp, work, n_ctx, n_chunks, n_seq, rows, threads)
    if res.too_slow is not None:
        # the first pass said the whole run would take far longer than the budget: start
        # again with the chunks that fit (the first pass is lost, a few seconds)
        n_chunks = max(n_seq, int(n_chunks * MAX_SECONDS / res.too_slow) // n_seq * n_seq)
        say(f"importance matrix: {_duration(res.too_slow)} for all chunks is more than the "
            f"{_duration(MAX_SECONDS)} budget; using {n_chunks} chunks")
        res = _imatrix_run(tools, gguf, tmp, work, n_ctx, n_chunks, n_seq, rows, threads, budget_check=False)
    if res.rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise ToolError(res.cmd, res.log[-4000:], "llama-imatrix could not compute the importance matrix. "
                        "Export with --no-imatrix to skip it, and report it with --debug output.")
    os.replace(tmp, out)
    data.unlink(missing_ok=True)
    seconds = time.time() - t0
    say(f"[green]✓[/] importance matrix from {source}: {rows} rows, {n_chunks} chunks of {n_ctx} tokens "
        f"[dim]({seconds:.1f} s)[/]")
    return Imatrix(out, source, n_chunks, n_ctx, tokens, rows, res.ppl, seconds), None


BATCH = 2048  # llama-imatrix -b: chunks of n_ctx tokens evaluated together
MAX_SECONDS = 600  # the time budget; fewer chunks when the first pass predicts more


@dataclass
class _Run:
    cmd: list[str]
    rc: int
    log: str
    ppl: float | None
    too_slow: float | None  # the predicted seconds, when over the budget and the run was stopped


def _imatrix_run(tools: LlamaCpp, gguf: Path, tmp: Path, work: Path, n_ctx: int, n_chunks: int, n_seq: int,
                 rows: int, threads: int, budget_check: bool = True) -> _Run:
    from macft.ui import task_progress

    # relative names: llama-quantize copies them into the GGUF's metadata (no local paths)
    cmd = [str(tools.tool(IMATRIX_TOOL)), "-m", str(gguf.resolve()), "-f", DATA_NAME, "-o", tmp.name,
           "-c", str(n_ctx), "-b", str(max(BATCH, n_ctx)), "--chunks", str(n_chunks), "--parse-special",
           "--output-frequency", str(10 ** 6)]
    if threads:
        cmd += ["-t", str(threads)]
    log: list[str] = []
    ppl: list[float] = []
    stop = threading.Event()
    predicted: list[float] = []
    with task_progress(transient=True) as prog:
        task = prog.add_task(f"importance matrix: {rows} rows, {n_chunks} chunks of {n_ctx} tokens "
                             "(llama-imatrix)", total=n_chunks)
        tails = {0: "", 1: ""}

        def on_text(which: int, piece: str) -> None:
            log.append(piece)
            text = tails[which] + piece  # a match may straddle two reads
            tails[which] = text[-200:]
            for m in _CHUNK.finditer(text):
                prog.update(task, completed=min(n_chunks, int(m.group(1))))
            m = _ETA.search(text)
            if m and not predicted:
                eta = float(m.group(1)) * n_chunks / n_seq
                predicted.append(eta)
                if budget_check and eta > 1.25 * MAX_SECONDS and n_chunks > n_seq:
                    stop.set()
                prog.update(task, description=f"importance matrix: {n_chunks} chunks of {n_ctx} tokens, "
                                              f"about {_duration(eta)} (llama-imatrix)")
            f = _FINAL.search(text)
            if f:
                ppl.append(float(f.group(1)))

        rc = _run_streaming(cmd, work, on_text, stop)
    if stop.is_set():
        tmp.unlink(missing_ok=True)
        return _Run(cmd, rc, "".join(log), None, predicted[0])
    return _Run(cmd, rc, "".join(log), ppl[-1] if ppl else None, None)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def _run_streaming(cmd: list[str], cwd: Path, on_text, stop: threading.Event | None = None) -> int:
    """Run ``cmd`` in ``cwd``, handing stdout (0) and stderr (1) to ``on_text(which, text)``
    as they arrive (llama-imatrix prints its per-chunk progress without newlines); killed
    when ``stop`` is set."""
    try:
        p = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as e:
        raise ToolError(cmd, str(e), "Check the llama.cpp build (`macft setup llama-cpp`).") from None
    lock = threading.Lock()

    def pump(which: int, stream) -> None:
        while True:
            chunk = stream.read1(4096)
            if not chunk:
                break
            with lock:
                on_text(which, chunk.decode("utf-8", errors="replace"))

    threads = [threading.Thread(target=pump, args=(i, s), daemon=True) for i, s in enumerate((p.stdout, p.stderr))]
    for t in threads:
        t.start()
    try:
        while True:
            try:
                rc = p.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if stop is not None and stop.is_set():
                    p.kill()
    except BaseException:
        p.kill()
        p.wait()
        raise
    for t in threads:
        t.join()
    return rc


def external(path: Path) -> Imatrix:
    """A matrix the user gave (--imatrix FILE); llama-quantize checks its contents."""
    return Imatrix(path.resolve(), f"--imatrix {path}")
