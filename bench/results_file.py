"""``bench/RESULTS.md``: each benchmark script owns one ``## <section>`` and rewrites only it."""

from __future__ import annotations

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
