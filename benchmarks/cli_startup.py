"""Start-up time of the light ``apexrank`` commands, and whether they load the model stack.

``apexrank --help``, ``config show``, ``services ...``, ``topics create`` and ``feed`` only read
settings and talk to Kafka or Redis: each must start in at most 0.5 s and import none of
torch, transformers or faiss. Each command runs ``--runs`` times in a fresh interpreter (the
console script's ``main()``, behind a wrapper that reports which of those modules were loaded
at exit), against an embedded stack this script starts on free loopback ports in a temporary
state directory and stops at the end. The figures are wall time of the whole process.

    python benchmarks/cli_startup.py [--runs 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _common import loadavg, machine_info, print_figures, table, write_json  # noqa: E402

from consumers.stack import EmbeddedStack, free_port  # noqa: E402
from ranker.settings import KafkaSettings, RedisSettings, Settings  # noqa: E402

HEAVY = ("torch", "transformers", "faiss")

#: What the ``apexrank`` console script runs, plus a report of the heavy modules loaded, on stderr, at exit.
WRAPPER = f"""
import atexit, sys
atexit.register(lambda: sys.stderr.write("HEAVY_MODULES=" + ",".join(m for m in {HEAVY!r} if m in sys.modules) + "\\n"))
from consumers.cli import main
sys.argv[0] = "apexrank"
sys.exit(main())
"""

#: The light commands, in the order measured (``services up`` finds the stack running: a status check).
COMMANDS: tuple[tuple[str, ...], ...] = (
    ("--help",),
    ("config", "show"),
    ("services", "status"),
    ("services", "up"),
    ("topics", "create"),
    ("feed",),
)


def run_once(argv: tuple[str, ...], env: dict[str, str]) -> tuple[float, list[str]]:
    """Wall time of one ``apexrank ARGV`` in a fresh interpreter, and the heavy modules it imported."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", WRAPPER, *argv], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"apexrank {' '.join(argv)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    marker = [line for line in proc.stderr.splitlines() if line.startswith("HEAVY_MODULES=")]
    heavy = marker[-1].split("=", 1)[1] if marker else "?"
    return elapsed, [m for m in heavy.split(",") if m]


def measure(env: dict[str, str], runs: int) -> list[dict[str, Any]]:
    rows = []
    for argv in COMMANDS:
        times: list[float] = []
        heavy: set[str] = set()
        for _ in range(runs):
            elapsed, loaded = run_once(argv, env)
            times.append(elapsed)
            heavy.update(loaded)
        rows.append(
            {
                "command": "apexrank " + " ".join(argv),
                "median_s": statistics.median(times),
                "max_s": max(times),
                "heavy_imported": sorted(heavy),
            }
        )
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="fresh processes per command")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="apexrank-cli-") as tmp:
        kafka = f"127.0.0.1:{free_port()}"
        redis_url = f"redis://127.0.0.1:{free_port()}/0"
        settings = Settings(
            state_dir=Path(tmp),
            kafka=KafkaSettings(bootstrap_servers=kafka),
            redis=RedisSettings(url=redis_url),
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("APEXRANK_")}
        env |= {
            "APEXRANK_STATE_DIR": tmp,
            "APEXRANK_KAFKA__BOOTSTRAP_SERVERS": kafka,
            "APEXRANK_REDIS__URL": redis_url,
            "APEXRANK_LOG_LEVEL": "WARNING",
        }
        stack = EmbeddedStack(settings)
        stack.up()
        try:
            load_before = loadavg()
            rows = measure(env, args.runs)
            load_after = loadavg()
        finally:
            stack.down()

    info = machine_info()
    print_figures({**info, "loadavg before": load_before, "loadavg after": load_after, "runs": args.runs})
    print()
    print(
        table(
            f"light commands: wall time of a fresh process (s), {args.runs} runs each",
            ["command", "median", "max", "torch/transformers/faiss imported"],
            [(r["command"], r["median_s"], r["max_s"], ", ".join(r["heavy_imported"]) or "none") for r in rows],
        )
    )
    if args.json:
        write_json({"machine": info, "loadavg": [load_before, load_after], "runs": args.runs, "rows": rows}, args.json)
    return 1 if any(r["heavy_imported"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
