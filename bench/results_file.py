"""``bench/RESULTS.md``: each benchmark script owns one ``## <section>`` and rewrites only it."""

from __future__ import annotations

import os
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def write_section(section: str, text: str, path: Path = RESULTS) -> None:
    """Replace the ``## {section}`` block of the results file with ``text`` (appended when new)."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    head = f"## {section}"
    if head in old:
        start = old.index(head)
        nxt = old.find("\n## ", start + len(head))
        old = old[:start].rstrip("\n") + "\n\n" + (old[nxt + 1:] if nxt >= 0 else "")
    path.write_text(old.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n")


def machine() -> str:
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{os.cpu_count()}-core {platform.machine()} CPU ({cpu}), no GPU, "
            f"{psutil.virtual_memory().total / 1024 ** 3:.0f} GB RAM")
