"""Read raw records (dicts) from files, directories or Hugging Face dataset ids.

Each record comes with its :class:`~macft.errors.Location` so that every later
error can name the file and the line. Files may start with a byte-order mark and
use CRLF line ends.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError, Location, MacftError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
TRAIN_NAMES = ("train",)
VALID_NAMES = ("valid", "validation", "val", "dev", "eval")


@dataclass
class Record:
    data: dict[str, Any]
    where: Location


def find_split_file(directory: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        for suf in SUFFIXES:
            p = directory / f"{name}{suf}"
            if p.is_file():
                return p
    return None


def resolve_sources(train: str, valid: str | None) -> tuple[str, str | None]:
    """Turn ``--data``/``--valid`` into a train source and an optional validation source.

    A directory must hold ``train.<ext>`` and may hold ``valid.<ext>``; an explicit
    ``--valid`` wins over the directory's validation file.
    """
    p = Path(train).expanduser()
    if p.is_dir():
        t = find_split_file(p, TRAIN_NAMES)
        if t is None:
            present = sorted(x.name for x in p.iterdir())[:10]
            raise MacftError(
                f"{p} is a directory without a train file (looked for train.jsonl, train.json, "
                f"train.csv, train.parquet); it holds: {', '.join(present) or 'nothing'}.",
                "Name the training file train.jsonl (validation: valid.jsonl), or pass the file itself to --data.")
        v = valid or (str(f) if (f := find_split_file(p, VALID_NAMES)) else None)
        return str(t), v
    if p.exists():
        return str(p), valid
    if looks_like_hub_id(train):
        return train, valid
    raise MacftError(f"Data path {train} does not exist.",
                     "Check the path given to --data (a file, a directory, or a Hugging Face dataset id).")


def looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return (len(parts) == 2 and all(parts) and not s.startswith((".", "/", "~"))
            and Path(s).suffix.lower() not in SUFFIXES)


def read_records(source: str, split: str = "train") -> list[Record]:
    """All records of one source. Raises DataError for unreadable or empty input."""
    p = Path(source).expanduser()
    if not p.exists():
        if looks_like_hub_id(source):
            return list(_read_hub(source, split))
        raise MacftError(f"Data path {source} does not exist.", "Check the path.")
    suf = p.suffix.lower()
    if suf == ".jsonl":
        recs = list(_read_jsonl(p))
    elif suf == ".json":
        recs = list(_read_json(p))
    elif suf == ".csv":
        recs = list(_read_csv(p))
    elif suf == ".parquet":
        recs = list(_read_parquet(p))
    else:
        raise DataError(Location(str(p)), f"unsupported file type '{suf or '(none)'}'",
                        hint="Use .jsonl, .json, .csv or .parquet.")
    if not recs:
        raise DataError(Location(str(p)), "the file holds no records",
                        hint="Add at least one example, one JSON object per line.")
    return recs


def _read_jsonl(p: Path) -> Iterator[Record]:
    # utf-8-sig strips a byte-order mark; text mode turns CRLF into LF.
    with open(p, encoding="utf-8-sig") as f:
        for i, line in enumerate(f, start=1):
            s = line.strip()
            if not s:
                continue
            where = Location(str(p), i)
            try:
                obj = json.loads(s)
            except json.JSONDecodeError as e:
                raise DataError(where, f"invalid JSON ({e.msg} at column {e.colno})",
                                hint="Each line must hold exactly one JSON object.") from None
            if not isinstance(obj, dict):
                raise DataError(where, f"expected a JSON object, found {type(obj).__name__}",
                                hint="Each line must hold one JSON object such as {\"messages\": [...]}.")
            yield Record(obj, where)


def _read_json(p: Path) -> Iterator[Record]:
    text = p.read_text(encoding="utf-8-sig")
    if not text.strip():
        return
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(Location(str(p), e.lineno), f"invalid JSON ({e.msg} at column {e.colno})",
                        hint="A .json file must hold one array of objects; use .jsonl for one object per line.") from None
    if isinstance(obj, dict):
        # {"data": [...]} / {"train": [...]} and similar single-list wrappers
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) == 1:
            obj = lists[0]
        else:
            obj = [obj]
    if not isinstance(obj, list):
        raise DataError(Location(str(p)), f"expected an array of objects, found {type(obj).__name__}")
    for i, item in enumerate(obj, start=1):
        where = Location(str(p), i, "item")
        if not isinstance(item, dict):
            raise DataError(where, f"expected a JSON object, found {type(item).__name__}")
        yield Record(item, where)


def _read_csv(p: Path) -> Iterator[Record]:
    with open(p, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            return
        for i, row in enumerate(reader, start=2):  # line 1 is the header
            if all((v or "").strip() == "" for v in row.values()):
                continue
            rec = {k.strip(): _maybe_json(v) for k, v in row.items() if k is not None}
            yield Record(rec, Location(str(p), i))


def _maybe_json(v: str | None) -> Any:
    """CSV cells holding a JSON list (e.g. a messages column) are decoded."""
    if v is None:
        return None
    s = v.strip()
    if s.startswith("[") and s.endswith("]"):
        try:
            return json.loads(s)
        except json.JSONDecodeError:
            return v
    return v


def _read_parquet(p: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    table = pq.read_table(p)
    for i, row in enumerate(table.to_pylist(), start=1):
        yield Record(row, Location(str(p), i, "row"))


def _read_hub(name: str, split: str) -> Iterator[Record]:
    try:
        import datasets
    except ImportError:
        raise MacftError(f"{name} looks like a Hugging Face dataset id, but the 'datasets' package is missing.",
                         "pip install datasets") from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 - hub errors come in many types
        raise MacftError(f"Could not load the Hugging Face dataset '{name}' (split '{split}'): {e}",
                         "Check the id and your network, or download the data and pass the file.") from None
    for i, row in enumerate(ds, start=1):
        yield Record(dict(row), Location(f"{name}[{split}]", i, "item"))
