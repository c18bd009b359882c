"""Data pipeline: formats, masks, truncation, inspect, and every bad input's message."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from macft.data.dataset import build_data
from macft.data.formats import Sample
from macft.data.render import Renderer
from macft.data.tokenizer import load_tokenizer

TWO_TURNS = [
    {"role": "user", "content": "空は何色？"},
    {"role": "assistant", "content": "空は青だにゃ"},
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "It is 5 にゃ"},
]


@pytest.fixture(scope="module")
def tok(tiny_gemma):
    return load_tokenizer(str(tiny_gemma))


def trained_text(tok, r) -> list[str]:
    """Decoded runs of consecutive trained tokens."""
    runs, cur = [], []
    for i, m in zip(r.ids, r.mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def test_two_turn_mask_is_exactly_both_replies_with_end_of_turn(tok):
    r = Renderer(tok).render(Sample(TWO_TURNS, None, "x"))
    assert trained_text(tok, r) == ["空は青だにゃ<end_of_turn>", "It is 5 にゃ<end_of_turn>"]
    # ids are exactly what the model's own template gives
    ref = tok.apply_chat_template(TWO_TURNS, tokenize=True)
    ref = ref["input_ids"] if not isinstance(ref, list) else ref
    assert r.ids == list(ref)
    assert r.mask[0] == 0


def test_last_assistant_and_all(tok):
    last = Renderer(tok, "last_assistant").render(Sample(TWO_TURNS, None, "x"))
    assert trained_text(tok, last) == ["It is 5 にゃ<end_of_turn>"]
    allm = Renderer(tok, "all").render(Sample(TWO_TURNS, None, "x"))
    assert sum(allm.mask) == len(allm.ids) - 1


def test_system_message_folded_like_gemma(tok):
    msgs = [{"role": "system", "content": "あなたは猫です。"}] + TWO_TURNS[:2]
    r = Renderer(tok)
    text = r.render_text(msgs)
    assert "<start_of_turn>user\nあなたは猫です。\n\n空は何色？<end_of_turn>" in text
    assert "system" not in text
    assert trained_text(tok, r.render(Sample(msgs, None, "x"))) == ["空は青だにゃ<end_of_turn>"]


def test_fallback_template_when_tokenizer_has_none(tok):
    import copy

    t2 = copy.deepcopy(tok)
    t2.chat_template = None
    r = Renderer(t2)
    assert r.uses_fallback_template
    out = r.render(Sample(TWO_TURNS, None, "x"))
    runs = trained_text(t2, out)
    assert runs[0].startswith("空は青だにゃ") and runs[0].endswith("<eos>")
    assert "<eos>" in r.end_tokens()


def test_truncation_keeps_whole_turns_and_counts(tok, tmp_path):
    long_user = "長い質問です。" * 40
    rows = [{"messages": TWO_TURNS},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "にゃ"},
                          {"role": "user", "content": long_user}, {"role": "assistant", "content": "ok にゃ"}]},
            {"messages": [{"role": "user", "content": long_user}, {"role": "assistant", "content": "ok にゃ"}]}]
    f = tmp_path / "t.jsonl"
    f.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    d = build_data(str(f), None, Renderer(tok), max_seq_len=48, valid_fraction=0)
    s = d.train_stats
    assert (s.rows, s.examples, s.truncated, s.dropped) == (3, 2, 2, 1)
    cut = d.train[1]
    assert cut.truncated and len(cut) <= 48
    # cut after the first reply's <end_of_turn>: the kept conversation ends with a whole turn
    assert tok.decode(cut.ids[-1:].tolist()) == "<end_of_turn>"


FORMATS = {
    "nya_chat": "chat",
    "nya_alpaca": "instruction",
    "nya_completion": "completion",
}


@pytest.mark.parametrize("name,fmt", FORMATS.items())
def test_inspect_each_example_format(run_cli, tiny_gemma, nya_dir, name, fmt):
    rc, out, err = run_cli("data", "inspect", str(nya_dir.parent / name), "--model", str(tiny_gemma), "--json")
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["format"] == fmt
    assert rep["examples"] == 440 and rep["dropped"] == 0 and rep["truncated"] == 0
    assert 0 < rep["trained_tokens"] < rep["total_tokens"]
    assert rep["end_tokens"][0] == "<end_of_turn>"
    rc, out, err = run_cli("data", "inspect", str(nya_dir.parent / name), "--model", str(tiny_gemma))
    assert rc == 0
    assert "trained" in err and "<end_of_turn>" in err


def test_sharegpt_text_csv_json_parquet(run_cli, tiny_gemma, tmp_path):
    conv = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hi にゃ"}]}
    (tmp_path / "sg.jsonl").write_text(json.dumps(conv, ensure_ascii=False) + "\n")
    (tmp_path / "tx.jsonl").write_text(json.dumps({"text": "猫はかわいいにゃ"}, ensure_ascii=False) + "\n")
    with open(tmp_path / "c.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "completion"])
        w.writerow(["空は何色？", "青だにゃ"])
        w.writerow(["雪は何色？", "白だにゃ"])
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "x", "input": "y", "output": "z にゃ"}]))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"prompt": "a", "completion": "b にゃ"}] * 3), tmp_path / "p.parquet")
    expect = {"sg.jsonl": "sharegpt", "tx.jsonl": "text", "c.csv": "completion", "a.json": "instruction",
              "p.parquet": "completion"}
    for name, fmt in expect.items():
        rc, out, err = run_cli("data", "inspect", str(tmp_path / name), "--model", str(tiny_gemma), "--json",
                               "--valid-fraction", "0")
        assert rc == 0, (name, err)
        assert json.loads(out)["format"] == fmt, name


def test_bom_and_crlf_simply_work(tiny_gemma, tok, tmp_path, nya_dir):
    src = (nya_dir / "valid.jsonl").read_text(encoding="utf-8")
    f = tmp_path / "bom.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + src.replace("\n", "\r\n").encode("utf-8"))
    d = build_data(str(f), None, Renderer(tok), max_seq_len=256, valid_fraction=0)
    d_ref = build_data(str(nya_dir / "valid.jsonl"), None, Renderer(tok), max_seq_len=256, valid_fraction=0)
    assert [e.ids.tolist() for e in d.train] == [e.ids.tolist() for e in d_ref.train]


def test_directory_with_train_and_valid(tok, nya_dir):
    d = build_data(str(nya_dir), None, Renderer(tok), max_seq_len=256)
    assert d.valid_from == "file" and len(d.train) == 400 and len(d.valid) == 40


def test_valid_fraction_split_is_deterministic(tok, nya_dir):
    a = build_data(str(nya_dir / "train.jsonl"), None, Renderer(tok), max_seq_len=256, valid_fraction=0.1, seed=3)
    b = build_data(str(nya_dir / "train.jsonl"), None, Renderer(tok), max_seq_len=256, valid_fraction=0.1, seed=3)
    assert len(a.valid) == 40 and len(a.train) == 360
    assert [e.where for e in a.valid] == [e.where for e in b.valid]


# --------------------------------------------------------------------------- bad input

BAD_ROWS = {
    "invalid_json": ('{"messages": [}\n', "line 1", "invalid JSON"),
    "no_known_keys": ('{"question": "a", "answer": "b"}\n', "line 1", "none of the keys of a known format"),
    "unknown_role": ('{"messages": [{"role": "user", "content": "a"}, {"role": "cat", "content": "b"}]}\n',
                     "field 'messages[1].role'", "unknown role 'cat'"),
    "empty_content": ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}]}\n',
                      "field 'messages[1].content'", "empty"),
    "non_string": ('{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "b"}]}\n',
                   "field 'messages[0].content'", "expected a string, found int"),
    "no_assistant": ('{"messages": [{"role": "user", "content": "a"}]}\n', "field 'messages'",
                     "no assistant turn"),
    "empty_file": ("", "", "holds no records"),
}


@pytest.mark.parametrize("case", BAD_ROWS)
def test_bad_rows_get_file_line_field(run_cli, tiny_gemma, tmp_path, case):
    content, where, what = BAD_ROWS[case]
    f = tmp_path / f"{case}.jsonl"
    good = '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}\n'
    # the bad row is on line 2 when there is a good first row (format detection reads row 1)
    body = content if case in ("empty_file", "no_known_keys", "invalid_json") else good + content
    f.write_text(body)
    rc, out, err = run_cli("data", "inspect", str(f), "--model", str(tiny_gemma))
    assert rc == 2
    assert str(f) in err and what in err, err
    if where.startswith("line"):
        assert where in err
    elif where:
        assert "line 2" in err and where in err, err
    assert "Traceback" not in err and "fix:" in err


def test_missing_path_and_dir_without_train(run_cli, tiny_gemma, tmp_path):
    rc, _, err = run_cli("data", "inspect", str(tmp_path / "nope.jsonl"), "--model", str(tiny_gemma))
    assert rc == 2 and "does not exist" in err
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "valid.jsonl").write_text("{}\n")
    rc, _, err = run_cli("data", "inspect", str(tmp_path / "d"), "--model", str(tiny_gemma))
    assert rc == 2 and "without a train file" in err and "valid.jsonl" in err


def test_model_without_tokenizer(run_cli, tmp_path, nya_dir):
    m = tmp_path / "model"
    m.mkdir()
    (m / "config.json").write_text("{}")
    rc, _, err = run_cli("data", "inspect", str(nya_dir), "--model", str(m))
    assert rc == 2 and "has no tokenizer" in err and "tokenizer.json" in err
    # tokenizer_config.json alone is no vocabulary: the message lists what is there, and says so
    (m / "tokenizer_config.json").write_text("{}")
    rc, _, err = run_cli("data", "inspect", str(nya_dir), "--model", str(m))
    assert rc == 2 and "no tokenizer vocabulary" in err and "spiece.model" in err
    assert "found: config.json, tokenizer_config.json" in " ".join(err.split())
    # GPT-2 style BPE needs both files
    (m / "vocab.json").write_text("{}")
    rc, _, err = run_cli("data", "inspect", str(nya_dir), "--model", str(m))
    assert rc == 2 and "vocab.json but no merges.txt" in err


def test_unknown_config_key_and_wrong_type_via_cli(run_cli, tiny_gemma, tmp_path, nya_dir):
    y = tmp_path / "c.yaml"
    y.write_text("data:\n  max_seq_lenght: 100\n  valid_fraction: lots\n")
    rc, _, err = run_cli("data", "inspect", str(nya_dir), "--model", str(tiny_gemma), "--config", str(y))
    assert rc == 2
    assert "did you mean 'max_seq_len'" in err and "data.valid_fraction: expected a number" in err
    assert "Traceback" not in err


def test_debug_shows_traceback(tiny_gemma, tmp_path):
    from macft.cli import main
    from macft.errors import DataError

    f = tmp_path / "e.jsonl"
    f.write_text("{bad\n")
    with pytest.raises(DataError):
        main(["data", "inspect", str(f), "--model", str(tiny_gemma), "--debug"])


def test_data_modules_import_neither_torch_nor_mlx():
    import ast

    pkg = Path(__file__).resolve().parents[1] / "macft" / "data"
    for py in pkg.glob("*.py"):
        tree = ast.parse(py.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for n in names:
                assert n.split(".")[0] not in ("torch", "mlx", "mlx_lm"), f"{py.name} imports {n}"


def test_byte_level_bpe_masks_cover_whole_characters(tiny_qwen2):
    """GPT-2 style byte tokens of one character share its offsets; all of them are trained."""
    tok = load_tokenizer(str(tiny_qwen2))
    msgs = [{"role": "user", "content": "空は何色？"}, {"role": "assistant", "content": "空は青だにゃ"},
            {"role": "user", "content": "x"}, {"role": "assistant", "content": "It is 5 にゃ"}]
    r = Renderer(tok).render(Sample(msgs, None, "x"))
    assert trained_text(tok, r) == ["空は青だにゃ<|im_end|>", "It is 5 にゃ<|im_end|>"]
    assert Renderer(tok).end_tokens() == ["<|im_end|>"]


# --------------------------------------------------------------------------- issue 12: no traceback, bounded work

GOOD_ROW = '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}\n'


@pytest.mark.parametrize("row,key", [
    ('{"text": "a", "text": "b"}\n', "text"),
    ('{"messages": [{"role": "user", "content": "a", "content": "b"}, '
     '{"role": "assistant", "content": "c"}]}\n', "content"),
])
def test_duplicate_keys_are_refused_with_line_and_key(tmp_path, row, key):
    from macft.data.readers import read_records
    from macft.errors import DataError

    f = tmp_path / "dup.jsonl"
    f.write_text(GOOD_ROW + row)
    with pytest.raises(DataError) as e:
        read_records(str(f))
    assert e.value.where.line == 2
    assert f"the key '{key}' appears twice" in str(e.value)
    # a .json array: the line of the object holding the duplicate
    j = tmp_path / "dup.json"
    j.write_text("[\n" + GOOD_ROW.strip() + ",\n" + row.strip() + "\n]\n")
    with pytest.raises(DataError) as e:
        read_records(str(j))
    assert e.value.where.line == 3 and f"'{key}' appears twice" in str(e.value)


def test_duplicate_csv_header_and_huge_csv_field(tmp_path):
    from macft.data.readers import read_records
    from macft.errors import DataError

    f = tmp_path / "d.csv"
    f.write_text("prompt,completion,prompt\na,b,c\n")
    with pytest.raises(DataError, match="line 1: the header names the column 'prompt' twice"):
        read_records(str(f))
    big = "長" * 300_000  # over csv.field_size_limit() (128 KiB) by default
    f.write_text(f'prompt,completion\n"{big}",b\nq,"multi\nline"\nr,s\n', encoding="utf-8")
    recs = read_records(str(f))
    assert recs[0].data["prompt"] == big
    assert [r.where.line for r in recs] == [2, 3, 5]  # a quoted line break spans lines 3-4


def test_lone_surrogate_is_a_data_error(tmp_path, tok):
    from macft.errors import DataError

    f = tmp_path / "s.jsonl"
    f.write_text(GOOD_ROW + '{"messages": [{"role": "user", "content": "a\\ud800b"}, '
                 '{"role": "assistant", "content": "c"}]}\n')
    with pytest.raises(DataError) as e:
        build_data(str(f), None, Renderer(tok), max_seq_len=64, valid_fraction=0)
    assert e.value.where.line == 2 and e.value.field == "messages[0].content"
    assert "unpaired surrogate" in str(e.value)
    str(e.value).encode("utf-8")  # printable


def test_corrupt_parquet_is_a_data_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from macft.data.readers import read_records
    from macft.errors import DataError

    f = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": "猫" * 50}] * 20), f)
    raw = f.read_bytes()
    f.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="the Parquet file could not be read"):
        read_records(str(f))


class SpyTokenizer:
    """Forwards to a tokenizer and records the length of every text it is asked to tokenize."""

    def __init__(self, tok):
        self._tok = tok
        self.lengths: list[int] = []

    def __call__(self, text, *a, **kw):
        self.lengths.append(len(text))
        return self._tok(text, *a, **kw)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def test_huge_row_is_cut_before_tokenizing(tok, tmp_path):
    """A multi-MB row costs what a row of CHARS_PER_TOKEN_BOUND x max_seq_len characters does."""
    from macft.data.dataset import CHARS_PER_TOKEN_BOUND

    huge = "猫はかわいい。" * 500_000  # 3.5 M characters, 10 MB of UTF-8
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "にゃ"},
                          {"role": "user", "content": huge}, {"role": "assistant", "content": "ok"}]},
            {"text": "x"}]
    f = tmp_path / "huge.jsonl"
    f.write_text(json.dumps(rows[0], ensure_ascii=False) + "\n")
    spy = SpyTokenizer(tok)
    r = Renderer(tok)
    r.tok = spy
    d = build_data(str(f), None, r, max_seq_len=64, valid_fraction=0)
    bound = CHARS_PER_TOKEN_BOUND * 64
    assert spy.lengths and max(spy.lengths) < bound + 500  # the bound plus the template's headers
    s = d.train_stats
    assert (s.rows, s.examples, s.truncated, s.dropped) == (1, 1, 1, 0)
    # the first reply is kept whole, exactly as without the huge turn
    ref = Renderer(tok).render(Sample(rows[0]["messages"][:2], None, "x"))
    assert d.train[0].ids.tolist() == ref.ids[: len(d.train[0])]
    assert tok.decode(d.train[0].ids[-1:].tolist()) == "<end_of_turn>"
    # a huge first prompt leaves nothing to train: truncated and dropped, never tokenized whole
    g = tmp_path / "huge2.jsonl"
    g.write_text(GOOD_ROW + json.dumps({"messages": [{"role": "user", "content": huge},
                                                      {"role": "assistant", "content": "ok"}]}) + "\n")
    spy.lengths.clear()
    d = build_data(str(g), None, r, max_seq_len=64, valid_fraction=0)
    assert max(spy.lengths) < bound + 500
    assert (d.train_stats.truncated, d.train_stats.dropped, d.train_stats.examples) == (1, 1, 1)


def test_bound_sample_cuts_text_and_turns():
    from macft.data.dataset import CHARS_PER_TOKEN_BOUND, bound_sample

    t = Sample(None, "a" * (CHARS_PER_TOKEN_BOUND * 16 + 5), "x")
    cut, was = bound_sample(t, 16)
    assert was and len(cut.text) == CHARS_PER_TOKEN_BOUND * 16
    short = Sample(None, "abc", "x")
    assert bound_sample(short, 16) == (short, False)
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": "w"} for i in range(100)]
    cut, was = bound_sample(Sample(turns, None, "x"), 16)
    assert was and len(cut.messages) == 16  # each turn holds at least one token
    fits = Sample(turns[:10], None, "x")
    assert bound_sample(fits, 16) == (fits, False)


def test_conversations_ending_with_a_user_turn_warn_once(tok, tmp_path, capsys):
    tail = '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, ' \
           '{"role": "user", "content": "unanswered"}]}\n'
    f = tmp_path / "u.jsonl"
    f.write_text(GOOD_ROW + tail + GOOD_ROW + tail + tail)
    capsys.readouterr()
    d = build_data(str(f), None, Renderer(tok), max_seq_len=128, valid_fraction=0)
    err = " ".join(capsys.readouterr().err.split())
    assert err.count("end with a user turn") == 1
    assert f"3 conversations end with a user turn (the first: {f}, line 2)" in err
    assert "Remove the trailing user turn" in err
    assert d.train_stats.examples == 5
    build_data(str(f), None, Renderer(tok, "all"), max_seq_len=128, valid_fraction=0)
    assert "user turn" not in capsys.readouterr().err  # every token is trained there
