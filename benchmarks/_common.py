"""What every benchmark script prints besides its figures: the machine, the commit, the load, tables.

Standard library only, so that ``mert_forward.py`` still runs on a GPU host where the project's
own dependencies are not installed. Scripts are run as ``python benchmarks/<name>.py``, which puts
this folder on ``sys.path``.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def git_state() -> str:
    """The commit measured, and whether the working tree had uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}{' + uncommitted changes' if dirty else ''}"


def loadavg() -> str:
    """Other work on the machine skews every figure: recorded with the results."""
    with contextlib.suppress(OSError):
        return Path("/proc/loadavg").read_text().strip()
    return "unknown"


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, Python and the commit (Linux /proc; 'unknown' elsewhere)."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_gib = 0.0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = int(line.split()[1]) / 2**20
    return {
        "git": git_state(),
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "mem_gib": round(mem_gib, 1),
        "python": platform.python_version(),
    }


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 100 else f"{v:,.3g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table (right-aligned cells) with a title line."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = [title, "  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def print_figures(figures: Mapping[str, Any]) -> None:
    """One figure a line, names aligned."""
    width = max((len(k) for k in figures), default=0)
    for k, v in figures.items():
        print(f"{k:<{width}}  {v}")


def write_json(figures: Any, path: Path) -> None:
    """The figures as JSON (what ``--json PATH`` asks for); values JSON does not know become strings."""
    path.write_text(json.dumps(figures, indent=2, default=str) + "\n")


@contextlib.contextmanager
def private_redis(directory: Path) -> Iterator[tuple[str, int]]:
    """A redis-server of its own on a free loopback port, without persistence: (url, pid)."""
    from consumers.stack import find_redis_server, free_port, port_open  # the project's, not stdlib

    port = free_port()
    proc = subprocess.Popen(
        [str(find_redis_server()), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(directory)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not port_open("127.0.0.1", port):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0", proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=30)
