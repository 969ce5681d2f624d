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
    # The address as the system resolves it ("localhost", an IPv6-only name, "::"), first answer.
    family, kind, proto, _, address = socket.getaddrinfo(
        host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
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


def _child(settings: Settings, host: str, port: int, log_level: str, parent: int) -> None:
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Its own process group: a Ctrl-C at the terminal reaches the parent alone, which stops each
    # child once with SIGTERM (uvicorn takes a second SIGINT as "exit now", skipping shutdown).
    os.setpgrp()
    _follow_parent(parent)
    sock = reuse_port_socket(host, port)
    serve_one(settings, host, port, log_level, sock)


def _follow_parent(parent: int, every_s: float = 1.0, grace_s: float = 60.0) -> None:
    """Stop this process when ``parent`` is gone, even killed with SIGKILL: SIGTERM (a graceful
    shutdown), then SIGKILL after ``grace_s``. No API process outlives the ``apexrank serve``
    that started it, holding the port. ``parent`` is the pid the parent passed: read here, a
    parent that died while the child imported would already be init's."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="apexrank-parent-watch", daemon=True).start()


def serve(settings: Settings, host: str, port: int, workers: int, log_level: str) -> int:
    """Serve with ``workers`` processes (1: this one); the exit status (not 0 when a child died unasked)."""
    if workers <= 1:
        serve_one(settings, host, port, log_level)
        return 0
    if not hasattr(socket, "SO_REUSEPORT"):
        raise SystemExit("--workers > 1 needs SO_REUSEPORT (Linux, macOS, BSD); run one process per port instead")
    if port == 0:
        raise SystemExit("--workers > 1 needs a fixed --port: with 0 each process would listen on a port of its own")
    reuse_port_socket(host, port).close()  # fail here, once, if the port is taken or not ours to share
    ctx = mp.get_context("spawn")
    children = [
        ctx.Process(target=_child, args=(settings, host, port, log_level, os.getpid()), name=f"apexrank-api-{i}")
        for i in range(workers)
    ]
    for child in children:
        child.start()
    log.info("serving on %s:%d with %d processes (SO_REUSEPORT): %s", host, port, workers, [c.pid for c in children])
    asked = False  # a signal asked this process to stop

    def terminate_children() -> None:
        for child in children:
            if child.is_alive() and child.pid is not None:
                with contextlib.suppress(ProcessLookupError):  # already gone
                    os.kill(child.pid, signal.SIGTERM)

    def stop(_signum: int, _frame: FrameType | None) -> None:
        nonlocal asked
        asked = True
        terminate_children()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    crashed = None
    try:
        while all(child.is_alive() for child in children):
            time.sleep(0.2)
        if not asked:
            crashed = next(c for c in children if not c.is_alive())
            log.error("API process %s exited (%s) unasked: stopping the others", crashed.name, crashed.exitcode)
            terminate_children()
        for child in children:
            child.join(timeout=30)
            if child.is_alive():
                child.kill()
                child.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if crashed is not None:
        return crashed.exitcode if crashed.exitcode and crashed.exitcode > 0 else 1
    return 0 if all((c.exitcode or 0) in (0, -signal.SIGTERM) for c in children) else 1
