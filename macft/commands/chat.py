"""`macft chat` (interactive, streaming) and `macft generate` (scripts: only the answer)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import DataError, Location, MacftError
from ..inference import Sampling, fit_history, load_chat_model
from ..ui import console, status

HELP = ("Commands: /reset (forget the conversation), /system TEXT (set the system prompt; "
        "/system alone clears it), /base and /tuned (adapter off / on), /exit (or Ctrl-D).")
MAX_PROMPT_TOKENS = 3072


def conversation(system: str | None, history: list[dict[str, str]]) -> list[dict[str, str]]:
    """The messages for the model: the system prompt (if any), then the turns so far."""
    return ([{"role": "system", "content": system}] if system else []) + history


def sampling(args: argparse.Namespace) -> Sampling:
    return Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    seed=args.seed)


def load(args: argparse.Namespace) -> Any:
    with status("Loading the model ..."):
        return load_chat_model(run=args.run, best=args.best, model=args.model, adapter=args.adapter,
                               gguf=args.gguf, lora_gguf=getattr(args, "lora_gguf", None),
                               backend=args.backend, llama_cpp=args.llama_cpp,
                               force=getattr(args, "force", False))


def run_chat(args: argparse.Namespace) -> int:
    if getattr(args, "web", False):
        from ..web.command import run_web

        return run_web(args)
    if getattr(args, "port", None) is not None or getattr(args, "host", None) is not None:
        raise MacftError("--port and --host are for the web page.", "Add --web to serve the chat page.")
    model = load(args)
    s = sampling(args)
    system = args.system
    history: list[dict[str, str]] = []
    tuned = True
    console.print(f"Chatting with [bold]{model.description}[/]. {HELP}")
    while True:
        try:
            line = input("you> ")
        except EOFError:
            console.print()
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = []
            console.print("[dim](conversation cleared)[/]")
            continue
        if text.startswith("/system"):
            system = text[len("/system"):].strip() or None
            history = []
            console.print(f"[dim](system prompt {'set' if system else 'cleared'}; conversation cleared)[/]")
            continue
        if text in ("/base", "/tuned"):
            tuned = text == "/tuned"
            console.print(f"[dim](adapter {'on' if tuned else 'off: base model'})[/]")
            continue
        if text.startswith("/"):
            console.print(f"[yellow]Unknown command {text.split()[0]}.[/] {HELP}")
            continue
        history.append({"role": "user", "content": text})
        msgs, dropped = fit_history(model, conversation(system, history), MAX_PROMPT_TOKENS)
        if dropped:
            console.print(f"[dim](the conversation is longer than the context: the oldest {dropped} "
                          "exchange(s) were left out)[/]")
        with model.adapters(tuned):
            sys.stdout.write("model> ")
            sys.stdout.flush()
            for piece in model.stream(model.prompt(msgs), s):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            sys.stdout.flush()
        gen = model.last
        if not gen.stopped:
            console.print(f"[dim](stopped at the {s.max_new_tokens}-token limit)[/]")
        history.append({"role": "assistant", "content": gen.text})
    model.close()
    return 0


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


def run_generate(args: argparse.Namespace) -> int:
    if not args.prompt and not args.prompts:
        raise MacftError("Nothing to answer.", "Give --prompt TEXT or --prompts FILE.jsonl.")
    prompts = ([[{"role": "user", "content": args.prompt}]] if args.prompt else read_prompts(args.prompts, args.encoding))
    if args.system:
        prompts = [m if m[0]["role"] == "system" else [{"role": "system", "content": args.system}] + m
                   for m in prompts]
    model = load(args)
    s = sampling(args)
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
