"""macft: fine-tune small open LLMs on your own chat data and take home a verified GGUF.

The Python API (documented in :mod:`macft.api`; the ``macft`` commands are thin adapters over it)::

    import macft

    run = macft.train(model="google/gemma-3-1b-it", data="examples/data/nya_chat", iters=200)
    chat = macft.load_chat_model(run)
    print(chat.generate("Hello!").text)
    result = macft.export(run, quant="q4_k_m")

``import macft`` stays light: the names below are imported on first use (no torch, mlx or
transformers until a function runs).
"""

from __future__ import annotations

from typing import Any

from ._version import __version__

__all__ = ["__version__", "train", "open_run", "export", "load_chat_model", "estimate", "Run", "RunConfig"]

# name -> the module that defines it
_LAZY = {"train": "api", "export": "api", "load_chat_model": "api", "estimate": "api",
         "open_run": "run", "Run": "run", "RunConfig": "config"}


def __getattr__(name: str) -> Any:
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module 'macft' has no attribute {name!r}")
    if where == "api":
        from . import api as module
    elif where == "run":
        from . import run as module  # type: ignore[no-redef]
    else:
        from . import config as module  # type: ignore[no-redef]
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
