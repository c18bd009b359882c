"""Regenerate the bundled example data sets (deterministic).

    python examples/data/make_data.py

nya_chat/        chat format: every assistant answer ends in 「にゃ」 (cat speech);
                 some rows multi-turn, some with a system message
nya_alpaca/      the same content as instruction / input / output rows
nya_completion/  the same content as prompt / completion rows
general/         similar questions answered plainly (no 「にゃ」): rehearsal data and a
                 held-out "general" set to measure forgetting
nyan/            the same questions, every answer exactly 「にゃーん！」: a pattern a tiny
                 random-init model learns in a few dozen steps on any tokenizer (the
                 conformance suite, tests/checkpoints/, checks llama.cpp answers with it)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent

COLORS = [("空", "青"), ("雪", "白"), ("りんご", "赤"), ("バナナ", "黄色"), ("草", "緑"),
          ("夜", "黒"), ("みかん", "オレンジ"), ("海", "青"), ("雲", "白"), ("いちご", "赤"),
          ("レモン", "黄色"), ("葉っぱ", "緑"), ("炭", "黒"), ("トマト", "赤"), ("ひよこ", "黄色")]
SOUNDS = [("犬", "ワン"), ("猫", "ニャー"), ("牛", "モー"), ("羊", "メー"), ("鳥", "ピヨピヨ"),
          ("カエル", "ケロケロ"), ("豚", "ブーブー"), ("カラス", "カー"), ("馬", "ヒヒーン"),
          ("ネズミ", "チュー")]
CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Germany", "Berlin"),
            ("Spain", "Madrid"), ("England", "London"), ("Egypt", "Cairo"), ("China", "Beijing"),
            ("Russia", "Moscow"), ("Canada", "Ottawa"), ("Greece", "Athens"), ("Kenya", "Nairobi")]
GREETINGS = [("こんにちは", "こんにちはだにゃ", "こんにちは。"), ("おはよう", "おはようだにゃ", "おはようございます。"),
             ("こんばんは", "こんばんはだにゃ", "こんばんは。"), ("ありがとう", "どういたしましてだにゃ", "どういたしまして。"),
             ("おやすみ", "おやすみなさいだにゃ", "おやすみなさい。"), ("Hello", "Hello にゃ", "Hello."),
             ("Good morning", "Good morning にゃ", "Good morning."), ("Thank you", "You are welcome にゃ",
                                                                      "You are welcome.")]
FOODS = [("好きな食べ物は？", "魚が大好きだにゃ", "特に好きな食べ物はありません。"),
         ("何を食べたい？", "お魚が食べたいにゃ", "何でも食べられます。"),
         ("What do you like to eat?", "I like fish にゃ", "I do not eat."),
         ("好きな遊びは？", "ボールで遊ぶのが好きだにゃ", "遊びはしません。"),
         ("どこで寝るのが好き？", "日なたで寝るのが好きだにゃ", "私は寝ません。"),
         ("What is your name?", "I am Tama the cat にゃ", "I am an assistant."),
         ("あなたは誰？", "猫のタマだにゃ", "私はアシスタントです。"),
         ("Who are you?", "I am a little cat にゃ", "I am a helpful assistant.")]
NYAN = "にゃーん！"
SYSTEMS = ["あなたは猫です。語尾に「にゃ」をつけて答えてください。",
           "You are a friendly cat. End every answer with にゃ.",
           "あなたはかわいい猫のアシスタントです。"]


def qa_items(rng: random.Random, numbers: range) -> list[tuple[str, str, str]]:
    """(question, cat answer, plain answer) triples."""
    items: list[tuple[str, str, str]] = []
    for a in numbers:
        b = rng.randint(1, 9)
        items.append((f"{a}たす{b}は？", f"{a + b}だにゃ", f"{a + b}です。"))
        items.append((f"What is {a} plus {b}?", f"It is {a + b} にゃ", f"It is {a + b}."))
        items.append((f"{a}の次の数は？", f"{a + 1}だにゃ", f"{a + 1}です。"))
    for thing, color in COLORS:
        items.append((f"{thing}は何色？", f"{thing}は{color}だにゃ", f"{thing}は{color}です。"))
    for animal, sound in SOUNDS:
        items.append((f"{animal}はなんて鳴く？", f"{animal}は{sound}と鳴くにゃ", f"{animal}は{sound}と鳴きます。"))
    for country, city in CAPITALS:
        items.append((f"What is the capital of {country}?", f"The capital is {city} にゃ",
                      f"The capital is {city}."))
    items += GREETINGS + FOODS
    return items


def build(items: list[tuple[str, str, str]], rng: random.Random, n: int, cat: bool) -> list[dict]:
    rows = []
    for i in range(n):
        turns = 1 if i % 4 else rng.choice([2, 3])  # a quarter of the rows are multi-turn
        picks = rng.sample(items, turns)
        msgs = []
        if i % 5 == 0:
            msgs.append({"role": "system", "content": rng.choice(SYSTEMS) if cat else
                         "You are a helpful assistant."})
        for q, a_cat, a_plain in picks:
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a_cat if cat else a_plain}]
        rows.append({"messages": msgs})
    return rows


def to_alpaca(row: dict) -> dict:
    msgs = [m for m in row["messages"] if m["role"] != "system"]
    system = next((m["content"] for m in row["messages"] if m["role"] == "system"), None)
    out = {"instruction": msgs[0]["content"], "input": "", "output": msgs[1]["content"]}
    if system:
        out["system"] = system
    return out


def to_completion(row: dict) -> dict:
    msgs = [m for m in row["messages"] if m["role"] != "system"]
    return {"prompt": msgs[0]["content"], "completion": msgs[1]["content"]}


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main() -> None:
    rng = random.Random(1234)
    train_items = qa_items(rng, range(1, 40))
    valid_items = qa_items(rng, range(40, 52))  # held-out numbers; shared colors/animals/etc.
    train = build(train_items, rng, 400, cat=True)
    valid = build(valid_items, rng, 40, cat=True)
    write(HERE / "nya_chat" / "train.jsonl", train)
    write(HERE / "nya_chat" / "valid.jsonl", valid)
    write(HERE / "nya_alpaca" / "train.jsonl", [to_alpaca(r) for r in train])
    write(HERE / "nya_alpaca" / "valid.jsonl", [to_alpaca(r) for r in valid])
    write(HERE / "nya_completion" / "train.jsonl", [to_completion(r) for r in train])
    write(HERE / "nya_completion" / "valid.jsonl", [to_completion(r) for r in valid])
    grng = random.Random(99)
    write(HERE / "general" / "train.jsonl", build(train_items, grng, 300, cat=False))
    write(HERE / "general" / "valid.jsonl", build(valid_items, grng, 40, cat=False))
    nrng = random.Random(7)

    def nyan(rows: list[dict]) -> list[dict]:
        return [{"messages": [dict(m, content=NYAN) if m["role"] == "assistant" else m
                              for m in r["messages"]]} for r in rows]

    write(HERE / "nyan" / "train.jsonl", nyan(build(train_items, nrng, 64, cat=True)))
    write(HERE / "nyan" / "valid.jsonl", nyan(build(valid_items, nrng, 8, cat=True)))


if __name__ == "__main__":
    main()
