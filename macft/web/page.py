"""The chat page (Gradio Blocks): the fine-tuned model's answers, and the base model's beside
them when comparing; a message box with send, stop and reset; the system prompt and sampling.

Each browser tab keeps its own conversation (``gr.State``); every event that reaches the model
shares one queue slot (``concurrency_id="model"``, limit 1), so tabs wait their turn.

Stop, reset and the compare switch cancel the answer being written, but a piece or two of it
may still land after them; so a tab's ``phase`` (answering, done, or cleared) is kept beside
its conversation, and once a cancelled answer has ended, :func:`after_answer` puts the page
in the state the button asked for.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from typing import Any

import gradio as gr

from ..errors import MacftError
from ..inference import Sampling
from ..ui import console
from .conversation import Reply, answer, notes
from .worker import ModelWorker

MODEL_QUEUE = "model"
EMPTY_MESSAGE = "Type a message first: an empty message is not sent."
STOPPED = "Stopped."
CLEARED = "Conversation cleared."
RESTARTED = "The conversation starts again, so that both columns answer the same turns."
MAX_NEW_TOKENS_LIMIT = 1024  # with the 3072-token prompt budget, within a 4096-token context
CSS = "#notice p { color: var(--body-text-color-subdued); margin: 0.2em 0; }"
History = list[dict[str, str]]


@dataclass
class PageSettings:
    description: str  # the model, as the page's heading names it
    tuned_label: str  # the main column's title
    why_no_base: str | None  # why the compare switch is off (None: it works)
    system: str | None
    sampling: Sampling


def _settle(history: History) -> History:
    """The history without a turn left unanswered (stopped before the first piece, or failed):
    chat templates expect user and assistant turns to alternate."""
    h = [m for m in history if m["content"]]
    while h and h[-1]["role"] == "user":
        h.pop()
    return h


def view(history: History, answering: bool = False) -> History:
    """The messages as shown: an answer without visible text says so (or "…" while it comes)."""
    out = []
    for i, m in enumerate(history):
        if m["role"] == "assistant" and not m["content"].strip():
            still = answering and i == len(history) - 1
            m = {**m, "content": "…" if still else "*(no visible text: the model wrote only spaces or nothing)*"}
        out.append(m)
    return out


def respond(worker: ModelWorker, text: str, tuned_hist: History, base_hist: History, system: str,
            comparing: bool, sampling: Sampling) -> Iterator[tuple]:
    """Stream the answer(s) to ``text``. Yields (message box, tuned view, base view, tuned
    history, base history, notice, phase)."""
    text = (text or "").strip()
    if not text:
        yield "", gr.skip(), gr.skip(), gr.skip(), gr.skip(), EMPTY_MESSAGE, gr.skip()
        return
    turn = {"role": "user", "content": text}
    tuned_hist = _settle(tuned_hist) + [turn]
    base_hist = (_settle(base_hist) + [dict(turn)]) if comparing else base_hist
    said: list[str] = []
    phase: Any = "answering"

    def update(note: list[str], active: History | None = None) -> tuple:
        return ("", view(tuned_hist, active is tuned_hist), view(base_hist, active is base_hist),
                tuned_hist, base_hist, "\n\n".join(note), phase)

    for hist, tuned in [(tuned_hist, True)] + ([(base_hist, False)] if comparing else []):
        label = ("fine-tuned" if tuned else "base") if comparing else ""
        busy = [f"*{'The model' if tuned else 'The base model'} is answering…*"]
        hist.append({"role": "assistant", "content": ""})
        yield update(said + busy, hist)
        phase = gr.skip()  # set once; a late piece must not undo a reset
        reply = Reply()
        try:
            with closing(answer(worker, hist[:-1], system.strip() or None, sampling, tuned)) as replies:
                for reply in replies:
                    hist[-1]["content"] = reply.text
                    yield update(said + notes(reply, sampling, label) + busy, hist)
        except Exception as e:  # the page says why; the terminal keeps the details
            said.append(_error_note(e))
            break
        said += notes(reply, sampling, label)
    phase = "done"
    yield update(said)


def after_answer(tuned_hist: History, base_hist: History, phase: Any) -> tuple:
    """Runs when an answer has ended, finished or cancelled: (tuned view, base view, tuned
    history, base history, notice, phase)."""
    if isinstance(phase, dict) and phase.get("cleared") is not None:  # reset or compare switch
        return [], [], [], [], phase["cleared"], "done"
    if phase == "answering":  # the stop button
        return view(tuned_hist), view(base_hist), gr.skip(), gr.skip(), STOPPED, "done"
    return (gr.skip(),) * 6


def build_page(worker: ModelWorker, page: PageSettings) -> gr.Blocks:
    with gr.Blocks(title="macft chat", analytics_enabled=False) as demo:
        gr.Markdown(f"## macft chat\nTalking to `{page.description}`")
        tuned_state, base_state, phase = gr.State([]), gr.State([]), gr.State("done")
        with gr.Row(equal_height=True):
            tuned_box = gr.Chatbot(label=page.tuned_label, elem_id="tuned", height=440,
                                   feedback_options=None, buttons=["copy"])
            base_box = gr.Chatbot(label="Base model (adapter off)", elem_id="base", height=440,
                                  feedback_options=None, buttons=["copy"], visible=False)
        notice = gr.Markdown("", elem_id="notice")
        with gr.Row():
            msg = gr.Textbox(placeholder="Message (Enter sends, Shift-Enter for a new line)",
                             show_label=False, elem_id="msg", scale=6, lines=1, max_lines=8, autofocus=True)
            send = gr.Button("Send", variant="primary", elem_id="send", scale=1, min_width=80)
            stop = gr.Button("Stop", variant="stop", elem_id="stop", scale=1, min_width=80)
            reset = gr.Button("Reset", elem_id="reset", scale=1, min_width=80)
        with gr.Accordion("Settings", open=True):
            system = gr.Textbox(label="System prompt", value=page.system or "", lines=2, elem_id="system",
                                placeholder="(none)")
            compare = gr.Checkbox(
                label="Compare with the base model, side by side (same prompt, same seed)",
                value=False, interactive=page.why_no_base is None, elem_id="compare",
                info=page.why_no_base or "Turning this on or off starts the conversation again.")
            s = page.sampling
            with gr.Row():
                temperature = gr.Slider(0.0, 2.0, value=s.temperature, step=0.05, label="Temperature (0 = greedy)",
                                        elem_id="temperature")
                top_p = gr.Slider(0.05, 1.0, value=s.top_p, step=0.05, label="Top-p", elem_id="top_p")
                max_new = gr.Slider(1, MAX_NEW_TOKENS_LIMIT, value=min(s.max_new_tokens, MAX_NEW_TOKENS_LIMIT),
                                    step=1, label="Max new tokens", elem_id="max_new_tokens")
                seed = gr.Number(value=s.seed, precision=0, label="Seed", elem_id="seed")

        def on_message(text: str, tuned_hist: History, base_hist: History, system_text: str, comparing: bool,
                       temp: float, p: float, n: float, seed_value: float | None) -> Iterator[tuple]:
            sampling = Sampling(max_new_tokens=int(n), temperature=float(temp), top_p=float(p),
                                seed=int(seed_value or 0))
            yield from respond(worker, text, tuned_hist, base_hist, system_text, comparing, sampling)

        shown = [tuned_box, base_box, tuned_state, base_state, notice, phase]
        inputs = [msg, tuned_state, base_state, system, compare, temperature, top_p, max_new, seed]
        queued = dict(concurrency_limit=1, concurrency_id=MODEL_QUEUE, show_progress="hidden")
        generating = [msg.submit(on_message, inputs, [msg, *shown], **queued),
                      send.click(on_message, inputs, [msg, *shown], **queued)]
        for event in generating:
            event.then(after_answer, [tuned_state, base_state, phase], shown, queue=False)

        stop.click(None, None, None, cancels=generating, queue=False)

        def clear(note: str) -> tuple:
            return [], [], [], [], note, {"cleared": note}

        for trigger in (reset.click, tuned_box.clear, base_box.clear):  # the chat boxes' bin icons too
            trigger(lambda: clear(CLEARED), None, shown, cancels=generating, queue=False)

        def toggle(on: bool, tuned_hist: History) -> tuple:
            t, b, ts, bs, note, ph = clear(RESTARTED if tuned_hist else "")
            return t, gr.update(value=b, visible=on), ts, bs, note, ph

        compare.change(toggle, [compare, tuned_state], shown, cancels=generating, queue=False)
    return demo


def _error_note(e: Exception) -> str:
    if isinstance(e, MacftError):
        console.print(f"[bold red]error while answering:[/] {e}")
        return f"**Error:** {e.message}" + (f"  \n**Fix:** {e.hint}" if e.hint else "")
    console.print_exception(show_locals=False)
    return f"**Error:** the model failed to answer ({type(e).__name__}: {e}). The terminal shows the details."


def launch_options() -> dict[str, Any]:
    """What :func:`macft.web.server.serve` passes on to ``launch``."""
    return {"css": CSS, "footer_links": ["gradio", "settings"], "run_history": False, "show_error": True}
