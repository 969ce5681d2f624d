"""The light commands (help, settings, services, topics, feed) never load torch, transformers or faiss.

Structural only: what a fresh interpreter has imported when the command exits. The start-up
times themselves are measured by benchmarks/cli_startup.py (docs/benchmarks.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ranker.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "faiss")

#: The console script's ``main()``; at exit, the heavy modules loaded are written to stderr.
WRAPPER = f"""
import atexit, sys
atexit.register(lambda: sys.stderr.write("HEAVY_MODULES=" + ",".join(m for m in {HEAVY!r} if m in sys.modules) + "\\n"))
from consumers.cli import main
sys.argv[0] = "apexrank"
sys.exit(main())
"""

LIGHT_COMMANDS = [
    ["--help"],
    ["config", "show"],
    ["config", "show", "--json"],
    ["services", "status"],
    ["topics", "create"],
    ["feed"],
]


def env_for(settings: Settings) -> dict[str, str]:
    """The environment that gives a subprocess the test's settings (its servers, topics and key prefix)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("APEXRANK_")}
    env["APEXRANK_STATE_DIR"] = str(settings.state_dir)
    env["APEXRANK_KAFKA__BOOTSTRAP_SERVERS"] = settings.kafka.bootstrap_servers
    env["APEXRANK_REDIS__URL"] = settings.redis.url.get_secret_value()
    env["APEXRANK_REDIS__KEY_PREFIX"] = settings.redis.key_prefix
    for name, value in settings.kafka.topics.model_dump().items():
        env[f"APEXRANK_KAFKA__TOPICS__{name.upper()}"] = str(value)
    return env


@pytest.mark.parametrize("argv", LIGHT_COMMANDS, ids=" ".join)
def test_light_commands_import_no_model_stack(argv: list[str], settings: Settings) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", WRAPPER, *argv],
        env=env_for(settings),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    markers = [line for line in proc.stderr.splitlines() if line.startswith("HEAVY_MODULES=")]
    assert markers, proc.stderr[-2000:]
    assert markers[-1] == "HEAVY_MODULES=", f"apexrank {' '.join(argv)} imported {markers[-1].split('=', 1)[1]}"
