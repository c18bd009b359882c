"""`macft chat --web`: check the address, load the model (on its own thread), serve the page."""

from __future__ import annotations

import argparse
import os

from ..chat_session import load_from_args, sampling_from_args
from ..errors import MacftError
from ..ui import console
from .conversation import why_no_base
from .server import DEFAULT_HOST, DEFAULT_PORT, check_address, serve
from .worker import ModelWorker

INSTALL_HINT = "pip install 'macft[web]'"


def import_gradio() -> None:
    # no usage reports or version checks from a page that should stay on this machine
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        import gradio  # noqa: F401
    except ImportError as e:
        raise MacftError(f"The web chat needs Gradio, which is not installed ({e}).",
                         f"Install the web extra: {INSTALL_HINT}") from None


def run_web(args: argparse.Namespace) -> int:
    import_gradio()
    from .page import PageSettings, build_page, launch_options

    host = args.host or DEFAULT_HOST
    port = DEFAULT_PORT if args.port is None else args.port
    check_address(host, port)  # before the model loads: a busy port fails in a second
    model = load_from_args(args)
    worker = ModelWorker(model)
    try:
        why = why_no_base(model)
        label = "Fine-tuned" if why is None or model.kind == "gguf" else "Base model"
        demo = build_page(worker, PageSettings(model.description, label, why, args.system, sampling_from_args(args)))
        console.print(f"Serving [bold]{model.description}[/].")
        serve(demo, host, port, worker.run_pending, **launch_options())
    finally:
        worker.close()
    return 0
