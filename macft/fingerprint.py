"""A fingerprint of a base model's weights, to catch an adapter applied to the wrong base.

An adapter only means something on the exact weights it was trained on. Another
fine-tune of the same architecture has the same shapes, so nothing fails: the merge
"works" and the model talks nonsense. ``macft train`` records
:func:`base_fingerprint` in the run's ``config.yaml``; export, chat, generate and
eval compare it with the base they are given (:func:`compare`).

What is hashed, per sampled tensor: its name, shape and the first
:data:`SAMPLE_ELEMENTS` values rounded to bfloat16 (round-to-nearest-even, as torch
does). Rounding makes the fingerprint independent of the storage dtype: the same
model saved in fp32 and in bf16 (``torch_dtype`` conversions, our own
pytorch_model.bin -> safetensors copy) has the same fingerprint. The config hash
ignores keys that do not change the weights' meaning.

Light on purpose: numpy and the standard library only (no torch, no mlx).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .safetensors_header import BrokenFile, read_header

SAMPLE_TENSORS = 6
SAMPLE_ELEMENTS = 4096
# config.json keys that differ between copies of the same weights
CONFIG_IGNORED = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "use_cache",
                  "architectures_version", "_commit_hash", "auto_map"}
_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


@dataclass
class Comparison:
    same: bool  # nothing differs that was compared
    differing: list[str] = field(default_factory=list)  # tensor names whose values differ
    compared: int = 0  # tensors compared
    config_differs: bool = False

    def describe(self) -> str:
        if self.same and not self.config_differs:
            return f"the base matches ({self.compared} tensors compared)"
        parts = []
        if self.differing:
            shown = ", ".join(self.differing[:3]) + (" ..." if len(self.differing) > 3 else "")
            parts.append(f"{len(self.differing)} of {self.compared} sampled tensors hold different "
                         f"values ({shown})")
        if self.config_differs:
            parts.append("its config.json differs")
        return "; ".join(parts)


def _config_hash(model_dir: Path) -> str | None:
    p = model_dir / "config.json"
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None

    def clean(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items() if k not in CONFIG_IGNORED}
        return v

    text = json.dumps(clean(raw), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _headers(model_dir: Path) -> dict[str, tuple[Path, str, list[int], int]]:
    """tensor name -> (file, dtype, shape, absolute data offset) over every safetensors file
    (a damaged file is skipped: the loaders report it, not us)."""
    out: dict[str, tuple[Path, str, list[int], int]] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        try:
            tensors = read_header(f).tensors
        except (OSError, BrokenFile):
            continue
        for name, t in tensors.items():
            out[name] = (f, t.dtype, list(t.shape), t.begin)
    return out


def _bf16_bits(raw: bytes, dtype: str) -> np.ndarray | None:
    """The values rounded to bfloat16, as uint16 bit patterns; None for non-float dtypes."""
    if dtype == "BF16":
        return np.frombuffer(raw, dtype="<u2").copy()
    if dtype not in _DTYPES:
        return None
    x = np.frombuffer(raw, dtype=np.dtype(_DTYPES[dtype]).newbyteorder("<")).astype(np.float32)
    bits = x.view(np.uint32).astype(np.uint64)
    # round to nearest even on the 16 dropped bits (NaN payloads do not matter here)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).astype(np.uint16)


def _sample_names(names: list[str]) -> list[str]:
    """A stable, spread-out subset: the embedding plus evenly spaced tensors."""
    names = sorted(names)
    if len(names) <= SAMPLE_TENSORS:
        return names
    picked = [n for n in names if any(k in n for k in ("embed_tokens", "wte", "embed_in"))][:1]
    step = len(names) / (SAMPLE_TENSORS - len(picked))
    for i in range(SAMPLE_TENSORS - len(picked)):
        n = names[int(i * step + step / 2)]
        if n not in picked:
            picked.append(n)
    return sorted(picked)


def _hash_tensors(heads: dict[str, tuple[Path, str, list[int], int]], names: list[str]) -> dict[str, str]:
    tensors: dict[str, str] = {}
    for name in names:
        if name not in heads:
            continue
        f, dt, shape, begin = heads[name]
        numel = int(np.prod(shape)) if shape else 1
        count = min(numel, SAMPLE_ELEMENTS)
        size = 2 if dt in ("BF16", "F16") else 8 if dt == "F64" else 4
        try:
            with open(f, "rb") as fh:
                fh.seek(begin)
                raw = fh.read(count * size)
        except OSError:
            continue
        if len(raw) != count * size:
            continue  # a truncated file: the loaders say so, not us
        bits = _bf16_bits(raw, dt)
        if bits is None:
            continue
        h = hashlib.sha256(f"{name}|{shape}|".encode())
        h.update(bits.tobytes())
        tensors[name] = h.hexdigest()[:16]
    return tensors


def base_fingerprint(model_dir: str | Path) -> dict[str, Any]:
    """``{"config": hash, "tensors": {name: hash}}`` of a model directory (cheap: a few KB read)."""
    model_dir = Path(model_dir)
    heads = _headers(model_dir)
    float_names = [n for n, (_, dt, _, _) in heads.items() if dt in ("BF16", *_DTYPES)]
    return {"config": _config_hash(model_dir), "tensors": _hash_tensors(heads, _sample_names(float_names))}


def compare(recorded: dict[str, Any] | None, model_dir: str | Path) -> Comparison | None:
    """Compare a recorded fingerprint with a model directory. None when nothing can be
    compared (no fingerprint recorded: runs made before macft recorded one)."""
    if not recorded or not isinstance(recorded, dict) or not recorded.get("tensors"):
        return None
    model_dir = Path(model_dir)
    rec_t: dict[str, str] = recorded.get("tensors") or {}
    now = _hash_tensors(_headers(model_dir), sorted(rec_t))
    config_now = _config_hash(model_dir)
    common = sorted(set(rec_t) & set(now))
    differing = [n for n in common if rec_t[n] != now[n]]
    config_differs = bool(recorded.get("config") and config_now and recorded["config"] != config_now)
    if not common:
        # no tensor in common (renamed or re-sharded weights): the sampled names differ
        return Comparison(same=False, differing=sorted(rec_t)[:3], compared=0,
                          config_differs=config_differs)
    return Comparison(same=not differing, differing=differing, compared=len(common),
                      config_differs=config_differs)


def check_base(resolved: dict[str, Any], run_dir: str | Path | None, model_dir: str | Path, *,
               force: bool = False, other_base_hint: str = "") -> Comparison | None:
    """Refuse a base whose weights differ from those the run trained on (``--force``: warn and go
    ahead); warn when only its config.json differs; nothing for runs without a fingerprint."""
    from .errors import MacftError
    from .ui import warn

    c = compare(resolved.get("base_fingerprint"), model_dir)
    if c is None:
        return None
    trained_on = resolved.get("model_path") or "its base"
    same_dir = str(Path(str(trained_on)).resolve()) == str(Path(model_dir).resolve()) if trained_on else False
    where = (f"{model_dir} (the directory it was trained on) has changed since" if same_dir else
             f"the base given now, {model_dir}, is not the one it was trained on ({trained_on})")
    if not c.same:
        msg = (f"The run {run_dir} does not match this base model: {where}. {c.describe()[0].upper()}"
               f"{c.describe()[1:]}. An adapter applied to other weights of the same shapes loads without "
               "an error and answers nonsense.")
        if force:
            warn(f"{msg} Going ahead (--force).")
            return c
        raise MacftError(msg, f"Pass the base the run was trained on{other_base_hint}, or add --force to "
                              "use this one anyway.")
    if c.config_differs:
        warn(f"The base model's config.json differs from the one the run {run_dir} was trained with "
             f"({model_dir}; the sampled weights match): check that nothing that changes the model's "
             "behaviour (rope scaling, sliding window, ...) was edited.")
    return c
