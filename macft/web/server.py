"""Where the page listens, and its life: host and port checks before anything loads, the URL,
and a clean stop on Ctrl-C (or SIGTERM) that frees the port."""

from __future__ import annotations

import ipaddress
import signal
import socket
from collections.abc import Callable
from typing import Any

from ..errors import MacftError
from ..ui import console, out, warn

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860  # Gradio's usual port
POLL_S = 0.2  # how soon Ctrl-C and a stopped server are noticed while idle
CLOSE_WAIT_S = 1  # for open browser tabs to hang up at shutdown
PORTS_TO_TRY = 100  # how far above a busy port to look for a free one to suggest


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def port_free(host: str, port: int) -> bool:
    """Whether a server could listen on (host, port) now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # as uvicorn does: a port left in TIME_WAIT by the last server counts as free
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port_near(host: str, port: int) -> int | None:
    for p in range(port + 1, min(port + 1 + PORTS_TO_TRY, 65536)):
        if port_free(host, p):
            return p
    return None


def check_address(host: str, port: int) -> None:
    """Fail now, before the model loads, when the page could not listen there."""
    if not 0 < port < 65536:
        raise MacftError(f"--port {port} is not a port number (1-65535).")
    try:
        socket.getaddrinfo(host, port)
    except socket.gaierror:
        raise MacftError(f"--host {host} is not an address of this machine.",
                         f"Leave --host out ({DEFAULT_HOST}, this machine only), or give one of its "
                         "addresses (0.0.0.0 for all).") from None
    if not port_free(host, port):
        other = free_port_near(host, port)
        hint = f"Use --port {other} (free now), or stop what listens on {port}." if other else \
            f"Stop what listens on port {port}, or pick another with --port."
        raise MacftError(f"Port {port} on {host} is already in use.", hint)
    if not is_loopback(host):
        warn(f"listening on {host}: anyone who can reach this machine on port {port} can use the "
             "model (the page has no login). Leave --host out to keep it to this machine.")


def page_url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://[{shown}]:{port}/" if ":" in shown else f"http://{shown}:{port}/"


def serve(demo: Any, host: str, port: int, work: Callable[[float], None], **launch_args: Any) -> None:
    """Serve the Gradio page until Ctrl-C or SIGTERM, then close it (the port is free on return).
    Meanwhile this thread runs the model's jobs: ``work(timeout)`` runs one, or waits that long."""
    try:
        demo.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=True,
                    share=False, inbrowser=False, ssr_mode=False, **launch_args)
    except OSError as e:  # lost the port to someone else since check_address
        raise MacftError(f"Could not listen on {host}:{port}: {e}",
                         "Pick another port with --port.") from None
    on_term = signal.signal(signal.SIGTERM, _interrupt)
    # set, not inherited: a process started in the background of a script inherits SIGINT
    # ignored, and the page must still stop on Ctrl-C (seen: the web tests hung so under nohup)
    on_int = signal.signal(signal.SIGINT, _interrupt)
    try:
        out.print(f"Chat page: {page_url(host, port)}")
        console.print("[dim]Press Ctrl-C to stop.[/]")
        while demo.is_running:
            work(POLL_S)
    except KeyboardInterrupt:
        pass
    finally:
        # a second Ctrl-C must not cut the closing short and leave the port taken
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            if getattr(demo, "server", None) is not None:  # open tabs keep connections: wait 1 s, not 5
                demo.server.config.timeout_graceful_shutdown = CLOSE_WAIT_S
            demo.close(verbose=False)
        finally:
            signal.signal(signal.SIGINT, on_int)
            signal.signal(signal.SIGTERM, on_term)
    console.print(f"Stopped; port {port} is free.")


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
