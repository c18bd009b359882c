"""MLX itself: importing it with one clear message when it is missing, and where it runs.

A leaf of the package: the backend (``__init__``), training and inference all ask here.
"""

from __future__ import annotations

from typing import Any

from ..errors import MacftError

INSTALL_HINT = ("pip install 'macft[mlx]'  (macOS: mlx with Metal; Linux: mlx[cpu])")


def import_mlx() -> Any:
    """``mlx.core``, after checking that mlx and mlx-lm are installed."""
    try:
        import mlx.core as mx
        import mlx_lm  # noqa: F401
    except ImportError as e:
        raise MacftError(f"The MLX backend needs mlx and mlx-lm: {e}", INSTALL_HINT) from None
    return mx


def on_metal() -> bool:
    mx = import_mlx()
    try:
        return bool(mx.metal.is_available())
    except AttributeError:
        return False
