"""``apexrank serve``: the API in one process, or in N that share its port.

With ``--workers N`` each process binds its own listening socket with ``SO_REUSEPORT``, so
the kernel spreads incoming connections evenly over them. uvicorn's own workers share one
socket instead, and keep-alive connections (what recommender backends hold open) pile onto
whichever process accepts first: in the API benchmark one of two workers did all the work.
Each process loads its own song table and index. The parent forwards SIGTERM and SIGINT to
the children and exits when any of them does (with its status, so that an orchestrator sees
a crash and restarts the whole set).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import signal
import socket
import threading
import time
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ranker.settings import Settings

log = logging.getLogger(__name__)

#: Pending connections each process's socket queues (uvicorn's default).
BACKLOG = 2048


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``(host, port)`` that other processes can bind too (SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def serve_one(settings: Settings, host: str, port: int, log_level: str, sock: socket.socket | None = None) -> None:
    """Run the API in this process (on ``sock`` when given, else on ``host:port``) until stopped."""
    import uvicorn

    from ranker.serving.api import create_app

    config = uvicorn.Config(create_app(settings), host=host, port=port, log_level=log_level, access_log=False)
    server = uvicorn.Server(config)
    if sock is None:
        server.run()
    else:
        server.run(sockets=[sock])


def _child(settings: Settings, host: str, port: int, log_level: str) -> None:
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _follow_parent()
    sock = reuse_port_socket(host, port)
    serve_one(settings, host, port, log_level, sock)


def _follow_parent(every_s: float = 1.0) -> None:
    """Stop this process (SIGTERM: a graceful shutdown) when its parent is gone, even killed with
    SIGKILL: no API process outlives the ``apexrank serve`` that started it, holding the port."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="apexrank-parent-watch", daemon=True).start()


def serve(settings: Settings, host: str, port: int, workers: int, log_level: str) -> int:
    """Serve with ``workers`` processes (1: this one); the exit status."""
    if workers <= 1:
        serve_one(settings, host, port, log_level)
        return 0
    if not hasattr(socket, "SO_REUSEPORT"):
        raise SystemExit("--workers > 1 needs SO_REUSEPORT (Linux, macOS, BSD); run one process per port instead")
    reuse_port_socket(host, port).close()  # fail here, once, if the port is taken or not ours to share
    ctx = mp.get_context("spawn")
    children = [
        ctx.Process(target=_child, args=(settings, host, port, log_level), name=f"apexrank-api-{i}")
        for i in range(workers)
    ]
    for child in children:
        child.start()
    log.info("serving on %s:%d with %d processes (SO_REUSEPORT): %s", host, port, workers, [c.pid for c in children])
    stopping = False

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.is_alive() and child.pid is not None:
                with contextlib.suppress(ProcessLookupError):  # already gone
                    os.kill(child.pid, signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while all(child.is_alive() for child in children):
            time.sleep(0.2)
        if not stopping:
            dead = [c for c in children if not c.is_alive()]
            log.error("API process %s exited (%s): stopping the others", dead[0].name, dead[0].exitcode)
            stop(signal.SIGTERM, None)
        for child in children:
            child.join(timeout=30)
            if child.is_alive():
                child.kill()
                child.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    codes = [c.exitcode or 0 for c in children]
    return 0 if stopping and all(code in (0, -signal.SIGTERM, -signal.SIGINT) for code in codes) else 1
