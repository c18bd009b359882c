"""`macft doctor`: one screen that says what this machine can do and how to fix what it cannot.

Every check is a :class:`Check` (name, status, what was found, the fix). ``--json`` prints
them for scripts. The exit code is 1 when the chosen backend (``--backend``, default
auto) cannot run here, else 0.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from ..model_info import FP16_UNSAFE_NAME
from ..ui import console, human_bytes, out

HELP = ("Check this machine: torch build vs GPU, bitsandbytes, MLX, tokenizer extras, llama.cpp, "
        "memory, disk; with the fix for each problem.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="auto", choices=["auto", "mlx", "cuda"],
                   help="Backend whose readiness decides the exit code (default auto).")
    p.add_argument("--json", action="store_true", help="Print one JSON object (for scripts).")


OK, WARN, FAIL, INFO = "ok", "warn", "fail", "info"
MARK = {OK: "[green]✓[/]", WARN: "[yellow]![/]", FAIL: "[red]✗[/]", INFO: "[dim]·[/]"}


@dataclass
class Check:
    name: str
    status: str
    found: str
    fix: str | None = None


def version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def _tool_version(cmd: str) -> str | None:
    exe = shutil.which(cmd)
    if not exe:
        return None
    try:
        r = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10)
        first = (r.stdout or r.stderr).strip().splitlines()
        return first[0] if first else exe
    except (OSError, subprocess.SubprocessError):
        return exe


# --------------------------------------------------------------------------- checks


def check_python() -> Check:
    v = sys.version_info
    ok = v >= (3, 10)
    return Check("python", OK if ok else FAIL, f"{platform.python_version()} ({sys.executable})",
                 None if ok else "Install Python 3.10 or newer.")


def check_torch() -> tuple[list[Check], Any]:
    """torch build vs the hardware present (imports torch when it is installed)."""
    from cuda_backend.hardware import CUDA_TORCH_FIX, CUDA_WHEEL_INDEX, describe, probe

    facts = probe()
    checks: list[Check] = []
    if facts.torch_version is None:
        fix = (f"pip install torch --index-url {CUDA_WHEEL_INDEX} && pip install 'macft[cuda]'"
               if facts.nvidia_driver else "pip install torch && pip install 'macft[cuda]'")
        checks.append(Check("torch", WARN, "not installed (the cuda backend needs it)", fix))
        return checks, facts
    build = f"CUDA {facts.torch_cuda}" if facts.torch_cuda else "CPU-only build"
    if facts.torch_cuda is None and facts.nvidia_driver:
        checks.append(Check("torch", FAIL, f"{facts.torch_version}, {build}, but this machine has an NVIDIA "
                            f"GPU ({facts.nvidia_driver}): training would run on the CPU", CUDA_TORCH_FIX))
    else:
        checks.append(Check("torch", OK, f"{facts.torch_version}, {build}"))
    if facts.cuda_available:
        cap = ".".join(map(str, facts.gpu_capability or ()))
        bf = "bf16 yes" if facts.bf16_supported else f"no bf16 (fp32 compute; {FP16_UNSAFE_NAME} never fp16)"
        checks.append(Check("gpu", OK if facts.bf16_supported else WARN,
                            f"{describe(facts)}, compute capability {cap}, {bf}"))
    else:
        mps = _mps_available()
        extra = "; Apple GPU visible to torch (MPS), but macft trains on Macs with MLX" if mps else ""
        checks.append(Check("gpu", INFO, f"no CUDA GPU: the cuda backend runs on the CPU in fp32{extra}"))
    return checks, facts


def _mps_available() -> bool:
    try:
        import torch

        return bool(torch.backends.mps.is_available())
    except Exception:  # noqa: BLE001
        return False


def check_packages(facts: Any) -> list[Check]:
    checks = []
    bnb = version("bitsandbytes")
    if bnb:
        where = "GPU kernels" if facts is not None and getattr(facts, "cuda_available", False) else \
            "CPU library: --quantize works, slowly"
        checks.append(Check("bitsandbytes", OK, f"{bnb} ({where})"))
    else:
        checks.append(Check("bitsandbytes", WARN, "not installed: --quantize 4bit/8bit unavailable on the cuda backend",
                            "pip install 'bitsandbytes>=0.45'"))
    for pkg, need in (("transformers", True), ("peft", False), ("accelerate", False)):
        v = version(pkg)
        checks.append(Check(pkg, OK if v else (FAIL if need else WARN), v or "not installed",
                            None if v else f"pip install {pkg}"))
    for pkg, why in (("sentencepiece", "Gemma / Llama-2 tokenizers"), ("protobuf", "SentencePiece tokenizers in transformers"),
                     ("tokenizers", "fast tokenizers")):
        v = version(pkg)
        checks.append(Check(pkg, OK if v else FAIL, v or f"missing ({why} fail to load without it)",
                            None if v else f"pip install {pkg}"))
    return checks


def check_mlx() -> list[Check]:
    mlx_v = version("mlx")
    if mlx_v is None:
        hint = "pip install 'macft[mlx]'" if sys.platform == "darwin" else "pip install 'macft[mlx]' (mlx[cpu])"
        status = WARN if sys.platform == "darwin" and platform.machine() == "arm64" else INFO
        return [Check("mlx", status, "not installed (the mlx backend needs it)", hint)]
    checks = []
    lm = version("mlx-lm")
    from ..mlx_backend.blas import find_openblas, preload_fast_blas

    preload_fast_blas()
    import mlx.core as mx

    metal = False
    try:
        metal = bool(mx.metal.is_available())
    except AttributeError:
        pass
    if metal:
        info = mx.device_info()
        checks.append(Check("mlx", OK, f"{mlx_v}, Metal: {info.get('device_name', 'Apple GPU')}, "
                            f"{human_bytes(info.get('memory_size', 0))} unified memory"))
    else:
        blas = find_openblas()
        checks.append(Check("mlx", OK if blas else WARN,
                            f"{mlx_v}, CPU build" + (f", OpenBLAS {blas}" if blas else ", reference BLAS (slow)"),
                            None if blas else "sudo apt install libopenblas0-pthread  (10x faster MLX on the CPU)"))
    checks.append(Check("mlx-lm", OK if lm else FAIL, lm or "not installed", None if lm else "pip install mlx-lm"))
    return checks


def check_llama_cpp() -> list[Check]:
    from export import llama_cpp as L

    checks = []
    user = os.environ.get(L.ENV_CHECKOUT)
    if user:
        try:
            t = L.user_checkout(Path(user), L.ENV_CHECKOUT)
            checks.append(Check("llama.cpp", OK, f"{t.description}: {t.bin_dir} (not the pinned version)"))
        except Exception as e:  # noqa: BLE001 - MacftError with its own fix
            checks.append(Check("llama.cpp", FAIL, getattr(e, "message", str(e)), getattr(e, "hint", None)))
    else:
        found = L.find_pinned_build()
        if found:
            checks.append(Check("llama.cpp", OK, f"{found.description}, pinned, built: {found.bin_dir}"))
        else:
            backend, _ = L.detect_backend()
            minutes = max(1, round(L.CPU_SECONDS[backend] / (os.cpu_count() or 1) / 60))
            checks.append(Check("llama.cpp", WARN, f"pinned b{L.PIN_BUILD} not built yet (export builds it the "
                                f"first time, about {minutes} min here)", "macft setup llama-cpp"))
    cmake = _tool_version("cmake")
    cxx = next((v for v in (_tool_version(c) for c in ("c++", "g++", "clang++")) if v), None)
    checks.append(Check("cmake", OK if cmake else WARN, cmake or "not found (needed to build llama.cpp)",
                        None if cmake else L.install_hint()))
    checks.append(Check("c++ compiler", OK if cxx else WARN, cxx or "not found (needed to build llama.cpp)",
                        None if cxx else L.install_hint()))
    return checks


def check_resources(facts: Any) -> list[Check]:
    import psutil

    vm = psutil.virtual_memory()
    checks = [Check("memory", OK if vm.available > 4e9 else WARN,
                    f"{human_bytes(vm.total)} total, {human_bytes(vm.available)} available",
                    None if vm.available > 4e9 else "Close other programs; see `macft estimate` for what fits.")]
    if facts is not None and getattr(facts, "cuda_available", False):
        try:
            import torch

            free, total = torch.cuda.mem_get_info()
            checks.append(Check("gpu memory", OK, f"{human_bytes(total)} total, {human_bytes(free)} free"))
        except Exception:  # noqa: BLE001
            pass
    for label, path in (("disk (here)", Path.cwd()), ("disk (cache)", _cache_dir())):
        p = path
        while not p.exists():
            p = p.parent
        free = shutil.disk_usage(p).free
        checks.append(Check(label, OK if free > 10e9 else WARN, f"{human_bytes(free)} free at {path}",
                            None if free > 10e9 else "Free some space: a 4B export needs ~20 GB of scratch."))
    return checks


def _cache_dir() -> Path:
    from export.llama_cpp import cache_root

    return cache_root()


def backend_verdict(name: str) -> tuple[Check, bool]:
    from ..backends import choose_auto, get_backend
    from ..config import RunConfig
    from ..errors import MacftError

    try:
        chosen, warning = choose_auto() if name == "auto" else (name, None)
        be = get_backend(chosen)
        problems = be.check(RunConfig(), None)
    except MacftError as e:
        return Check(f"backend {name}", FAIL, e.message, e.hint), False
    if problems:
        return Check(f"backend {name}", FAIL, f"{chosen}: " + "; ".join(problems)), False
    found = f"{chosen} on {be.device()}"
    if warning:
        return Check(f"backend {name}", WARN, f"{found} ({warning})"), True
    return Check(f"backend {name}", OK, found), True


def gather(backend: str) -> tuple[list[Check], bool]:
    checks = [check_python(), Check("macft", INFO, _macft_version())]
    torch_checks, facts = check_torch()
    checks += torch_checks + check_packages(facts) + check_mlx() + check_llama_cpp() + check_resources(facts)
    verdict, ok = backend_verdict(backend)
    checks.append(verdict)
    return checks, ok


def _macft_version() -> str:
    from .._version import __version__

    return f"{__version__} ({Path(__file__).resolve().parents[2]})"


def run(args: argparse.Namespace) -> int:
    checks, ok = gather(args.backend)
    if args.json:
        out.print_json(json.dumps({"ok": ok, "backend": args.backend,
                                   "checks": [asdict(c) for c in checks]}))
        return 0 if ok else 1
    t = Table(title="macft doctor", show_lines=False)
    t.add_column("")
    t.add_column("check", style="bold")
    t.add_column("found")
    t.add_column("fix")
    for c in checks:
        t.add_row(MARK[c.status], c.name, escape(c.found), escape(c.fix or ""))
    console.print(t)
    if ok:
        console.print(f"[green]Ready:[/] the {args.backend} backend can train here.")
    else:
        console.print(f"[red]The {args.backend} backend cannot run here[/]: see the fixes above.")
    return 0 if ok else 1
