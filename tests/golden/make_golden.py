"""Write ``tests/golden/scores.json``: the outputs of the ingest, feed and retrain paths.

Run from a checkout of the commit whose behaviour is to be frozen (a git worktree, so that
uncommitted work elsewhere cannot leak in)::

    git worktree add /tmp/golden HEAD
    cp -r tests/golden /tmp/golden/tests/   # if the script is newer than that commit
    cd /tmp/golden && /path/to/.venv/bin/python -m tests.golden.make_golden
    cp /tmp/golden/tests/golden/scores.json <repo>/tests/golden/

It starts its own embedded Kafka broker and Redis (as the test session does), runs
:func:`tests.golden.paths.run_paths` and writes the JSON. ``tests/test_golden.py`` reruns the
same paths on the current tree and compares. Regenerate only for a deliberate change of
scores or ranking, and say so in the commit.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from consumers.stack import EmbeddedStack, free_port
from ranker.settings import IndexSettings, KafkaSettings, RedisSettings, Settings, TopicSettings
from tests.golden.paths import run_paths

HERE = Path(__file__).resolve().parent
OUT = HERE / "scores.json"


def isolated(base: Settings, root: Path) -> Settings:
    """Settings on ``base``'s servers with their own topics, groups, key prefix and directories."""
    tag = uuid.uuid4().hex[:10]
    topics = TopicSettings(
        songs_generated=f"g{tag}.songs.generated",
        songs_scored=f"g{tag}.songs.scored",
        dead_letter=f"g{tag}.songs.dead-letter",
        engagement=f"g{tag}.engagement",
        engagement_dead_letter=f"g{tag}.engagement.dead-letter",
        models_promoted=f"g{tag}.models.promoted",
        partitions=2,
    )
    return Settings(
        state_dir=root / "state",
        kafka=base.kafka.model_copy(
            update={"topics": topics, "worker_group_id": f"worker-{tag}", "feedback_group_id": f"feedback-{tag}"}
        ),
        redis=RedisSettings(url=base.redis.url.get_secret_value(), key_prefix=f"g{tag}"),  # type: ignore[arg-type]
        index=IndexSettings(path=root / "index"),
    )


def _commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def generate(root: Path) -> dict[str, Any]:
    base = Settings(
        state_dir=root / "stack",
        kafka=KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}"),
        redis=RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0"),  # type: ignore[arg-type]
    )
    stack = EmbeddedStack(base)
    stack.up()
    try:
        return run_paths(isolated(stack.settings, root / "run"), root / "run")
    finally:
        stack.down()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="apexrank-golden-") as tmp:
        result = generate(Path(tmp))
    result["generated_from"] = _commit(HERE.parents[1])
    args.out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
