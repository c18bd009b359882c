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

from rich.markup import escape

from ..errors import DataError, Location, MacftError, os_error_message
from .textio import TextFile, open_text

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


def read_records(source: str, split: str = "train", encoding: str = "auto",
                 option: str | None = "--encoding") -> list[Record]:
    """All records of one source. Raises DataError for unreadable or empty input.

    ``encoding``: the text encoding of JSONL / JSON / CSV files ("auto" detects it, see
    :mod:`macft.data.textio`); ``option``: the flag that sets it, for messages (None: none)."""
    p = Path(source).expanduser()
    if not p.exists():
        if looks_like_hub_id(source):
            return list(_read_hub(source, split))
        raise MacftError(f"Data path {source} does not exist.", "Check the path.")
    if p.is_dir():
        raise MacftError(f"{p} is a directory; expected a data file here.",
                         "Pass a .jsonl, .json, .csv or .parquet file.")
    suf = p.suffix.lower()
    try:
        if suf == ".jsonl":
            recs = list(_read_jsonl(p, encoding, option))
        elif suf == ".json":
            recs = list(_read_json(p, encoding, option))
        elif suf == ".csv":
            recs = list(_read_csv(p, encoding, option))
        elif suf == ".parquet":
            recs = list(_read_parquet(p))
        else:
            raise DataError(Location(str(p)), f"unsupported file type '{suf or '(none)'}'",
                            hint="Use .jsonl, .json, .csv or .parquet.")
    except OSError as e:
        msg, fix = os_error_message(e, "reading the data")
        raise MacftError(msg, fix) from None
    if not recs:
        raise DataError(Location(str(p)), "the file holds no records",
                        hint="Add at least one example, one JSON object per line.")
    return recs


def _open(p: Path, encoding: str, option: str | None) -> TextFile:
    tf = open_text(p, encoding, option)
    if tf.note:
        from ..ui import info

        info(f"note: {escape(tf.note)}")
    return tf


# --------------------------------------------------------------------------- JSON


class _DuplicateKey(Exception):
    def __init__(self, key: str, keys: list[str], pos: int | None = None):
        super().__init__(key)
        self.key, self.keys, self.pos = key, keys, pos


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _DuplicateKey(k, [k for k, _ in pairs])
            seen.add(k)
    return d


def parse_json(text: str, path: str, first_line: int = 1, *, hint: str | None = None) -> Any:
    """``json.loads`` for user data: errors become DataErrors naming the line; a key given
    twice in one object (which JSON parsers silently resolve to the last one) is refused."""
    try:
        return json.loads(text, object_pairs_hook=_unique_pairs)
    except json.JSONDecodeError as e:
        raise DataError(Location(path, first_line + e.lineno - 1),
                        f"invalid JSON ({e.msg} at column {e.colno})", hint=hint) from None
    except _DuplicateKey as e:
        pos = _duplicate_position(text)
        line = first_line + (text.count("\n", 0, pos) if pos is not None else 0)
        others = ", ".join(shown(k) for k in dict.fromkeys(e.keys))
        raise DataError(Location(path, line),
                        f"the key {shown(e.key)} appears twice in one object (its keys: {others}); "
                        "JSON readers would silently keep only the last value",
                        hint=f"Keep one {shown(e.key)} in that object (merge the two values if both matter).") from None
    except RecursionError:
        raise DataError(Location(path, first_line), "the JSON is nested too deeply to read",
                        hint="Rows hold a few levels of objects and lists (messages -> turn -> content); "
                             "check how this file was produced.") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise DataError(Location(path, first_line), f"invalid JSON ({e})", hint=hint) from None


def _duplicate_position(text: str) -> int | None:
    """Offset of the first object holding a duplicate key (slow: only on the error path)."""
    from json import decoder, scanner

    def parse_object(s_and_end, strict, scan_once, object_hook, object_pairs_hook, memo=None):  # noqa: ANN001
        s, end = s_and_end
        pairs, new_end = decoder.JSONObject(s_and_end, strict, scan_once, None, list, memo)
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _DuplicateKey(k, [], end - 1)
            seen.add(k)
        return dict(pairs), new_end

    dec = json.JSONDecoder()
    dec.parse_object = parse_object  # type: ignore[assignment]
    dec.scan_once = scanner.py_make_scanner(dec)
    try:
        dec.decode(text)
    except _DuplicateKey as e:
        return e.pos
    except (ValueError, RecursionError):
        return None
    return None


def shown(v: Any, limit: int = 60) -> str:
    """A value for a message: quoted, escaped (lone surrogates, control characters), cut."""
    r = repr(v)
    return r if len(r) <= limit else r[: limit - 5] + "...'"


def _read_jsonl(p: Path, encoding: str, option: str | None) -> Iterator[Record]:
    # utf-8-sig strips a byte-order mark; lines may end with CRLF.
    tf = _open(p, encoding, option)
    hint = "Each line must hold exactly one JSON object." + tf.read_as()
    for i, line in tf.lines():
        s = line.strip()
        if not s:
            continue
        where = Location(str(p), i)
        obj = parse_json(s, str(p), i, hint=hint)
        if not isinstance(obj, dict):
            raise DataError(where, f"expected a JSON object, found {_kind(obj)}",
                            hint="Each line must hold one JSON object such as {\"messages\": [...]}.")
        yield Record(obj, where)


def _kind(v: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "true/false", int: "a number",
            float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def _read_json(p: Path, encoding: str, option: str | None) -> Iterator[Record]:
    tf = _open(p, encoding, option)
    text = tf.read()
    if not text.strip():
        return
    obj = parse_json(text, str(p), hint="A .json file must hold one array of objects; use .jsonl for one "
                                       "object per line." + tf.read_as())
    if isinstance(obj, dict):
        # {"data": [...]} / {"train": [...]} and similar single-list wrappers
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) == 1:
            obj = lists[0]
        else:
            obj = [obj]
    if not isinstance(obj, list):
        raise DataError(Location(str(p)), f"expected an array of objects, found {_kind(obj)}",
                        hint="A .json file must hold one array of objects: [{...}, {...}].")
    for i, item in enumerate(obj, start=1):
        where = Location(str(p), i, "item")
        if not isinstance(item, dict):
            raise DataError(where, f"expected a JSON object, found {_kind(item)}",
                            hint="A .json file must hold one array of objects: [{...}, {...}].")
        yield Record(item, where)


# --------------------------------------------------------------------------- CSV

# Python's csv refuses fields over 128 KiB by default; a long conversation in one cell is data,
# and --max-seq-len bounds what is tokenized of it (dataset.py).
CSV_FIELD_LIMIT = 2**31 - 1


def _read_csv(p: Path, encoding: str, option: str | None) -> Iterator[Record]:
    tf = _open(p, encoding, option)
    pulled: list[tuple[int, str]] = []  # the lines of the row being read, for its line number

    def feed() -> Iterator[str]:
        for n, line in tf.lines():
            pulled.append((n, line))
            yield line

    old = csv.field_size_limit()
    csv.field_size_limit(CSV_FIELD_LIMIT)
    try:
        reader = csv.reader(feed())
        header: list[str] | None = None
        while True:
            pulled.clear()
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                line = pulled[0][0] if pulled else reader.line_num
                raise DataError(Location(str(p), line), f"unreadable CSV ({e})",
                                hint="A field holding a comma, a quote or a line break must be in double "
                                     "quotes, with quotes inside it doubled (\"\").") from None
            line = next((n for n, t in pulled if t.strip()), pulled[0][0] if pulled else reader.line_num)
            if header is None:
                if not row or all(not c.strip() for c in row):
                    continue
                header = [c.strip() for c in row]
                dup = next((h for i, h in enumerate(header) if h and h in header[:i]), None)
                if dup is not None:
                    raise DataError(Location(str(p), line), f"the header names the column {shown(dup)} twice",
                                    hint="Rename or remove one of the two columns.")
                continue
            if all(not c.strip() for c in row):
                continue
            where = Location(str(p), line)
            rec = {h: _maybe_json(row[i] if i < len(row) else None, where, h) for i, h in enumerate(header)}
            yield Record(rec, where)
    finally:
        csv.field_size_limit(old)


def _maybe_json(v: str | None, where: Location, column: str) -> Any:
    """CSV cells holding a JSON list (e.g. a messages column) are decoded."""
    if v is None:
        return None
    s = v.strip()
    if s.startswith("[") and s.endswith("]"):
        try:
            return json.loads(s, object_pairs_hook=_unique_pairs)
        except (ValueError, RecursionError):
            return v  # not JSON after all: the text itself
        except _DuplicateKey as e:
            raise DataError(where, f"the JSON in this cell gives the key {shown(e.key)} twice in one object",
                            field=column, hint=f"Keep one {shown(e.key)} in that object.") from None
    return v


# --------------------------------------------------------------------------- Parquet


def _read_parquet(p: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    i = 0
    try:
        pf = pq.ParquetFile(p)
        for batch in pf.iter_batches():
            for row in batch.to_pylist():
                i += 1
                yield Record(row, Location(str(p), i, "row"))
    except (MacftError, OSError) as e:
        if isinstance(e, MacftError) or not _is_arrow_error(e):
            raise
        raise _parquet_error(p, i, e) from None
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid, ArrowTypeError, ...
        raise _parquet_error(p, i, e) from None


def _is_arrow_error(e: BaseException) -> bool:
    return type(e).__module__.startswith("pyarrow")


def _parquet_error(p: Path, rows_read: int, e: BaseException) -> DataError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    where = Location(str(p), rows_read + 1, "row") if rows_read else Location(str(p))
    return DataError(where, f"the Parquet file could not be read ({first})",
                     hint="The file is damaged or not Parquet: write it again (pandas: df.to_parquet(path)), "
                          "or export the data as JSONL.")


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
