"""Obtain, build and locate the llama.cpp tools that export runs.

Two sources:

1. The user's own checkout (``--llama-cpp DIR`` or ``MACFT_LLAMA_CPP``): its converter
   scripts and already-built tools are used as they are.
2. By default, a pinned llama.cpp: the ``llama-cpp-python`` sdist of :data:`PIN_VERSION`
   carries the whole llama.cpp tree under ``vendor/llama.cpp``. macft downloads it with
   pip, checks its SHA-256, extracts that tree and builds only the tools it runs, with
   CMake, into the user cache directory, keyed by version and GPU backend.

llama.cpp's code is only ever run (subprocesses); macft never imports or copies it.
See ``vendor_llama_cpp.md`` for the pin and how to bump it.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from macft.errors import MacftError, ToolError
from macft.models import cache_root

PIN_PACKAGE = "llama-cpp-python"
PIN_VERSION = "0.3.36"
PIN_COMMIT = "0c1e57098"  # ggml-org/llama.cpp commit vendored by that sdist
PIN_BUILD = 11312  # upstream tag b11312
PIN_SDIST = f"llama_cpp_python-{PIN_VERSION}.tar.gz"
PIN_SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
VENDOR_PREFIX = f"llama_cpp_python-{PIN_VERSION}/vendor/llama.cpp/"

# Built for export and its verification. llama-cli needs the server target; completion is enough.
# What every export needs; a user's own checkout must have these.
CORE_TOOLS = ("llama-quantize", "llama-completion", "llama-tokenize", "llama-perplexity")
# The pinned build also has llama-imatrix (the importance matrix from the run's own data, which
# the K- and i-quants use) and llama-mtmd-cli (checks that an exported vision projector (mmproj
# GGUF) loads beside the text GGUF and answers about an image). A user's checkout without them
# exports without an imatrix / without the projector check, and says so.
IMATRIX_TOOL = "llama-imatrix"
TOOLS = (*CORE_TOOLS, IMATRIX_TOOL, "llama-mtmd-cli")
CONVERT_HF = "convert_hf_to_gguf.py"
CONVERT_LORA = "convert_lora_to_gguf.py"

CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",  # self-contained binaries
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_OPENSSL=OFF",  # the tools never download anything
    f"-DLLAMA_BUILD_NUMBER={PIN_BUILD}",  # the sdist's .git is shallow: binaries would say "build 1"
]
# Compile cost of TOOLS measured on x86_64 (about 1050 CPU-seconds for the CPU build, +100 for mtmd).
CPU_SECONDS = {"cpu": 1200, "metal": 1000, "cuda": 7800}

ENV_CHECKOUT = "MACFT_LLAMA_CPP"
ENV_BACKEND = "MACFT_LLAMA_CPP_BACKEND"  # force cpu / cuda / metal for the pinned build
BUILD_MARKER = "macft-build.json"


@dataclass
class LlamaCpp:
    """A llama.cpp tree (converter scripts, gguf-py) and a directory of built tools."""

    root: Path
    bin_dir: Path
    description: str
    backend: str = "cpu"
    notes: list[str] = field(default_factory=list)

    def tool(self, name: str) -> Path:
        exe = self.bin_dir / (name + (".exe" if os.name == "nt" else ""))
        if not exe.is_file():
            raise MacftError(
                f"{exe} does not exist: the llama.cpp build in {self.bin_dir} lacks {name}.",
                f"Build it: cmake --build <build dir> --target {' '.join(TOOLS)}")
        return exe

    @property
    def convert_hf(self) -> Path:
        return self.root / CONVERT_HF

    @property
    def convert_lora(self) -> Path:
        return self.root / CONVERT_LORA

    def script_env(self) -> dict[str, str]:
        """Environment for the converter scripts: the gguf-py beside them, never PyPI's gguf."""
        env = dict(os.environ)
        gguf_py = str(self.root / "gguf-py")
        # converter_site/sitecustomize.py: the config keys the converter's pinned transformers 4
        # would show it (see vendor_llama_cpp.md, "Converter and transformers 5")
        site = str(Path(__file__).resolve().parent / "converter_site")
        env["PYTHONPATH"] = os.pathsep.join(
            [gguf_py, site] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env.pop("NO_LOCAL_GGUF", None)
        return env

    def info(self) -> dict[str, str]:
        return {"source": self.description, "root": str(self.root), "bin_dir": str(self.bin_dir),
                "backend": self.backend}


# --------------------------------------------------------------------------- places


def pin_dir() -> Path:
    return cache_root() / "llama.cpp" / f"b{PIN_BUILD}-py{PIN_VERSION}"


def build_dir(backend: str) -> Path:
    return pin_dir() / f"build-{backend}"


# --------------------------------------------------------------------------- public entry points


def locate(user_dir: str | None = None, *, build: bool = True) -> LlamaCpp:
    """The llama.cpp to use: ``user_dir``, else ``$MACFT_LLAMA_CPP``, else the pinned build."""
    chosen = user_dir or os.environ.get(ENV_CHECKOUT)
    if chosen:
        return user_checkout(Path(chosen).expanduser(), "--llama-cpp" if user_dir else ENV_CHECKOUT)
    if not build:
        found = find_pinned_build()
        if found is None:
            raise MacftError("The pinned llama.cpp is not built yet.", "Run `macft setup llama-cpp`.")
        return found
    return ensure_built()


def source_dir() -> Path:
    """The extracted pinned llama.cpp source tree (downloaded and extracted if needed; not built)."""
    root = pin_dir()
    src = root / "src"
    if (src / CONVERT_HF).is_file():
        return src
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root):
        if not (src / CONVERT_HF).is_file():
            _extract(_sdist(root), src)
    return src


def find_pinned_build() -> LlamaCpp | None:
    backend, _ = detect_backend()
    bdir = build_dir(backend)
    marker = bdir / BUILD_MARKER
    if not marker.is_file():
        return None
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    bin_dir = Path(info.get("bin_dir", bdir / "bin"))
    if not set(TOOLS) <= set(info.get("targets", [])):
        return None
    if not all((bin_dir / t).is_file() for t in TOOLS):
        return None
    src = pin_dir() / "src"
    if not (src / CONVERT_HF).is_file():
        return None
    return LlamaCpp(src, bin_dir, _pin_description(), backend)


def ensure_built(log=None) -> LlamaCpp:
    """Build the pinned tools if needed; returns at once when they are already built."""
    found = find_pinned_build()
    if found is not None:
        return found
    from macft.ui import console

    say = log or console.print
    backend, reason = detect_backend()
    check_toolchain(backend)
    root = pin_dir()
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root, say):
        found = find_pinned_build()
        if found is not None:
            return found
        src = root / "src"
        if not (src / CONVERT_HF).is_file():
            _extract(_sdist(root, say), src, say)
        cores = os.cpu_count() or 1
        minutes = max(1, round(CPU_SECONDS[backend] / cores / 60))
        say(f"Building llama.cpp b{PIN_BUILD} ({backend}{'; ' + reason if reason else ''}) "
            f"once for this machine: about {minutes} minute{'s' if minutes != 1 else ''} on "
            f"{cores} core{'s' if cores != 1 else ''}. It is cached in {root}.")
        bdir = build_dir(backend)
        _build(src, bdir, backend, cores)
    found = find_pinned_build()
    if found is None:  # pragma: no cover - the build said it succeeded
        raise MacftError(f"The llama.cpp build in {build_dir(backend)} is incomplete.",
                         f"Delete {build_dir(backend)} and run `macft setup llama-cpp` again.")
    return found


def user_checkout(path: Path, via: str) -> LlamaCpp:
    if not path.is_dir():
        raise MacftError(f"{via} points at {path}, which is not a directory.",
                         "Pass the root of a llama.cpp checkout (it holds convert_hf_to_gguf.py).")
    if not (path / CONVERT_HF).is_file():
        raise MacftError(
            f"{path} is not a llama.cpp checkout: {CONVERT_HF} is missing.",
            "Pass the root of a llama.cpp checkout, or leave it out to use the pinned llama.cpp.")
    candidates = [path / "build" / "bin", path / "build" / "bin" / "Release", path / "bin", path]
    for c in candidates:
        if all((c / t).is_file() for t in CORE_TOOLS):
            return LlamaCpp(path, c, f"user checkout {path} (via {via})", "user")
    found = {str(c): [t for t in CORE_TOOLS if (c / t).is_file()] for c in candidates if c.is_dir()}
    have = "; ".join(f"{k}: {', '.join(v) or 'none'}" for k, v in found.items()) or "no build directory"
    raise MacftError(
        f"The llama.cpp checkout {path} has no build with all of {', '.join(CORE_TOOLS)} "
        f"(looked in build/bin, build/bin/Release, bin; found {have}).",
        f"Build them: cd {path} && cmake -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_SERVER=OFF "
        f"&& cmake --build build --target {' '.join(CORE_TOOLS)} -j")


def _pin_description() -> str:
    return f"llama.cpp b{PIN_BUILD} (commit {PIN_COMMIT}, from {PIN_PACKAGE} {PIN_VERSION})"


# --------------------------------------------------------------------------- toolchain


def detect_backend() -> tuple[str, str]:
    """(backend, reason): metal on macOS, cuda with nvcc and a visible NVIDIA GPU, else cpu."""
    forced = os.environ.get(ENV_BACKEND, "").strip().lower()
    if forced:
        if forced not in CPU_SECONDS:
            raise MacftError(f"{ENV_BACKEND}={forced} is not a llama.cpp backend macft builds.",
                             f"Use one of: {', '.join(CPU_SECONDS)}, or unset it.")
        return forced, f"forced by {ENV_BACKEND}"
    if sys.platform == "darwin":
        return ("metal", "") if platform.machine() == "arm64" else ("cpu", "Intel Mac")
    if shutil.which("nvcc"):
        if _nvidia_gpu_visible():
            return "cuda", ""
        return "cpu", "nvcc found but no NVIDIA GPU visible"
    return "cpu", ""


def _nvidia_gpu_visible() -> bool:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return Path("/dev/nvidia0").exists()
    try:
        r = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0 and "GPU" in r.stdout


def install_hint() -> str:
    if sys.platform == "darwin":
        return ("Install the Xcode command line tools (`xcode-select --install`) and CMake "
                "(`brew install cmake`, or `pip install cmake`).")
    if Path("/etc/debian_version").exists():
        return "sudo apt-get install build-essential cmake   (or: pip install cmake)"
    if Path("/etc/fedora-release").exists() or Path("/etc/redhat-release").exists():
        return "sudo dnf install gcc-c++ make cmake   (or: pip install cmake)"
    if Path("/etc/arch-release").exists():
        return "sudo pacman -S base-devel cmake"
    return "Install a C++17 compiler (g++ >= 9 or clang++ >= 10) and CMake >= 3.14 (pip install cmake)."


def check_toolchain(backend: str) -> None:
    """Raise one error naming everything missing to build llama.cpp, and what to install."""
    missing = []
    if not shutil.which("cmake"):
        missing.append("CMake (the `cmake` command)")
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        missing.append("a C++ compiler (c++, g++ or clang++)")
    if not any(shutil.which(c) for c in ("cc", "gcc", "clang")):
        missing.append("a C compiler (cc, gcc or clang)")
    if missing:
        raise MacftError(
            "Building the pinned llama.cpp needs " + " and ".join(missing) + ", which this machine "
            "lacks (searched PATH).",
            install_hint() + " Or pass --llama-cpp DIR with a llama.cpp you built yourself.")
    if backend == "cuda" and not shutil.which("nvcc"):
        raise MacftError("A CUDA build of llama.cpp needs nvcc, which is not on PATH.",
                         f"Install the CUDA toolkit, or set {ENV_BACKEND}=cpu.")


# --------------------------------------------------------------------------- obtain


def _sdist(root: Path, say=None) -> Path:
    """The pinned sdist in ``root`` (downloaded with pip if absent), its SHA-256 checked."""
    path = root / PIN_SDIST
    if not path.is_file():
        if say:
            say(f"Downloading {PIN_PACKAGE} {PIN_VERSION} (source, ~77 MB) from PyPI: it carries "
                f"llama.cpp b{PIN_BUILD}.")
        tmp = root / f".download-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"{PIN_PACKAGE}=={PIN_VERSION}", "-d", str(tmp), "--disable-pip-version-check"]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ToolError(cmd, str(e), _download_hint(path)) from None
        got = tmp / PIN_SDIST
        if r.returncode != 0 or not got.is_file():
            shutil.rmtree(tmp, ignore_errors=True)
            raise ToolError(cmd, r.stdout + r.stderr, _download_hint(path))
        os.replace(got, path)
        shutil.rmtree(tmp, ignore_errors=True)
    digest = _sha256(path)
    if digest != PIN_SDIST_SHA256:
        bad = path.with_name(path.name + ".bad")
        os.replace(path, bad)
        raise MacftError(
            f"{path} has SHA-256 {digest}, expected {PIN_SDIST_SHA256} ({PIN_PACKAGE} {PIN_VERSION} "
            f"as published on PyPI). It was moved to {bad}.",
            "Run the command again to download it afresh; if it keeps happening, check your "
            "package index or proxy.")
    return path


def _download_hint(path: Path) -> str:
    return (f"Check your network or package index. Or download {PIN_SDIST} from "
            f"https://pypi.org/project/{PIN_PACKAGE}/{PIN_VERSION}/#files and place it at {path}; "
            "or pass --llama-cpp DIR with your own llama.cpp build.")


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _extract(sdist: Path, dest: Path, say=None) -> None:
    """Extract ``vendor/llama.cpp`` (without its shallow .git) to ``dest``, atomically."""
    if say:
        say(f"Extracting llama.cpp from {sdist.name}.")
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(sdist, "r:gz") as tar:
        members = []
        for m in tar.getmembers():
            if not m.name.startswith(VENDOR_PREFIX):
                continue
            rel = m.name[len(VENDOR_PREFIX):]
            if not rel or rel == ".git" or rel.startswith(".git/"):
                continue
            m.name = rel
            members.append(m)
        if not members:
            raise MacftError(f"{sdist} holds no {VENDOR_PREFIX} tree.",
                             f"Delete {sdist} and run `macft setup llama-cpp` again.")
        try:
            tar.extractall(tmp, members=members, filter="data")
        except TypeError:  # Python without extraction filters (< 3.10.12 / 3.11.4)
            tar.extractall(tmp, members=members)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)


# --------------------------------------------------------------------------- build


def cmake_args(src: Path, bdir: Path, backend: str) -> list[str]:
    args = ["cmake", "-S", str(src), "-B", str(bdir), *CMAKE_FLAGS]
    if shutil.which("ninja"):
        args += ["-G", "Ninja"]
    if backend == "cuda":
        args += ["-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=native"]
    elif backend == "metal":
        args += ["-DGGML_METAL=ON", "-DGGML_METAL_EMBED_LIBRARY=ON"]
    else:
        args += ["-DGGML_METAL=OFF", "-DGGML_CUDA=OFF"]
    return args


def _build(src: Path, bdir: Path, backend: str, cores: int) -> None:
    from macft.ui import task_progress

    t0 = time.time()
    configure = cmake_args(src, bdir, backend)
    build = ["cmake", "--build", str(bdir), "--config", "Release", "--target", *TOOLS,
             "-j", str(cores)]
    hint = (f"Delete {bdir} and run `macft setup llama-cpp` again. If it fails again, build "
            "llama.cpp yourself and pass --llama-cpp DIR (see vendor_llama_cpp.md).")
    with task_progress(transient=True) as prog:
        task = prog.add_task("configuring llama.cpp (cmake)", total=None)
        _run_streaming(configure, hint, lambda line: None)
        prog.update(task, description=f"compiling llama.cpp ({', '.join(TOOLS)})", total=100, completed=0)

        def on_line(line: str) -> None:
            m = re.match(r"\[(\d+)/(\d+)\]", line)  # ninja
            if m:
                prog.update(task, completed=int(m.group(1)), total=int(m.group(2)))
                return
            m = re.match(r"\[\s*(\d+)%\]", line)  # make
            if m:
                prog.update(task, completed=int(m.group(1)), total=100)

        _run_streaming(build, hint, on_line)
    bin_dir = bdir / "bin"
    if not all((bin_dir / t).is_file() for t in TOOLS) and (bin_dir / "Release").is_dir():
        bin_dir = bin_dir / "Release"
    missing = [t for t in TOOLS if not (bin_dir / t).is_file()]
    if missing:
        raise MacftError(f"The llama.cpp build finished but {', '.join(missing)} is missing in {bin_dir}.",
                         hint)
    marker = {"pin": _pin_description(), "backend": backend, "targets": list(TOOLS),
              "bin_dir": str(bin_dir), "cmake": configure, "seconds": round(time.time() - t0, 1),
              "cores": cores, "built": time.strftime("%Y-%m-%d %H:%M:%S")}
    tmp = bdir / (BUILD_MARKER + ".tmp")
    tmp.write_text(json.dumps(marker, indent=2))
    os.replace(tmp, bdir / BUILD_MARKER)


def _run_streaming(cmd: list[str], hint: str, on_line) -> None:
    tail: collections.deque[str] = collections.deque(maxlen=40)
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", bufsize=1)
    except OSError as e:
        raise ToolError(cmd, str(e), hint) from None
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            tail.append(line.rstrip())
            on_line(line)
        rc = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if rc != 0:
        raise ToolError(cmd, "\n".join(tail), hint)


# --------------------------------------------------------------------------- locking


@contextlib.contextmanager
def _locked(root: Path, say=None) -> Iterator[None]:
    """One process at a time downloads, extracts or builds in ``root`` (``filelock``: ``flock``
    on Unix, so the lock goes with the process that held it, however it ended)."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(root / ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if say:
            say(f"Waiting for another macft process that is setting up llama.cpp in {root} ...")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()
