"""`macft generate`: answer prompts non-interactively, printing only the answers (for scripts)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..chat_session import load_from_args, sampling_from_args
from ..errors import DataError, Location, MacftError
from ._args import add_model_source_args

HELP = "Answer prompts non-interactively, printing only the answers (for scripts)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", metavar="TEXT", help="One user message; the answer alone goes to stdout.")
    p.add_argument("--prompts", metavar="FILE.jsonl", help="One prompt per line (a string, {\"prompt\": ...} or "
                   "{\"messages\": [...]}); one JSON line {\"answer\", \"stopped\"} per prompt to stdout.")
    p.add_argument("--encoding", default="auto", metavar="NAME",
                   help="Text encoding of --prompts: auto (UTF-8, others detected with a note) or a codec "
                        "such as cp932, euc-jp, utf-16 (default auto).")
    p.add_argument("--base", action="store_true", help="Answer with the adapter switched off (the base model).")
    add_model_source_args(p)


def read_prompts(path: str, encoding: str = "auto") -> list[list[dict[str, str]]]:
    """A JSONL of prompts: {"prompt": ...}, {"messages": [...]} (up to the reply) or a bare string.

    ``encoding``: the file's text encoding ("auto": UTF-8, others detected; see macft.data.textio)."""
    from rich.markup import escape

    from ..data.readers import parse_json
    from ..data.textio import lone_surrogate, open_text
    from ..ui import info

    hint = 'Each line holds one prompt: a JSON string, {"prompt": "..."} or {"messages": [...]}.'

    def text(value: Any, where: Location, field: str) -> str:
        if not isinstance(value, str):
            found = "null" if value is None else type(value).__name__
            raise DataError(where, f"expected a string, found {found}", field=field, hint=hint)
        if lone_surrogate(value) is not None:
            raise DataError(where, "the text holds an unpaired surrogate (a broken \\u escape)", field=field,
                            hint="Fix that \\u escape: a surrogate \\ud800-\\udbff must be followed by its "
                                 "low half \\udc00-\\udfff.")
        return value

    p = Path(path)
    if not p.is_file():
        raise MacftError(f"Prompts file {p} does not exist.", "Check the path given to --prompts.")
    tf = open_text(p, encoding)
    if tf.note:
        info(f"note: {escape(tf.note)}")
    out = []
    for i, line in tf.lines():
        if not line.strip():
            continue
        where = Location(str(p), i)
        obj = parse_json(line.strip(), str(p), i, hint=hint)
        if isinstance(obj, str):
            out.append([{"role": "user", "content": text(obj, where, "(the line)")}])
        elif isinstance(obj, dict) and "prompt" in obj:
            out.append([{"role": "user", "content": text(obj["prompt"], where, "prompt")}])
        elif isinstance(obj, dict) and isinstance(obj.get("messages"), list):
            msgs = []
            for j, m in enumerate(obj["messages"]):
                if not (isinstance(m, dict) and isinstance(m.get("role"), str)):
                    raise DataError(where, 'expected an object with "role" and "content"',
                                    field=f"messages[{j}]", hint=hint)
                msgs.append({"role": m["role"], "content": text(m.get("content"), where, f"messages[{j}].content")})
            while msgs and msgs[-1]["role"] == "assistant":
                msgs = msgs[:-1]
            if not msgs:
                raise DataError(where, "the conversation has no user turn", field="messages", hint=hint)
            out.append(msgs)
        else:
            raise DataError(where, 'expected a string, {"prompt": ...} or {"messages": [...]}', hint=hint)
    if not out:
        raise DataError(Location(str(p)), "the file holds no prompts", hint=hint)
    return out


def run(args: argparse.Namespace) -> int:
    if not args.prompt and not args.prompts:
        raise MacftError("Nothing to answer.", "Give --prompt TEXT or --prompts FILE.jsonl.")
    prompts = ([[{"role": "user", "content": args.prompt}]] if args.prompt else read_prompts(args.prompts, args.encoding))
    if args.system:
        prompts = [m if m[0]["role"] == "system" else [{"role": "system", "content": args.system}] + m
                   for m in prompts]
    model = load_from_args(args)
    s = sampling_from_args(args)
    with model.adapters(not args.base):
        for msgs in prompts:
            for _ in model.stream(model.prompt(msgs), s):
                pass
            gen = model.last
            if args.prompts:
                print(json.dumps({"answer": gen.text, "stopped": gen.stopped}, ensure_ascii=False), flush=True)
            else:
                print(gen.text, flush=True)
    model.close()
    return 0
