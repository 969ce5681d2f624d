#!/usr/bin/env python3
"""Container health checks for the apexrank images (the images ship no curl or wget).

    healthcheck.py http URL [--timeout S]   exit 0 when GET URL answers 2xx (worker /metrics, API /healthz)
    healthcheck.py deps [--timeout S]       exit 0 when Redis answers PING and a Kafka bootstrap
                                            server accepts a TCP connection, both read from the
                                            APEXRANK_* settings (the feedback consumer, the retrain loop)

Exit status 0 is healthy, 1 unhealthy, 2 a usage error. One line on stdout says why.
``deps`` suits readiness checks, not liveness: a Redis outage must not restart every pod.
"""

from __future__ import annotations

import argparse
import socket
import sys
import urllib.error
import urllib.request


def check_http(url: str, timeout: float) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            status = int(resp.status)
    except urllib.error.HTTPError as exc:
        return False, f"{url}: HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        return False, f"{url}: {exc}"
    return 200 <= status < 300, f"{url}: HTTP {status}"


def _split_host_port(address: str, default_port: int) -> tuple[str, int]:
    address = address.strip()
    if address.startswith("["):  # [::1]:9092
        host, _, rest = address[1:].partition("]")
        return host, int(rest.lstrip(":") or default_port)
    if address.count(":") == 1:
        host, port = address.split(":")
        return host, int(port)
    return address, default_port


def check_deps(timeout: float) -> tuple[bool, str]:
    # imported here so that `http` checks stay fast
    from indexes.redis_client import UNREACHABLE, connect
    from ranker.settings import Settings

    settings = Settings()
    try:  # the project's own client: a single node or a Redis Cluster (redis+cluster://), as the services use
        client = connect(settings.redis.url.get_secret_value(), timeout)
    except UNREACHABLE as exc:
        return False, f"redis: {exc}"
    try:
        client.ping()
    except UNREACHABLE as exc:
        return False, f"redis: {exc}"
    finally:
        client.close()

    errors = []
    for address in settings.kafka.bootstrap_list:
        host, port = _split_host_port(address, 9092)
        try:
            with socket.create_connection((host, port), timeout=timeout):
                return True, f"redis: PONG; kafka: {host}:{port} accepts connections"
        except OSError as exc:
            errors.append(f"{host}:{port}: {exc}")
    return False, "kafka: no bootstrap server reachable (" + "; ".join(errors) + ")"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="healthcheck.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    http = sub.add_parser("http", help="GET a URL, healthy on 2xx")
    http.add_argument("url")
    http.add_argument("--timeout", type=float, default=3.0)
    deps = sub.add_parser("deps", help="Redis PING and a TCP connection to a Kafka bootstrap server")
    deps.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)

    if args.mode == "http":
        ok, why = check_http(args.url, args.timeout)
    else:
        try:
            ok, why = check_deps(args.timeout)
        except Exception as exc:  # bad settings and the like: report, do not traceback
            ok, why = False, f"deps: {type(exc).__name__}: {exc}"
    print(("healthy: " if ok else "unhealthy: ") + why)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
