"""Fuzzing the data pipeline: every malformed input either works or raises a MacftError.

A few hundred inputs are made from valid files with a fixed seed (truncation, corrupted and
NUL bytes, odd encodings, wrong types, huge fields, deep nesting, lone surrogates, fields over
csv.field_size_limit, duplicate keys) and each goes through the whole pipeline: readers ->
format detection -> normalisation -> rendering and tokenization with a tiny tokenizer.
Anything but success or a MacftError (whose message must print as UTF-8) is a crash.
"""

from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path
from typing import Any

import pytest

from macft.data.dataset import build_data
from macft.data.render import Renderer
from macft.data.tokenizer import load_tokenizer
from macft.errors import MacftError

SEED = 1212
DATA = Path(__file__).resolve().parents[1] / "examples" / "data"
MAX_SEQ_LEN = 64

DEEP = 100_000  # far past Python's recursion limit


def base_rows() -> dict[str, list[dict[str, Any]]]:
    out = {}
    for name in ("nya_chat", "nya_alpaca", "nya_completion"):
        lines = (DATA / name / "valid.jsonl").read_text(encoding="utf-8").splitlines()[:6]
        out[name] = [json.loads(x) for x in lines]
    out["sharegpt"] = [{"conversations": [{"from": "human", "value": m["messages"][-2]["content"]},
                                          {"from": "gpt", "value": m["messages"][-1]["content"]}]}
                       for m in out["nya_chat"]]
    out["text"] = [{"text": m["messages"][-1]["content"]} for m in out["nya_chat"]]
    return out


def odd_value(rng: random.Random) -> Any:
    """A value of a wrong type (or a right type with a bad value) for a field."""
    return rng.choice([
        0, 3.5, -1, True, None, [], ["a", "b"], [1, 2], {}, {"a": "b"}, {"text": 1},
        [{"type": "text", "text": "hi"}], [{"type": "text", "text": 5}], "", "   ", "\x00",
        "x" * 200_000, "猫" * 150_000, "\ud800", "a\udfffb", [[[[[]]]]], {"role": "user"},
        "\u2028\u2029\x0b\x0c", "[not json", "[1, 2", float("1e308"),
    ])


def mutate_row(row: Any, rng: random.Random, depth: int = 0) -> Any:
    """Replace one field somewhere in ``row`` with an odd value (or drop / add a key)."""
    if isinstance(row, dict) and row:
        key = rng.choice(list(row))
        r = dict(row)
        roll = rng.random()
        if roll < 0.15:
            del r[key]
        elif roll < 0.25:
            r[rng.choice(["role", "content", "\ud800", "", "messages", "text"])] = odd_value(rng)
        elif isinstance(r[key], (dict, list)) and depth < 4 and roll < 0.7:
            r[key] = mutate_row(r[key], rng, depth + 1)
        else:
            r[key] = odd_value(rng)
        return r
    if isinstance(row, list) and row:
        r = list(row)
        i = rng.randrange(len(r))
        roll = rng.random()
        if roll < 0.15:
            del r[i]
        elif roll < 0.3:
            r.insert(i, odd_value(rng))
        elif roll < 0.4:
            r = r * 200  # many turns
        elif isinstance(r[i], (dict, list)) and depth < 4:
            r[i] = mutate_row(r[i], rng, depth + 1)
        else:
            r[i] = odd_value(rng)
        return r
    return odd_value(rng)


def to_jsonl(rows: list[Any]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8", "surrogatepass")


def to_json(rows: list[Any]) -> bytes:
    return json.dumps(rows, ensure_ascii=False, indent=1).encode("utf-8", "surrogatepass")


def to_csv(rows: list[Any]) -> bytes:
    keys: list[str] = []
    for r in rows:
        for k in (r if isinstance(r, dict) else {}):
            if k not in keys:
                keys.append(k)
    s = io.StringIO()
    w = csv.writer(s)
    w.writerow(keys)
    for r in rows:
        r = r if isinstance(r, dict) else {}
        w.writerow([v if isinstance(v, str) else json.dumps(v, ensure_ascii=False) for v in
                    (r.get(k, "") for k in keys)])
    return s.getvalue().encode("utf-8", "surrogatepass")


def to_parquet(rows: list[Any], path: Path) -> bool:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pq.write_table(pa.Table.from_pylist(rows), path)
    except Exception:  # noqa: BLE001 - rows pyarrow cannot store: not an input we can make
        return False
    return True


def corrupt(raw: bytes, rng: random.Random) -> bytes:
    b = bytearray(raw)
    roll = rng.random()
    if roll < 0.3 and b:
        return bytes(b[: rng.randrange(len(b))])  # truncated
    if roll < 0.45:
        for _ in range(rng.randint(1, 5)):
            b.insert(rng.randrange(len(b) + 1), 0)  # NUL bytes
        return bytes(b)
    for _ in range(rng.randint(1, 8)):
        if b:
            b[rng.randrange(len(b))] = rng.randrange(256)
    return bytes(b)


def reencode(raw: bytes, rng: random.Random) -> bytes:
    text = raw.decode("utf-8", "surrogatepass")
    enc = rng.choice(["utf-16", "utf-16-le", "utf-16-be", "utf-32", "cp932", "euc_jp", "latin-1", "iso2022_jp"])
    out = text.encode(enc, "replace") if "\ud800" not in text else text.encode("utf-8", "surrogatepass")
    if rng.random() < 0.3 and len(out) > 3:
        out = out[: rng.randrange(1, len(out))]  # e.g. an odd number of UTF-16 bytes
    return out


def special_cases(tmp: Path) -> list[Path]:
    """Hand-made nasty files."""
    chat = '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}'
    cases = {
        "deep.jsonl": '{"messages": ' + "[" * DEEP + "]" * DEEP + "}\n",
        "deep_obj.json": '{"a": ' * DEEP + "1" + "}" * DEEP,
        "deep_ok.jsonl": '{"text": "x", "n": ' + "[" * 500 + "]" * 500 + "}\n",
        "deep_csv.csv": 'messages\n"' + "[" * DEEP + "]" * DEEP + '"\n',
        "surrogate_key.jsonl": '{"\\ud800": "x"}\n',
        "surrogate_role.jsonl": '{"messages": [{"role": "\\ud800", "content": "a"}]}\n',
        "surrogate_text.jsonl": '{"text": "\\udc00\\ud800"}\n',
        "surrogate_prompt.jsonl": '{"prompt": "\\ud83d", "completion": "b"}\n',
        "dup_top.jsonl": '{"text": "a", "text": "b"}\n',
        "dup_nested.json": '[{"messages": [{"role": "user", "content": "a", "content": "b"}]}]',
        "dup_csv_cell.csv": 'messages\n"[{""role"": ""user"", ""content"": ""a"", ""content"": ""b""}]"\n',
        "bigint.jsonl": '{"text": ' + "9" * 5000 + "}\n",
        "nul_line.jsonl": "\x00" * 10 + "\n" + chat + "\n",
        "nul_csv.csv": "prompt,completion\na\x00b,c\x00\n",
        "huge_csv.csv": "prompt,completion\n" + "a" * 300_000 + ",b\n",
        "unclosed_quote.csv": 'prompt,completion\n"a,b\nc,d\n',
        "only_header.csv": "prompt,completion\n",
        "blank.csv": "\n\n\n",
        "empty.json": "",
        "scalar.json": "5",
        "array_of_scalars.json": "[1, 2, 3]",
        "wrapper.json": '{"data": [' + chat + '], "more": [1]}',
        "bom_only.jsonl": "\ufeff",
        "crlf_cr.jsonl": chat + "\r" + chat + "\r\n",
        "u2028.jsonl": '{"text": "a\u2028b"}\n',
        "huge_row.jsonl": json.dumps({"messages": [{"role": "user", "content": "猫" * 3_000_000},
                                                   {"role": "assistant", "content": "b"}]}) + "\n",
        "many_turns.jsonl": json.dumps({"messages": [{"role": "user", "content": "a"},
                                                     {"role": "assistant", "content": "b"}] * 5000}) + "\n",
        "system_late.jsonl": '{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, '
                             '{"role": "assistant", "content": "c"}]}\n',
        "two_users.jsonl": '{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, '
                           '{"role": "assistant", "content": "c"}]}\n',
        "no_ext": "x",
        "dir.jsonl/": "",
    }
    out = []
    for name, text in cases.items():
        p = tmp / name.rstrip("/")
        if name.endswith("/"):
            p.mkdir()
        else:
            p.write_bytes(text.encode("utf-8", "surrogatepass"))
        out.append(p)
    (tmp / "empty.parquet").write_bytes(b"")
    (tmp / "not.parquet").write_bytes(b"PAR1 this is not parquet PAR1")
    out += [tmp / "empty.parquet", tmp / "not.parquet"]
    return out


def generated_cases(tmp: Path, rng: random.Random) -> list[Path]:
    rows = base_rows()
    out: list[Path] = []
    n = 0

    def add(data: bytes, suffix: str) -> None:
        nonlocal n
        n += 1
        p = tmp / f"g{n:04d}{suffix}"
        p.write_bytes(data)
        out.append(p)

    for name, base in rows.items():
        valid = {".jsonl": to_jsonl(base), ".json": to_json(base), ".csv": to_csv(base)}
        pq_path = tmp / f"{name}.parquet"
        to_parquet(base, pq_path)
        pq_raw = pq_path.read_bytes()
        for _ in range(12):  # damaged bytes of valid files
            for suf, raw in valid.items():
                add(corrupt(raw, rng), suf)
            add(corrupt(pq_raw, rng), ".parquet")
        for _ in range(4):  # odd encodings
            for suf, raw in valid.items():
                add(reencode(raw, rng), suf)
        for _ in range(10):  # wrong types and odd values in fields
            mutated = [mutate_row(r, rng) if rng.random() < 0.5 else r for r in base]
            mutated[rng.randrange(len(mutated))] = mutate_row(base[0], rng)
            for suf, fn in ((".jsonl", to_jsonl), (".json", to_json), (".csv", to_csv)):
                add(fn(mutated), suf)
            p = tmp / f"g{n:04d}m.parquet"
            n += 1
            if to_parquet([r for r in mutated if "\ud800" not in json.dumps(r)], p):
                out.append(p)
    return out


@pytest.fixture(scope="module")
def renderer(tiny_gemma):
    return Renderer(load_tokenizer(str(tiny_gemma)))


def test_malformed_inputs_never_crash(renderer, tmp_path):
    from macft.commands.generate import read_prompts

    rng = random.Random(SEED)
    cases = special_cases(tmp_path) + generated_cases(tmp_path, rng)
    assert len(cases) >= 300
    crashes: list[str] = []
    outcomes = {"ok": 0, "error": 0}
    for p in cases:
        for run in (lambda p=p: build_data(str(p), None, renderer, max_seq_len=MAX_SEQ_LEN, valid_fraction=0),
                    lambda p=p: read_prompts(str(p))):
            try:
                run()
                outcomes["ok"] += 1
            except MacftError as e:
                outcomes["error"] += 1
                try:
                    str(e).encode("utf-8")
                except UnicodeEncodeError:
                    crashes.append(f"{p.name}: unprintable message {str(e)[:200]!r}")
            except KeyboardInterrupt:
                raise
            except BaseException as e:  # noqa: BLE001 - what this test looks for (pyo3 panics too)
                crashes.append(f"{p.name}: {type(e).__name__}: {str(e)[:200]}")
    assert not crashes, f"{len(crashes)} of {2 * len(cases)} runs crashed:\n" + "\n".join(crashes[:30])
    # the fuzzing reaches both outcomes (it is no use if everything is refused at the reader)
    assert outcomes["ok"] >= 20 and outcomes["error"] >= 200, outcomes
