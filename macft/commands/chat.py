"""`macft chat`: talk to a fine-tune in the terminal (streaming), or in the browser with ``--web``."""

from __future__ import annotations

import argparse
import sys

from ..chat_session import MAX_PROMPT_TOKENS, conversation, load_from_args, sampling_from_args
from ..errors import MacftError
from ..inference import fit_history
from ..ui import console
from ._args import add_model_source_args

HELP = ("Talk to a fine-tune in the terminal (streaming; /reset, /system, /base, /tuned), "
        "or in the browser with --web.")
SLASH_HELP = ("Commands: /reset (forget the conversation), /system TEXT (set the system prompt; "
              "/system alone clears it), /base and /tuned (adapter off / on), /exit (or Ctrl-D).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_source_args(p)
    w = p.add_argument_group("web page")
    w.add_argument("--web", action="store_true", help="Serve a chat page in the browser instead "
                   "(streaming, system prompt, sampling, compare with the base; needs "
                   "`pip install 'macft[web]'`).")
    w.add_argument("--host", metavar="ADDR", help="Interface the page listens on (default 127.0.0.1, "
                   "this machine only; anything else opens it to the network, with a warning).")
    w.add_argument("--port", type=int, metavar="N", help="Port for the page (default 7860).")


def run(args: argparse.Namespace) -> int:
    if getattr(args, "web", False):
        from ..web.command import run_web

        return run_web(args)
    if getattr(args, "port", None) is not None or getattr(args, "host", None) is not None:
        raise MacftError("--port and --host are for the web page.", "Add --web to serve the chat page.")
    model = load_from_args(args)
    s = sampling_from_args(args)
    system = args.system
    history: list[dict[str, str]] = []
    tuned = True
    console.print(f"Chatting with [bold]{model.description}[/]. {SLASH_HELP}")
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
            console.print(f"[yellow]Unknown command {text.split()[0]}.[/] {SLASH_HELP}")
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
