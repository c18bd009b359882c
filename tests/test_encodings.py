"""Data and prompt files that are not UTF-8: detected and read with a note, forced with
--encoding, or refused naming the line, the encoding and the option."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from macft.data.readers import read_records
from macft.data.textio import HEAD_BYTES, detect, open_text
from macft.errors import DataError, MacftError

ROWS = [{"messages": [{"role": "user", "content": f"空は何色？ {i}"},
                      {"role": "assistant", "content": "青だにゃ。ｶﾀｶﾅも①も"}]} for i in range(12)]
JSONL = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS)


def write(path: Path, text: str, encoding: str, bom: bytes = b"") -> Path:
    path.write_bytes(bom + text.encode(encoding))
    return path


def csv_text() -> str:
    s = io.StringIO()
    w = csv.writer(s, lineterminator="\r\n")  # as Excel writes it
    w.writerow(["prompt", "completion"])
    for i in range(5):
        w.writerow([f"空は何色？ {i}", "青だにゃ①, \"引用\"つき"])
    return s.getvalue()


def contents(recs) -> list:
    return [r.data for r in recs]



@pytest.mark.parametrize("encoding,bom,label", [
    ("cp932", b"", "CP932"),
    ("utf-16-le", b"\xff\xfe", "UTF-16"),   # Excel's "Unicode text"
    ("utf-16-le", b"", "UTF-16 LE"),
    ("utf-16-be", b"", "UTF-16 BE"),
    ("utf-32-le", b"", "UTF-32 LE"),
])
def test_jsonl_in_other_encodings_is_read_with_a_note(tmp_path, capsys, encoding, bom, label):
    ref = contents(read_records(str(write(tmp_path / "ref.jsonl", JSONL, "utf-8"))))
    capsys.readouterr()
    f = write(tmp_path / "d.jsonl", JSONL, encoding, bom)
    assert contents(read_records(str(f))) == ref
    err = " ".join(capsys.readouterr().err.split())
    assert f"{f} is not UTF-8: reading it as {label}" in err and "--encoding" in err


def test_utf8_needs_no_note_and_bom_is_dropped(tmp_path, capsys):
    f = write(tmp_path / "d.jsonl", JSONL, "utf-8", b"\xef\xbb\xbf")
    assert contents(read_records(str(f)))[0] == ROWS[0]
    assert "note" not in capsys.readouterr().err


def test_euc_jp(tmp_path, capsys):
    text = JSONL.replace("ｶﾀｶﾅも①も", "カタカナ")  # EUC-JP has no ①
    ref = [json.loads(x) for x in text.splitlines()]
    f = write(tmp_path / "d.jsonl", text, "euc_jp")
    assert contents(read_records(str(f))) == ref
    assert "reading it as EUC-JP" in " ".join(capsys.readouterr().err.split())


def test_cp932_csv_from_excel(tmp_path, capsys):
    ref = contents(read_records(str(write(tmp_path / "ref.csv", csv_text(), "utf-8"))))
    assert ref[0] == {"prompt": "空は何色？ 0", "completion": "青だにゃ①, \"引用\"つき"}
    f = write(tmp_path / "d.csv", csv_text(), "cp932")
    recs = read_records(str(f))
    assert contents(recs) == ref
    assert [r.where.line for r in recs] == [2, 3, 4, 5, 6]
    assert "reading it as CP932" in " ".join(capsys.readouterr().err.split())


def test_utf16_csv_with_bom(tmp_path):
    ref = contents(read_records(str(write(tmp_path / "ref.csv", csv_text(), "utf-8"))))
    assert contents(read_records(str(write(tmp_path / "d.csv", csv_text(), "utf-16")))) == ref


def test_utf8_with_a_bad_byte_names_its_line(tmp_path):
    raw = JSONL.encode("utf-8").split(b"\n")
    raw[6] = raw[6].replace("青".encode(), b"\xff", 1)  # line 7
    f = tmp_path / "bad.jsonl"
    f.write_bytes(b"\n".join(raw))
    with pytest.raises(DataError) as e:
        read_records(str(f))
    assert e.value.where.line == 7
    msg = str(e.value)
    assert f"{f}, line 7" in msg and "not valid UTF-8" in msg and "0xff" in msg
    assert "--encoding" in msg


def test_bad_byte_after_the_detected_head_names_line_and_encoding(tmp_path):
    line = ("空は何色？" * 20 + "\n").encode("cp932")
    n = HEAD_BYTES // len(line) + 10
    f = tmp_path / "long.txt.jsonl"
    f.write_bytes(b"".join(json.dumps({"text": "x"}).encode() + b"\n" if i == 0 else
                           b'{"text": "' + line.strip() + b'"}\n' for i in range(n)) + b'{"text": "\x85\x40"}\n')
    with pytest.raises(DataError) as e:
        read_records(str(f))
    assert e.value.where.line == n + 1
    msg = str(e.value)
    assert "looked like CP932" in msg and "--encoding" in msg


def test_forced_encoding(tmp_path, capsys):
    f = write(tmp_path / "d.jsonl", JSONL, "cp932")
    assert contents(read_records(str(f), encoding="cp932"))[0] == ROWS[0]
    assert "note" not in capsys.readouterr().err  # the user said so: nothing to note
    # forced UTF-16 without a byte-order mark takes the byte order from the data
    f16 = write(tmp_path / "be.jsonl", JSONL, "utf-16-be")
    assert contents(read_records(str(f16), encoding="utf-16"))[0] == ROWS[0]


def test_wrong_forced_encoding_names_line_and_the_likely_one(tmp_path):
    f = write(tmp_path / "d.jsonl", JSONL, "cp932")
    with pytest.raises(DataError) as e:
        read_records(str(f), encoding="utf-8")
    msg = str(e.value)
    assert e.value.where.line == 1
    assert "not valid UTF-8 (the encoding given with --encoding)" in msg
    assert "--encoding cp932" in msg
    # a wrong encoding that decodes into nonsense: the JSON error says how the file was read
    f8 = write(tmp_path / "u.jsonl", JSONL, "utf-8")
    with pytest.raises(DataError) as e:
        read_records(str(f8), encoding="utf-16")
    assert "invalid JSON" in str(e.value) and "read as UTF-16 LE (given with --encoding)" in str(e.value)
    with pytest.raises(MacftError, match="Unknown encoding 'klingon'"):
        read_records(str(f8), encoding="klingon")


def test_detect_basics():
    assert detect(b"abc") == ("utf_8_sig", False)
    assert detect(b"\xef\xbb\xbfabc") == ("utf_8_sig", False)
    assert detect('{"a": "b"}\n'.encode("utf-16-le")) == ("utf_16_le", True)
    assert detect('{"a": "b"}\n'.encode("utf-16-be")) == ("utf_16_be", True)
    assert detect(b"\xff\xfe" + "x".encode("utf-16-le")) == ("utf_16", True)
    # mostly UTF-8 with one damaged byte: UTF-8 (refused later with the line), not a guess
    assert detect(("空は青" * 10).encode() + b"\xff") == ("utf_8_sig", False)


def test_line_ends_only_at_newlines(tmp_path):
    """U+2028 inside a JSON string is text, not a line break (str.splitlines would split there)."""
    f = tmp_path / "ls.jsonl"
    f.write_text(json.dumps({"text": "a\u2028b\x0cc"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert [n for n, _ in open_text(f).lines()] == [1]
    assert read_records(str(f))[0].data["text"] == "a\u2028b\x0cc"


# --------------------------------------------------------------------------- commands


def test_data_inspect_encoding_flag(run_cli, tiny_gemma, tmp_path):
    f = write(tmp_path / "d.jsonl", JSONL, "cp932")
    rc, out, err = run_cli("data", "inspect", str(f), "--model", str(tiny_gemma), "--json",
                           "--valid-fraction", "0", "--encoding", "cp932")
    assert rc == 0, err
    assert json.loads(out)["examples"] == len(ROWS)
    rc, _, err = run_cli("data", "inspect", str(f), "--model", str(tiny_gemma), "--encoding", "utf-8")
    assert rc == 2 and "line 1" in err and "--encoding cp932" in " ".join(err.split())
    assert "Traceback" not in err
    rc, _, err = run_cli("data", "inspect", str(f), "--model", str(tiny_gemma), "--encoding", "nope")
    assert rc == 2 and "data.encoding: unknown encoding 'nope'" in err


def test_generate_has_encoding_flag():
    from macft.cli import build_parser

    args = build_parser().parse_args(["generate", "--prompts", "p.jsonl", "--encoding", "cp932"])
    assert args.encoding == "cp932"
    assert build_parser().parse_args(["generate", "--prompts", "p.jsonl"]).encoding == "auto"


def test_read_prompts_encodings(tmp_path, capsys):
    from macft.commands.generate import read_prompts

    text = '"空は何色？"\n{"prompt": "雪は①"}\n{"messages": [{"role": "user", "content": "猫"}]}\n'
    want = [[{"role": "user", "content": "空は何色？"}], [{"role": "user", "content": "雪は①"}],
            [{"role": "user", "content": "猫"}]]
    f = write(tmp_path / "p.jsonl", text, "cp932")
    assert read_prompts(str(f)) == want
    assert "reading it as CP932" in " ".join(capsys.readouterr().err.split())
    assert read_prompts(str(f), "cp932") == want
    with pytest.raises(DataError, match="line 1"):
        read_prompts(str(f), "utf-8")
    assert read_prompts(str(write(tmp_path / "p16.jsonl", text, "utf-16"))) == want
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": 5}\n{"prompt": "\\ud800"}\n')
    with pytest.raises(DataError, match="field 'prompt': expected a string, found int"):
        read_prompts(str(bad))


def test_export_prompts_file_is_detected(tmp_path, capsys):
    from export.prompts import file_samples

    f = write(tmp_path / "p.jsonl", JSONL, "cp932")
    samples = file_samples(str(f))
    assert samples[0].messages == ROWS[0]["messages"]
    err = " ".join(capsys.readouterr().err.split())
    assert "reading it as CP932" in err and "--encoding" not in err  # export has no such option
