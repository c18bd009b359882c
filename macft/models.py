"""Find a base model on disk or on the Hugging Face hub, and make sure its weights are usable.

Light on purpose: no torch, no mlx (torch only to convert pickled weights, imported then).
Every command that loads a base (train on both backends, estimate, export, chat, generate,
eval) calls :func:`resolve_model_path` first, so what it decides holds for all of them:

- ``*.safetensors`` weights are checked cheaply (:func:`check_weights`): each file's header
  parsed, its size compared with what the header describes, the index's shards present.
  An interrupted download or copy is reported at start, naming the file, instead of a
  loader's traceback (or the end of a long training run);
- PyTorch pickle weights (``pytorch_model.bin``, or its shards and index) are converted once
  to safetensors in the cache (:func:`convert_pickled`), so every backend and the export
  read the same files. The pickles are read with ``torch.load(weights_only=True)``: no
  code from the checkpoint runs.

The backends then load the weights their own way; the config is read by
:mod:`macft.model_info`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from .errors import MacftError, is_disk_full, os_error_message
from .safetensors_header import BrokenFile, read_header

# spiece.model: T5Tokenizer-style SentencePiece (rinna); *.txt: merges.txt of GPT-2 style BPE
TOKENIZER_PATTERNS = ["*.json", "tokenizer.model", "spiece.model", "*.jinja", "*.txt", "*.tiktoken"]
MODEL_PATTERNS = TOKENIZER_PATTERNS + ["*.safetensors", "*.safetensors.index.json"]
PICKLE_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
# files that are weights (never copied beside converted weights)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt", ".onnx")
ENV_CACHE = "MACFT_CACHE_DIR"


def is_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def cache_root() -> Path:
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("macft"))


def resolve_model_path(name: str, revision: str | None = None, tokenizer_only: bool = False) -> Path:
    """A local directory, or a hub id downloaded (or found in the HF cache); with weights
    checked (safetensors) or converted (pickles) unless only the tokenizer is wanted."""
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir():
            raise MacftError(f"Model path {p} is a file; expected a model directory.",
                             "Pass the directory that holds config.json and the *.safetensors files.")
        p = p.resolve()
        if tokenizer_only:
            # cheap, and it makes `macft estimate` (which reads no weights) refuse a damaged copy too
            if _safetensors_files(p):
                check_weights(p)
            return p
        return usable_weights(p)
    if not is_hub_id(name):
        raise MacftError(f"Model {name} does not exist: it is neither a local directory nor a "
                         "Hugging Face hub id (owner/name).",
                         "Check the path, or give a hub id such as google/gemma-3-1b-it.")
    snap = _download(name, revision, TOKENIZER_PATTERNS if tokenizer_only else MODEL_PATTERNS)
    if tokenizer_only:
        return snap
    if not _safetensors_files(snap):
        # Older repositories publish only pickles: fetch those, then convert them like a local copy.
        snap = _download(name, revision, TOKENIZER_PATTERNS + PICKLE_PATTERNS)
    return usable_weights(snap, hub_id=name)


def _download(name: str, revision: str | None, patterns: list[str]) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise MacftError("Downloading from the hub needs 'huggingface_hub'.", "pip install huggingface_hub") from None
    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - network, auth, missing repo
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        gated = "gated" in str(e).lower() or "401" in str(e) or "403" in str(e)
        hint = ("Accept the model's licence on huggingface.co and run `huggingface-cli login`."
                if gated else "Check the id and your network, or download the model and pass its directory.")
        if os.environ.get("HF_HUB_OFFLINE"):
            hint = "HF_HUB_OFFLINE is set: download the model first or pass a local directory."
        raise MacftError(f"Could not get model '{name}' from the Hugging Face hub: {first}", hint) from None


def usable_weights(model_dir: Path, hub_id: str | None = None) -> Path:
    """``model_dir`` with its safetensors checked, or the converted copy of its pickles.
    A directory without weights (a config alone, for ``macft estimate``) is returned as is:
    the loaders say what is missing."""
    if _safetensors_files(model_dir):
        check_weights(model_dir, hub_id)
        return model_dir
    if _pickle_files(model_dir):
        return convert_pickled(model_dir, hub_id)
    return model_dir


def _safetensors_files(model_dir: Path) -> list[Path]:
    return sorted(p for p in model_dir.glob("*.safetensors") if not p.name.startswith("adapter"))


def _pickle_files(model_dir: Path) -> list[Path]:
    index = model_dir / PICKLE_INDEX
    if index.is_file():
        names = _index_shards(index)
        missing = [n for n in names if not (model_dir / n).is_file()]
        if missing:
            raise MacftError(f"{index} names {len(missing)} shard(s) that are not there: "
                             f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}.",
                             _refetch_hint(model_dir, None))
        return [model_dir / n for n in names]
    single = model_dir / "pytorch_model.bin"
    if single.is_file():
        return [single]
    return sorted(model_dir.glob("pytorch_model-*.bin"))


def _index_shards(index: Path) -> list[str]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise MacftError(f"{index} is not valid JSON ({e}).", _refetch_hint(index.parent, None)) from None
    except OSError as e:
        raise MacftError(*os_error_message(e, "reading the model's weight index")) from None
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
        raise MacftError(f"{index} has no valid 'weight_map' (tensor name -> file).",
                         _refetch_hint(index.parent, None))
    names = list(dict.fromkeys(wm.values()))
    bad = [n for n in names if Path(n).name != n]  # a file name, never a path out of the directory
    if bad:
        raise MacftError(f"{index} names shard files outside the model directory: {', '.join(bad[:3])}.",
                         _refetch_hint(index.parent, None))
    return names


# --------------------------------------------------------------------------- integrity


def _hub_id_of(model_dir: Path) -> str | None:
    """The hub id of a directory inside the HF cache (.../models--owner--name/snapshots/<rev>)."""
    for part in model_dir.resolve().parts:
        m = re.fullmatch(r"models--([^/]+?)--(.+)", part)
        if m:
            return f"{m.group(1)}/{m.group(2)}"
    return None


def _refetch_hint(model_dir: Path, hub_id: str | None) -> str:
    hub_id = hub_id or _hub_id_of(model_dir)
    if hub_id:
        return (f"Download it again: `huggingface-cli download {hub_id} --force-download` "
                f"(or delete the cache entry {model_dir} and run the command again).")
    return (f"Copy the model directory {model_dir} again from where it came from (or download it again): "
            "the copy on disk is incomplete or damaged.")


def check_weights(model_dir: Path, hub_id: str | None = None) -> None:
    """Every ``*.safetensors`` file of ``model_dir`` complete (size = 8 + header + data) and
    every shard its index names present; else a MacftError naming the file and the fix."""
    hint = _refetch_hint(model_dir, hub_id)
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        missing = [n for n in _index_shards(index) if not (model_dir / n).is_file()]
        if missing:
            raise MacftError(f"{index} names {len(missing)} shard(s) that are not in {model_dir}: "
                             f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} (an incomplete "
                             "download or copy).", hint)
    for f in _safetensors_files(model_dir):
        try:
            header = read_header(f)
            header.check_byte_counts()
        except BrokenFile as e:
            raise MacftError(f"{f} is damaged: {e} (an interrupted download or copy?).", hint) from None
        except OSError as e:
            raise MacftError(*os_error_message(e, "reading the model's weights")) from None
        expected, size = header.file_size, f.stat().st_size
        if size < expected:
            raise MacftError(f"{f} is incomplete: its header describes {expected} bytes, the file holds "
                             f"{size} ({expected - size} missing; an interrupted download or copy).", hint)
        if size > expected:
            raise MacftError(f"{f} is damaged: its header describes {expected} bytes, the file holds "
                             f"{size} ({size - expected} too many).", hint)


# --------------------------------------------------------------------------- pickles -> safetensors


def converted_dir(src: Path) -> Path:
    """Where the safetensors copy of ``src``'s pickles goes: keyed by the source path and the
    size and modification time of every file in it (a changed file makes a new copy)."""
    h = hashlib.sha256(str(src.resolve()).encode())
    for p in sorted(src.iterdir()):
        if p.is_file():
            st = p.stat()
            h.update(f"|{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", src.resolve().name).strip("-.") or "model"
    if slug in ("snapshots",) or re.fullmatch(r"[0-9a-f]{40}", slug):
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", _hub_id_of(src) or "model")
    return cache_root() / "converted" / f"{slug}-{h.hexdigest()[:12]}"


def conversion_command(src: Path) -> str:
    return (f"pip install torch && python -c \"from macft.models import convert_pickled; "
            f"print(convert_pickled(__import__('pathlib').Path('{src}')))\"")


def convert_pickled(src: Path, hub_id: str | None = None) -> Path:
    """A safetensors copy of ``src``'s ``pytorch_model*.bin`` weights (made once, in the cache)
    with its config and tokenizer files; returns its directory."""
    from .ui import info

    src = Path(src)
    bins = _pickle_files(src)
    dst = converted_dir(src)
    if (dst / "config.json").is_file() or _safetensors_files(dst):
        info(f"{src} holds PyTorch pickle weights: using their safetensors copy in {dst}.")
        return dst
    try:
        import torch
    except ImportError:
        raise MacftError(
            f"{src} holds its weights as PyTorch pickles ({bins[0].name}"
            f"{f' and {len(bins) - 1} more' if len(bins) > 1 else ''}); macft reads safetensors and converts "
            "pickles once, which needs torch (not installed here).",
            f"Convert it once (torch is needed only for this): {conversion_command(src)}") from None
    dst.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temporaries(dst.parent)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        _copy_side_files(src, tmp)
        tied = _ties_embeddings(src)
        weight_map: dict[str, str] = {}
        total = 0
        for i, b in enumerate(bins, start=1):
            state = _load_pickle(torch, b, src, hub_id)
            tensors = _unshare(state, tied)
            name = "model.safetensors" if len(bins) == 1 else f"model-{i:05d}-of-{len(bins):05d}.safetensors"
            from safetensors.torch import save_file

            try:
                save_file(tensors, str(tmp / name), metadata={"format": "pt"})
            except Exception as e:  # noqa: BLE001 - safetensors reports I/O errors as its own type
                if not is_disk_full(e):
                    raise
                raise OSError(errno.ENOSPC, "No space left on device", str(tmp / name)) from None
            weight_map.update({k: name for k in tensors})
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            del state, tensors
        if len(bins) > 1:
            (tmp / SAFETENSORS_INDEX).write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2), encoding="utf-8")
        try:
            os.replace(tmp, dst)
        except OSError:
            if not (dst / "config.json").is_file():  # not a copy made by another process meanwhile
                raise
    except OSError as e:
        raise MacftError(*os_error_message(e, f"converting {src}'s pickle weights to safetensors")) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    info(f"{src} holds PyTorch pickle weights: converted once to safetensors in {dst} (reused from now on).")
    return dst


def _remove_dead_temporaries(root: Path) -> None:
    """Half-made copies of conversions that were killed (their process is gone)."""
    for d in root.glob(".*.tmp-*"):
        pid = d.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except OSError:
            pass


def _copy_side_files(src: Path, dst: Path) -> None:
    for p in src.iterdir():
        if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES) and p.name != PICKLE_INDEX:
            shutil.copy2(p, dst / p.name)


def _ties_embeddings(src: Path) -> bool:
    try:
        raw = json.loads((src / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True
    if not isinstance(raw, dict):
        return True
    for d in (raw, raw.get("text_config") if isinstance(raw.get("text_config"), dict) else {}):
        if "tie_word_embeddings" in d:
            return bool(d["tie_word_embeddings"])
    return True  # transformers' default


def _load_pickle(torch, path: Path, src: Path, hub_id: str | None) -> dict:
    try:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # the legacy (pre-zip) format cannot be mapped: read it whole
                raise
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM, errno.ENOENT, errno.EIO):
            raise MacftError(*os_error_message(e, "reading the model's weights")) from None
        raise MacftError(f"{path} cannot be read as PyTorch weights: {e} (a truncated or damaged file?).",
                         _refetch_hint(src, hub_id)) from None
    except Exception as e:  # noqa: BLE001 - a damaged zip, a pickle with code in it, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise MacftError(f"{path} cannot be read as PyTorch weights (torch.load with weights_only=True): "
                         f"{first}", _refetch_hint(src, hub_id)
                         + " A checkpoint that needs code to load is refused on purpose.") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MacftError(f"{path} does not hold a dictionary of tensors (a model's state dict).",
                         _refetch_hint(src, hub_id))
    return state


OUTPUT_HEADS = ("lm_head.weight", "embed_out.weight")


def _unshare(state: dict, tied: bool) -> dict:
    """Tensors safetensors can store: contiguous, no two sharing memory. A tied output head
    (the input embedding under a second name) is left out, as transformers saves it; any
    other shared tensor is cloned. Dtypes are kept (bf16 stays bf16)."""
    seen: dict[int, list[str]] = {}
    out = {}
    # input embeddings first, so a tied head is the one that finds its storage taken
    for name in sorted(state, key=lambda k: (k.endswith(OUTPUT_HEADS), k)):
        t = state[name]
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            twin = [n for n in seen[ptr] if state[n].storage_offset() == t.storage_offset()
                    and state[n].shape == t.shape]
            if tied and twin and name.endswith(OUTPUT_HEADS):
                continue
            t = t.clone()
        elif t.numel():
            seen.setdefault(ptr, []).append(name)
        out[name] = t.contiguous()
    return out
