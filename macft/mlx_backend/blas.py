"""A fast BLAS for MLX's CPU build on Linux.

The ``mlx[cpu]`` wheel links the reference (netlib) BLAS: about 3 GFLOP/s for an
fp32 matmul on a 2-core x86 machine. Loading the system's OpenBLAS with
RTLD_GLOBAL *before* mlx is imported makes MLX's matmuls resolve to it (measured:
139 GFLOP/s, training 11x faster, identical losses). On macOS MLX uses Metal and
Accelerate, and nothing here applies.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)
INSTALL_HINT = ("MLX on Linux ships a slow reference BLAS; installing OpenBLAS makes CPU training "
                "10x faster or more: `sudo apt install libopenblas0-pthread` (Debian/Ubuntu) or "
                "`sudo dnf install openblas` (Fedora), or set MACFT_BLAS_LIBRARY to a libopenblas.so.")

_state: dict[str, str | None] = {}


def find_openblas() -> str | None:
    env = os.environ.get("MACFT_BLAS_LIBRARY")
    if env:
        return env if Path(env).exists() else None
    for c in CANDIDATES:
        if Path(c).exists():
            return c
    name = ctypes.util.find_library("openblas")
    return name


def preload_fast_blas() -> str | None:
    """Load OpenBLAS globally if we can still beat mlx to it. Returns its path or None."""
    if "loaded" in _state:
        return _state["loaded"]
    path = None
    if sys.platform.startswith("linux") and "mlx.core" not in sys.modules \
            and os.environ.get("MACFT_BLAS_LIBRARY", "") != "none":
        path = find_openblas()
        if path:
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                path = None
    _state["loaded"] = path
    return path


def status() -> tuple[bool, str]:
    """(fast, message) for `macft doctor` and the training summary."""
    if not sys.platform.startswith("linux"):
        return True, "MLX uses Metal / Accelerate"
    loaded = _state.get("loaded")
    if loaded:
        return True, f"OpenBLAS ({loaded})"
    return False, INSTALL_HINT
