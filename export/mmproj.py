"""Keep a multimodal model's image path: the vision projector as an mmproj GGUF.

A text-only LoRA on Gemma-3 4B+ leaves the vision tower and projector untouched, so the
merged model still has them; llama.cpp takes them as a second GGUF (``convert_hf_to_gguf.py
--mmproj``) loaded beside the text model (``llama-mtmd-cli`` / ``llama-server --mmproj``, LM
Studio with both files in one folder). People complain that fine-tuned Gemma-3 GGUFs lose
vision: this keeps it, and checks that llama.cpp loads the pair and answers about an image.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from macft.errors import MacftError

from .convert import _run_to
from .llama_cpp import LlamaCpp

_MAP = re.compile(r"MMPROJ_MODEL_MAP[^=]*=\s*\{(.*?)\n\}", re.S)


def mmproj_architectures(root: Path) -> set[str]:
    """Architectures whose projector the converter can write, read from its source (not imported)."""
    f = root / "conversion" / "__init__.py"
    if not f.is_file():
        return set()
    m = _MAP.search(f.read_text(encoding="utf-8", errors="replace"))
    return set(re.findall(r"^\s*[\"']([A-Za-z0-9_.]+)[\"']\s*:", m.group(1), re.M)) if m else set()


def convert_mmproj(tools: LlamaCpp, model_dir: Path, out: Path) -> str:
    """The vision projector of ``model_dir`` -> an f16 mmproj GGUF at ``out``."""
    tmp = out.with_name(out.name + ".tmp")
    cmd = [sys.executable, str(tools.convert_hf), str(model_dir), "--mmproj", "--outtype", "f16",
           "--outfile", str(tmp)]
    return _run_to(cmd, tools, tmp, out, "The vision projector could not be converted to an mmproj GGUF; "
                   "the text GGUF files are unaffected. Check the converter's message above.")


def write_test_image(path: Path) -> Path:
    """A small PNG (two coloured halves) for the multimodal check."""
    import numpy as np
    from PIL import Image

    a = np.zeros((64, 64, 3), np.uint8)
    a[:32, :, 0] = 255
    a[32:, :, 2] = 255
    Image.fromarray(a).save(path)
    return path


@dataclass
class MMProjCheck:
    ok: bool
    image_encoded: bool
    answer: str
    seconds: float
    log_tail: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"loaded_and_answered": self.ok, "image_encoded": self.image_encoded,
                "answer": self.answer[:200], "seconds": self.seconds}


def check_pair(tools: LlamaCpp, text_gguf: Path, mmproj: Path, image: Path, threads: int = 0) -> MMProjCheck:
    """llama-mtmd-cli loads the text GGUF with the projector and answers a question about ``image``."""
    exe = tools.tool("llama-mtmd-cli")
    cmd = [str(exe), "-m", str(text_gguf), "--mmproj", str(mmproj), "--image", str(image),
           "-p", "What is in this image?", "-n", "16", "--temp", "0", "--seed", "0", "--no-warmup"]
    if threads:
        cmd += ["-t", str(threads)]
    t0 = time.time()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise MacftError(f"llama-mtmd-cli could not run: {e}",
                         "Run `macft setup llama-cpp` again (it builds llama-mtmd-cli).") from None
    log = (r.stdout + "\n" + r.stderr).splitlines()
    encoded = any("encoding done" in line or "image slice encoded" in line or "image decoded" in line
                  for line in log)
    return MMProjCheck(r.returncode == 0 and encoded, encoded, r.stdout.strip(),
                       round(time.time() - t0, 2), log[-12:])
