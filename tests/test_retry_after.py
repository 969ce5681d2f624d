"""A transient audio-host answer with Retry-After sets the retry's not-before at least that far off."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from email.utils import formatdate

import pytest

from consumers.loop import Message
from consumers.retries import NOT_BEFORE_MS, RetryPolicy
from ranker.audio.fetch import fetch_audio
from ranker.errors import InputError
from ranker.retry_after import retry_after_s
from ranker.settings import AudioSettings, Settings, WorkerSettings


@pytest.fixture
def busy_host() -> Iterator[tuple[str, list[str]]]:
    """A loopback audio host answering 503 with the Retry-After value at the front of the list."""
    answers: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(503)
            if answers and answers[0]:
                self.send_header("Retry-After", answers[0])
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/song.wav", answers
    finally:
        server.shutdown()
        server.server_close()


def _fetch_error(url: str) -> InputError:
    with pytest.raises(InputError) as info:
        fetch_audio(url, AudioSettings(allow_private_networks=True))
    assert info.value.transient
    return info.value


def _not_before_s(policy: RetryPolicy, error: InputError, now: float) -> float:
    msg = Message("songs.generated", 0, 7, b"s1", b"{}")
    plan = policy.plan([(msg, error)], now=now)
    ((_, _, _, headers),) = plan.retries
    return int(dict(headers)[NOT_BEFORE_MS]) / 1000 - now


def test_a_retry_waits_as_long_as_the_host_asked_up_to_the_longest_backoff(busy_host: tuple[str, list[str]]) -> None:
    url, answers = busy_host
    settings = Settings(worker=WorkerSettings(fetch_backoff_initial_s=1.0, fetch_backoff_max_s=120.0))
    policy = RetryPolicy(settings)
    now = 1_000_000.0
    answers[:] = ["45"]
    assert _fetch_error(url).retry_after_s == 45.0
    assert _not_before_s(policy, _fetch_error(url), now) == pytest.approx(45.0, abs=0.002)  # not the 1 s backoff
    answers[:] = ["86400"]  # a day: capped at fetch_backoff_max_s
    assert _not_before_s(policy, _fetch_error(url), now) == pytest.approx(120.0, abs=0.002)
    answers[:] = [formatdate(time.time() + 30, usegmt=True)]  # an HTTP date
    assert 25.0 <= (_fetch_error(url).retry_after_s or 0.0) <= 31.0
    answers[:] = [""]  # none: the backoff alone
    error = _fetch_error(url)
    assert error.retry_after_s is None
    assert _not_before_s(policy, error, now) == pytest.approx(1.0, abs=0.002)
    answers[:] = ["\u00b2"]  # unreadable (a superscript two): still a 503 retried after the backoff alone
    error = _fetch_error(url)
    assert error.retry_after_s is None
    assert _not_before_s(policy, error, now) == pytest.approx(1.0, abs=0.002)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("0", 0.0),
        (" 12 ", 12.0),
        ("soon", None),
        (None, None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
        ("\u00b2", None),  # str.isdigit() says yes to a superscript two; float() does not
        ("\u0661\u0662", None),  # Arabic-Indic digits: not delta-seconds either
    ],
)
def test_retry_after_values(value: str | None, seconds: float | None) -> None:
    assert retry_after_s(value) == seconds  # a date in the past means now
