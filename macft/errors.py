"""User-facing errors.

Library code raises these; the CLI catches them once, prints one paragraph
(what was found, what was expected, the exact fix) and exits with code 2.
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class MacftError(Exception):
    """An error the user can fix. ``hint`` is the fix, printed on its own line."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\nFix: {self.hint}"


class Diverged(MacftError):
    """Training produced a non-finite loss or gradient (a learning rate too high, fp16, bad data)."""


class ConfigError(MacftError):
    """Every configuration problem found, reported at once."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        where = f" in {source}" if source else ""
        n = len(self.problems)
        head = f"{n} configuration problem{'s' if n != 1 else ''}{where}:"
        body = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{head}\n{body}")


@dataclass(frozen=True)
class Location:
    """Where a record came from: a file and a 1-based line (or row / item index)."""

    path: str
    line: int | None = None
    unit: str = "line"  # "line", "row" (CSV, Parquet) or "item" (JSON arrays, HF datasets)

    def __str__(self) -> str:
        return self.path if self.line is None else f"{self.path}, {self.unit} {self.line}"


class DataError(MacftError):
    """A problem in the user's data, naming the file, the line and the field."""

    def __init__(
        self,
        where: Location | str | Path,
        message: str,
        field: str | None = None,
        hint: str | None = None,
    ):
        self.where = where
        self.field = field
        loc = str(where)
        fld = f", field '{field}'" if field else ""
        super().__init__(f"{loc}{fld}: {message}", hint)


class BackendUnavailable(MacftError):
    """The chosen backend cannot run on this machine; ``problems`` says why."""

    def __init__(self, backend: str, problems: list[str], hint: str | None = None):
        self.backend = backend
        self.problems = problems
        body = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"The '{backend}' backend cannot run here:\n{body}", hint)


class ToolError(MacftError):
    """An external tool (cmake, llama.cpp, a converter) failed."""

    def __init__(self, command: list[str] | str, output_tail: str, hint: str | None = None):
        cmd = command if isinstance(command, str) else " ".join(str(c) for c in command)
        self.command = cmd
        self.output_tail = output_tail
        tail = "\n".join("    " + ln for ln in output_tail.strip().splitlines()[-15:])
        super().__init__(f"This command failed:\n    {cmd}\nIts last output lines:\n{tail}", hint)


def is_disk_full(e: BaseException, where: Path | None = None) -> bool:
    """Whether ``e`` says the disk (or the user's quota) is full, in any of the ways libraries
    report it: an OSError, safetensors' (Rust) error text, a tool's output (ToolError), or MLX's
    bare "Unable to write" (counted as full when under 16 MiB is free at ``where``)."""
    import errno
    import shutil

    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    if not isinstance(e, Exception):
        return False
    text = str(e)
    if any(t in text for t in ("No space left", "StorageFull", "os error 28", "Disk quota")):
        return True
    if "Unable to write" in text and where is not None:
        try:
            return shutil.disk_usage(where).free < 16 * 2**20
        except OSError:
            return False
    return False


def os_error_message(e: OSError, doing: str | None = None) -> tuple[str, str]:
    """(message, fix) for an operating-system error, naming the file and, for a full disk,
    how much room is left."""
    import errno
    import shutil

    path = e.filename or ""
    what = f" while {doing}" if doing else ""
    where = f" ({path})" if path else ""
    if e.errno == errno.ENOSPC:
        free = ""
        probe = Path(path) if path else Path.cwd()
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        try:
            free = f"; {shutil.disk_usage(probe).free / 1e9:.2f} GB free there now"
        except OSError:
            pass
        return (f"The disk is full{what}{where}{free}.",
                "Free some space (or point --output at a bigger disk) and run the command again.")
    if e.errno in (errno.EACCES, errno.EPERM):
        return (f"Permission denied{what}{where}.",
                "Choose a directory you can write to, or fix the file's permissions.")
    if e.errno == errno.EROFS:
        return (f"The file system is read-only{what}{where}.", "Write to another directory.")
    if e.errno == errno.ENOENT:
        return (f"No such file or directory{what}{where}.", "Check the path.")
    if e.errno == errno.EISDIR:
        return (f"Expected a file but found a directory{what}{where}.", "Pass the file's path.")
    if e.errno == errno.ENOTDIR:
        return (f"Expected a directory but found a file{what}{where}.", "Pass a directory path.")
    return (f"{e.strerror or e}{what}{where}.", "Check the path and the disk, then run the command again.")
