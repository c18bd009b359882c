"""`macft chat --web`, as a user would: the server in its own process, the page in headless
Chromium (Debian's chromium and chromium-driver through Selenium; no browser is downloaded),
with the trained tiny run and with its GGUF through llama.cpp; shutdown on Ctrl-C; bad input.

Screenshots are saved under each test's tmp_path (the path is printed; `pytest -s` shows it).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from importlib.util import find_spec
from pathlib import Path

import pytest
from conftest import REPO

needs_gradio = pytest.mark.skipif(find_spec("gradio") is None, reason="needs pip install 'macft[web]'")
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
TURNS = ["空は何色？", "What is 2 plus 3?"]  # as in the terminal chat's tests
START_S = 120  # the server loads the model and Gradio (about 10 s here)
ANSWER_S = 90


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    from macft.web.server import port_free

    return port_free("127.0.0.1", port)


class Server:
    """`macft chat --web ...` in a child process, its output collected as it comes."""

    def __init__(self, *args: str):
        self.port = free_port()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "MACFT_QUIET": ""}
        self.proc = subprocess.Popen([sys.executable, "-m", "macft", "chat", "--web", *args, "--port", str(self.port)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                     text=True, encoding="utf-8", errors="replace")
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.url = self._wait_url()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def _wait_url(self) -> str:
        t0 = time.time()
        while time.time() - t0 < START_S:
            m = re.search(r"Chat page: (http://\S+)", self.output)
            if m:
                return m.group(1)
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.kill()
        pytest.fail(f"the server did not start:\n{self.output}")

    def interrupt(self, timeout: float = 30) -> tuple[int, float]:
        """Ctrl-C; returns (exit code, seconds to exit)."""
        t0 = time.time()
        self.proc.send_signal(signal.SIGINT)
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(5)
        return rc, time.time() - t0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs Debian's browser: apt-get install chromium chromium-driver")
    pytest.importorskip("selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not look for drivers online
    opts = Options()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--window-size=1280,1000", "--lang=ja",
              # the page must work without the internet: nothing but this machine resolves
              "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):
        opts.add_argument(a)
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


# --------------------------------------------------------------------------- page helpers


def open_page(driver, url: str):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    return WebDriverWait(driver, 60).until(EC.element_to_be_clickable((By.CSS_SELECTOR, "#msg textarea")))


def texts(driver, column: str, who: str = "bot") -> list[str]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0])).map(e => e.innerText.trim())",
        f"#{column} [data-testid='{who}']")


def notice(driver) -> str:
    return driver.execute_script("return document.querySelector('#notice').innerText.trim()")


def wait_for(fn, timeout: float, what: str, settle: float = 0.6):
    """Poll ``fn`` until it returns a truthy value that stays the same for ``settle`` s. An
    element that the page re-rendered between finding and reading it counts as "not yet"."""
    from selenium.common.exceptions import StaleElementReferenceException

    t0, last, since = time.time(), None, 0.0
    while time.time() - t0 < timeout:
        try:
            v = fn()
        except StaleElementReferenceException:
            v = None
        if v and v == last:
            if time.time() - since >= settle:
                return v
        else:
            last, since = v, time.time()
        time.sleep(0.15)
    raise AssertionError(f"timed out waiting for {what}; last seen: {last!r}")


def say(driver, text: str) -> None:
    """Send a message with Enter and wait until every answer to it is complete."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    n = len(texts(driver, "tuned", "user"))
    box = driver.find_element(By.CSS_SELECTOR, "#msg textarea")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)
    # the message appears with "... is answering" under it, in the same update
    wait_for(lambda: len(texts(driver, "tuned", "user")) == n + 1 and "answering" not in notice(driver),
             ANSWER_S, f"the answer to {text!r} (page notice: {notice(driver)!r})", settle=0.3)


def screenshot(driver, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")
    return path


# --------------------------------------------------------------------------- the trained run


@pytest.fixture(scope="module")
def run_server(mlx_run):
    if find_spec("gradio") is None:
        pytest.skip("needs pip install 'macft[web]'")
    server = Server("--run", str(mlx_run))
    yield server
    server.kill()


@needs_gradio
@pytest.mark.slow
def test_two_turns_in_the_browser(run_server, browser, tmp_path):
    open_page(browser, run_server.url)
    # an empty message is not sent, and the page says so
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.find_element(By.CSS_SELECTOR, "#msg textarea").send_keys(Keys.ENTER)
    wait_for(lambda: "empty message" in notice(browser), 20, "the empty-message notice")
    assert texts(browser, "tuned", "user") == []

    for t in TURNS:
        say(browser, t)
    assert texts(browser, "tuned", "user") == TURNS
    answers = texts(browser, "tuned")
    assert len(answers) == 2 and all(a.endswith("にゃ") for a in answers), answers
    shot = screenshot(browser, tmp_path, "web-chat-run.png")
    assert shot.stat().st_size > 10_000

    # reset: the conversation is gone, on the page and for the model
    browser.find_element(By.ID, "reset").click()
    wait_for(lambda: texts(browser, "tuned", "user") == [] and "cleared" in notice(browser), 20, "a reset")


@needs_gradio
@pytest.mark.slow
def test_compare_with_the_base_side_by_side_and_stop(run_server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    open_page(browser, run_server.url)
    def base_shown() -> bool:
        return any(e.is_displayed() for e in browser.find_elements(By.ID, "base"))

    assert not base_shown()
    browser.find_element(By.CSS_SELECTOR, "#compare input[type=checkbox]").click()
    wait_for(base_shown, 20, "the base column")
    say(browser, TURNS[0])  # the base answers after the fine-tune, on the same prompt and seed
    screenshot(browser, tmp_path, "web-chat-compare.png")
    tuned, base = texts(browser, "tuned"), texts(browser, "base")
    assert texts(browser, "base", "user") == [TURNS[0]]
    assert len(tuned) == len(base) == 1 and tuned[0].endswith("にゃ"), (tuned, base)
    assert base[0] != tuned[0], "the adapter made no difference"

    # stop: the base model babbles to the token limit; the button ends it at once
    limit = browser.find_element(By.CSS_SELECTOR, "#max_new_tokens input[type=number]")
    limit.send_keys(Keys.CONTROL, "a")
    limit.send_keys("1024", Keys.TAB)
    box = browser.find_element(By.CSS_SELECTOR, "#msg textarea")
    box.send_keys(TURNS[1], Keys.ENTER)
    wait_for(lambda: "base model is answering" in notice(browser), ANSWER_S, "the base model's turn", settle=0)
    t0 = time.time()
    browser.find_element(By.ID, "stop").click()
    wait_for(lambda: notice(browser) == "Stopped.", 20, "the stop", settle=0.5)
    print(f"stopped in {time.time() - t0:.1f} s")
    assert "…" not in texts(browser, "base")
    # the model is free again: compare off (the conversation restarts), one more answer
    browser.find_element(By.CSS_SELECTOR, "#compare input[type=checkbox]").click()
    wait_for(lambda: not base_shown() and texts(browser, "tuned", "user") == [], 20, "compare off")
    say(browser, TURNS[0])
    assert texts(browser, "tuned")[-1].endswith("にゃ")


@needs_gradio
@pytest.mark.slow
def test_ctrl_c_stops_the_server_and_frees_the_port(run_server):
    port = run_server.port
    assert not port_is_free(port)
    rc, took = run_server.interrupt()
    assert rc == 0, run_server.output
    assert f"Stopped; port {port} is free." in run_server.output
    assert port_is_free(port)
    print(f"stopped {took:.1f} s after SIGINT")
    assert took < 15


# --------------------------------------------------------------------------- the GGUF


@pytest.fixture(scope="module")
def run_gguf(mlx_run, llama_tools, tmp_path_factory) -> Path:
    from macft.cli import main

    out = tmp_path_factory.mktemp("web-gguf")
    assert main(["export", "--run", str(mlx_run), "--quant", "q8_0", "--output", str(out),
                 "--verify-prompts", "2", "--eval-tokens", "256"]) == 0
    return next(out.glob("*-q8_0.gguf"))


@needs_gradio
@pytest.mark.slow
def test_a_gguf_through_llama_cpp_in_the_browser(run_gguf, browser, tmp_path):
    from selenium.webdriver.common.by import By

    server = Server("--gguf", str(run_gguf))  # alone: the GGUF's own chat template
    try:
        open_page(browser, server.url)
        for t in TURNS:
            say(browser, t)
        answers = texts(browser, "tuned")
        assert len(answers) == 2 and all(a.endswith("にゃ") for a in answers), answers
        # a merged GGUF has no base inside: the switch is off and says why
        compare = browser.find_element(By.ID, "compare")
        assert not compare.find_element(By.CSS_SELECTOR, "input[type=checkbox]").is_enabled()
        assert "merged" in compare.text and "--lora-gguf" in compare.text
        screenshot(browser, tmp_path, "web-chat-gguf.png")
        rc, _ = server.interrupt()
        assert rc == 0, server.output
        assert port_is_free(server.port)
    finally:
        server.kill()


# --------------------------------------------------------------------------- the turn logic


@pytest.mark.slow
def test_long_history_is_trimmed_and_stop_frees_the_model(mlx_run):
    """In-process, without the page: the oldest turns go (and the note says so); a reader that
    stops early (the stop button) leaves the model free for the next answer."""
    from macft.chat_session import load_chat_model
    from macft.inference import Sampling
    from macft.web.conversation import answer, notes, why_no_base
    from macft.web.worker import ModelWorker

    worker = ModelWorker(load_chat_model(run=str(mlx_run)))
    try:
        assert why_no_base(worker.model) is None
        s = Sampling(max_new_tokens=48)
        history = []
        for i in range(6):
            history += [{"role": "user", "content": f"質問 {i}: " + "空は何色？" * 8},
                        {"role": "assistant", "content": "青だにゃ"}]
        history.append({"role": "user", "content": TURNS[1]})
        *_, reply = answer(worker, history, "あなたは猫です。", s, max_prompt_tokens=96)
        assert reply.done and reply.dropped >= 3
        assert "oldest" in " ".join(notes(reply, s))
        assert reply.text.endswith("にゃ"), reply.text

        stream = answer(worker, [{"role": "user", "content": TURNS[0]}], None, Sampling(max_new_tokens=200))
        first = next(stream)
        assert not first.done
        stream.close()
        t0 = time.time()
        *_, again = answer(worker, [{"role": "user", "content": TURNS[0]}], None, s)
        assert again.done and again.text.endswith("にゃ") and time.time() - t0 < 30
    finally:
        worker.close()


class _Closable:
    def close(self) -> None:
        pass


def test_the_worker_runs_answers_one_at_a_time_on_its_thread_and_stops_early():
    """Page handlers read from other threads; the model's work stays on the owner's (main)
    thread, one stream at a time, and a reader that stops ends its stream soon after."""
    from macft.web.worker import ModelWorker

    worker = ModelWorker(_Closable())
    made: dict[str, int] = {}
    where: set[str] = set()

    def counting(key: str, n: int, fail: bool = False):
        def gen():
            for i in range(n):
                where.add(threading.current_thread().name)
                made[key] = made.get(key, 0) + 1
                time.sleep(0.005)
                yield f"{key}{i} "
            if fail:
                raise ValueError("broken model")
        return gen

    results: dict[str, object] = {}

    def read(key: str, n: int, stop_after: int | None = None, fail: bool = False) -> None:
        got = []
        try:
            it = worker.stream(counting(key, n, fail))
            for piece in it:
                got.append(piece)
                if len(got) == stop_after:
                    it.close()
                    break
            results[key] = got
        except Exception as e:
            results[key] = e

    readers = [threading.Thread(target=read, args=a) for a in
               (("a", 5), ("b", 10_000, 3), ("c", 2, None, True))]
    for r in readers:
        r.start()
    t0 = time.time()
    while any(r.is_alive() for r in readers) and time.time() - t0 < 30:
        worker.run_pending(0.05)
    assert results["a"] == [f"a{i} " for i in range(5)]
    assert results["b"] == ["b0 ", "b1 ", "b2 "] and made["b"] < 200, made
    assert isinstance(results["c"], ValueError)
    assert where == {threading.current_thread().name}

    # a reader whose job never started hears so when the worker closes
    late = threading.Thread(target=read, args=("d", 3))
    late.start()
    time.sleep(0.2)
    worker.close()
    late.join(5)
    assert not late.is_alive() and "stopped before answering" in str(results["d"])


class _FailingModel(_Closable):
    """A model whose generation fails (as a GGUF that llama.cpp cannot run would)."""

    tokenizer = None
    kind = "gguf"
    lora = None

    def prompt(self, messages):
        return [1] * 10 * len(messages)

    def adapters(self, on):
        from contextlib import nullcontext

        return nullcontext()

    def stream(self, prompt, sampling):
        from macft.errors import ToolError

        yield "half an ans"
        raise ToolError(["llama-completion"], "crashed", "llama.cpp could not generate with this GGUF.")


def test_a_failing_model_is_reported_on_the_page():
    pytest.importorskip("gradio")
    from macft.inference import Sampling
    from macft.web.conversation import why_no_base
    from macft.web.page import respond
    from macft.web.worker import ModelWorker

    worker = ModelWorker(_FailingModel())
    *_, last = respond(worker, "hello", [], [], "", False, Sampling())
    _, shown, _, history, _, note, phase = last
    assert "**Error:**" in note and "llama.cpp could not generate" in note, note
    assert phase == "done" and history[-1]["content"] == "half an ans"
    assert "merged" in why_no_base(worker.model)
    # an empty message is not sent
    (only,) = respond(worker, "  ", [], [], "", False, Sampling())
    assert "empty message" in only[5]


def test_settle_drops_an_unanswered_turn():
    pytest.importorskip("gradio")
    from macft.web.page import _settle

    h = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
         {"role": "user", "content": "c"}, {"role": "assistant", "content": ""}]
    assert _settle(h) == h[:2]


# --------------------------------------------------------------------------- bad input


@needs_gradio
def test_a_port_in_use_is_named_with_a_free_one_suggested(run_cli):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        t0 = time.time()
        rc, _, err = run_cli("chat", "--web", "--run", "no-such-run", "--port", str(port))
    assert rc == 2
    assert f"Port {port} on 127.0.0.1 is already in use" in err, err
    m = re.search(r"--port (\d+) \(free now\)", err)
    assert m and int(m.group(1)) != port, err
    assert time.time() - t0 < 10  # before any model loads


@needs_gradio
def test_a_model_that_fails_to_load_says_why_and_serves_nothing(run_cli, tmp_path):
    port = free_port()
    rc, _, err = run_cli("chat", "--web", "--gguf", tmp_path / "missing.gguf", "--port", str(port))
    assert rc == 2
    assert "missing.gguf does not exist" in err, err
    assert port_is_free(port)


def test_listening_beyond_this_machine_warns(capsys):
    from macft.web.server import check_address, is_loopback, page_url

    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0")
    check_address("127.0.0.1", free_port())
    assert "warning" not in capsys.readouterr().err
    port = free_port()
    check_address("0.0.0.0", port)
    assert f"anyone who can reach this machine on port {port}" in capsys.readouterr().err
    assert page_url("0.0.0.0", port) == f"http://127.0.0.1:{port}/"


def test_without_gradio_the_error_says_what_to_install(run_cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    rc, _, err = run_cli("chat", "--web", "--run", "no-such-run")
    assert rc == 2
    assert "pip install 'macft[web]'" in err


def test_port_and_host_need_web(run_cli):
    rc, _, err = run_cli("chat", "--run", "no-such-run", "--port", "8000")
    assert rc == 2 and "--web" in err
