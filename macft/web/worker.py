"""The model's jobs, run on the main thread.

Page handlers run on Gradio's threads, but the model stays on the thread that loaded it,
as in the terminal chat: MLX keeps its streams per thread (and aborts at exit when another
thread generated with it). The handlers queue jobs and read the text pieces back through a
queue; the main thread runs one job at a time between checks for Ctrl-C, so answers come
one at a time whichever browser tab asked, and a reader that stops early (the stop button)
ends the generation at its next piece.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import closing
from typing import Any

from ..errors import MacftError

_DONE = object()
POLL_S = 0.5  # how often a waiting reader checks that its job was not dropped


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


class ModelWorker:
    def __init__(self, model: Any):
        self.model = model
        self._owner = threading.current_thread()
        self._jobs: queue.Queue[tuple[Callable[[], None], Future]] = queue.Queue()

    def run_pending(self, timeout: float) -> None:
        """Run the next job, waiting at most ``timeout`` s for one (on the owner's thread)."""
        try:
            fn, fut = self._jobs.get(timeout=timeout)
        except queue.Empty:
            return
        if fut.set_running_or_notify_cancel():
            fn()
            fut.set_result(None)

    def stream(self, make: Callable[[], Iterator[str]]) -> Iterator[str]:
        """Iterate ``make()`` on the owner's thread and yield its pieces here. Closing this
        generator early closes ``make()``'s at its next piece."""
        if threading.current_thread() is self._owner:  # nothing to hand over (in-process use)
            with closing(make()) as it:
                yield from it
            return
        pieces: queue.Queue[Any] = queue.Queue()
        stop = threading.Event()

        def work() -> None:
            try:
                with closing(make()) as it:
                    for piece in it:
                        if stop.is_set():
                            break
                        pieces.put(piece)
            except KeyboardInterrupt:  # Ctrl-C in the middle of an answer: the server stops
                pieces.put(_Failed(MacftError("The server is stopping.")))
                raise
            except Exception as e:
                pieces.put(_Failed(e))
            finally:
                pieces.put(_DONE)

        fut: Future = Future()
        self._jobs.put((work, fut))
        try:
            while True:
                try:
                    item = pieces.get(timeout=POLL_S)
                except queue.Empty:
                    if fut.cancelled():
                        raise MacftError("The server stopped before answering.") from None
                    continue
                if item is _DONE:
                    return
                if isinstance(item, _Failed):
                    raise item.error
                yield item
        finally:
            stop.set()
            fut.cancel()  # not started yet: never start it

    def close(self) -> None:
        """Drop the jobs not started, and close the model."""
        while True:
            try:
                _, fut = self._jobs.get_nowait()
            except queue.Empty:
                break
            fut.cancel()
        self.model.close()

