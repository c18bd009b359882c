"""Run a command on a small, size-limited file system, to test what a full disk does.

Linux only: ``unshare --user --map-root-user --mount`` gives the command a private
mount namespace in which an unprivileged user may mount a tmpfs of a fixed size. The
tmpfs disappears with the namespace, so the script copies what the command left on it
to ``snapshot`` before leaving. Where the machine does not allow this (macOS, containers
without user namespaces), :func:`available` is False and tests skip.
"""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path


@functools.cache
def available() -> bool:
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return False
    probe = Path(f"/tmp/macft-smallfs-probe-{os.getpid()}")
    probe.mkdir(exist_ok=True)
    try:
        r = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            f"mount -t tmpfs -o size=64k tmpfs {shlex.quote(str(probe))} && "
                            f"df -k {shlex.quote(str(probe))} >/dev/null"],
                           capture_output=True, timeout=30)
        return r.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def run(cmd: list[str], mountpoint: Path, size: str, snapshot: Path, *,
        env: dict[str, str] | None = None, cwd: Path | None = None,
        timeout: float = 900, prepare: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` with a tmpfs of ``size`` (e.g. "200k", "30m") mounted on ``mountpoint``.

    ``prepare``: a directory whose contents are copied onto the tmpfs first (e.g. a run to
    resume). Whatever is on the tmpfs afterwards is copied to ``snapshot``. Returns the
    command's completed process (its return code, stdout and stderr)."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    q = shlex.quote
    steps = [f"mount -t tmpfs -o size={q(size)} tmpfs {q(str(mountpoint))}"]
    if prepare is not None:
        steps.append(f"cp -a {q(str(prepare))}/. {q(str(mountpoint))}/")
    script = (" && ".join(steps) + " || exit 97\n"
              + " ".join(q(c) for c in cmd) + "\nrc=$?\n"
              + f"cp -a {q(str(mountpoint))}/. {q(str(snapshot))}/ 2>/dev/null\nexit $rc\n")
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
