"""Input a user can fix (a bad duration, catalog, config file, setting or option) ends the CLI with
one line naming the problem and exit code 2, never a traceback; ``config show`` masks every secret."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from consumers.cli import main
from consumers.durations import parse_duration, parse_since
from ranker.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Only this test's settings: none of the caller's APEXRANK_* variables, state under ``tmp_path``.
    Deleting APEXRANK_CONFIG through monkeypatch also undoes what ``main(["--config", ...])`` sets."""
    for name in [n for n in os.environ if n.startswith("APEXRANK_")]:
        monkeypatch.delenv(name)
    # setenv first: monkeypatch then restores the variable's absence, deleting what main() sets.
    monkeypatch.setenv("APEXRANK_CONFIG", "")
    monkeypatch.delenv("APEXRANK_CONFIG")
    monkeypatch.setenv("APEXRANK_STATE_DIR", str(tmp_path / "state"))
    return tmp_path


def refused(capsys: pytest.CaptureFixture[str], argv: list[str], *words: str) -> str:
    """``argv`` exits 2 with a single ``apexrank: ...`` line holding every one of ``words``."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("apexrank: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], err
    return lines[0]


@pytest.mark.parametrize("every", ["0s", "-1h", "nan", "inf", "bogus", "0", "1x"])
def test_retrain_every_refuses_what_is_not_a_positive_duration(
    env: Path, capsys: pytest.CaptureFixture[str], every: str
) -> None:
    refused(capsys, ["retrain", f"--every={every}"], "--every", repr(every))


def test_one_grammar_for_durations_and_times() -> None:
    """``retrain --every``, ``dead-letters --since`` and ``evaluate-policy --since`` read the same way."""
    assert parse_duration("1w", "--every") == 7 * 86_400
    assert parse_duration("6h", "--every") == parse_duration("6H", "--every") == 6 * 3600
    assert parse_duration("90s", "--every") == 90
    with pytest.raises(ConfigError, match=r"--every '0\.0m'"):
        parse_duration("0.0m", "--every")
    now = datetime(2026, 6, 2, 12, 0, tzinfo=UTC)
    assert parse_since("24h", now) == datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
    assert parse_since("1.5d", now) == datetime(2026, 6, 1, 0, 0, tzinfo=UTC)
    assert parse_since("90m", now) == parse_since("90M", now) == datetime(2026, 6, 2, 10, 30, tzinfo=UTC)
    assert parse_since("2w", now) == now - timedelta(weeks=2)
    assert parse_since("2026-06-01T10:00:00+02:00", now) == datetime(2026, 6, 1, 8, 0, tzinfo=UTC)
    assert parse_since("2026-06-01T10:00:00Z", now) == datetime(2026, 6, 1, 10, 0, tzinfo=UTC)
    assert parse_since("2026-06-01T10:00:00", now) == datetime(2026, 6, 1, 10, 0, tzinfo=UTC)  # no zone: UTC
    for bad in ("yesterday", "7 days", "-1h", "nan", "2x", ""):
        with pytest.raises(ConfigError, match="RFC 3339"):
            parse_since(bad, now)


def test_a_bad_catalog_names_the_file_or_rows(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    refused(capsys, ["publish", "--catalog", str(env / "nope.csv")], "nope.csv", "does not exist")
    bad = env / "bad.csv"
    bad.write_text(
        "song_id,audio_uri,generator,created_at\n"
        "ok1,file:///a.wav,g,2025-01-01T00:00:00Z\n"
        "ok2,file:///a.wav,g,yesterday\n"
        "ok3,file:///a.wav,,2025-01-01T00:00:00Z\n"
    )
    refused(capsys, ["publish", "--catalog", str(bad)], "row 1: created_at", "'yesterday'", "row 2: generator")
    bad.write_text("song_id,audio_uri\nx1,file:///a.wav\n")
    refused(capsys, ["publish", "--catalog", str(bad)], "lacks required columns: generator, created_at")


def test_bad_settings_are_named(env: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    refused(capsys, ["--config", str(env / "nope.toml"), "config", "show"], "--config", "nope.toml", "no such file")
    broken = env / "broken.toml"
    broken.write_text("[api\n")
    refused(capsys, ["--config", str(broken), "config", "show"], "broken.toml", "line 1")
    wrong = env / "wrong.toml"
    wrong.write_text('[api]\nmax_limit = "x"\n')
    refused(capsys, ["--config", str(wrong), "config", "show"], "invalid settings", "api.max_limit")
    monkeypatch.delenv("APEXRANK_CONFIG")
    monkeypatch.setenv("APEXRANK_API__TOKENS", "tok1")  # a list must be JSON
    refused(capsys, ["config", "show"], 'field "api"', "JSON")
    monkeypatch.delenv("APEXRANK_API__TOKENS")
    monkeypatch.setenv("APEXRANK_API__MAX_LIMIT", "s3cret-pasted-here")
    # No value is echoed: the one that fails may be a secret pasted into the wrong setting.
    assert "s3cret" not in refused(capsys, ["config", "show"], "api.max_limit", "valid integer")


def test_bad_options_are_named(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    refused(capsys, ["--log-level", "bogus", "config", "show"], "--log-level", "'bogus'")
    refused(capsys, ["report", "generators", "--window-h", "nan"], "--window-h", "nan")
    refused(capsys, ["report", "generators", "--window-h", "0"], "--window-h")


def test_a_missing_config_file_from_the_console(env: Path) -> None:
    """The real console entry point: one line on stderr, exit 2, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "consumers.cli", "--config", str(env / "nope.toml"), "config", "show"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"apexrank: --config {env / 'nope.toml'}: no such file"]


def test_config_show_masks_every_url_password_and_token(
    env: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("APEXRANK_RETRAIN__PUSHGATEWAY_URL", "http://u:pgpw@pg:9091")
    monkeypatch.setenv("APEXRANK_REDIS__URL", "redis://:redispw@127.0.0.1:6379/0")
    monkeypatch.setenv("APEXRANK_API__TOKENS", '["tok-read"]')
    monkeypatch.setenv("APEXRANK_API__ADMIN_TOKENS", '["tok-admin"]')
    assert main(["config", "show"]) == 0
    text = capsys.readouterr().out
    assert main(["config", "show", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    for secret in ("pgpw", "redispw", "tok-read", "tok-admin"):
        assert secret not in text and secret not in json.dumps(data)
    assert "APEXRANK_RETRAIN__PUSHGATEWAY_URL=http://u:**********@pg:9091" in text.splitlines()
    assert data["retrain"]["pushgateway_url"] == "http://u:**********@pg:9091"
    assert data["api"]["tokens"] == data["api"]["admin_tokens"] == ["**********"]
