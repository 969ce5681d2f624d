"""Redis clients by URL: one node, or Redis Cluster, for the score store and the engagement counters.

URL schemes:

* ``redis://``, ``rediss://`` (TLS), ``unix://``: one Redis node (or a proxy in front of a cluster),
  redis-py's own URL syntax;
* ``redis+cluster://[user:password@]host:port[,host:port...][?option=value]`` and
  ``rediss+cluster://`` (TLS): Redis Cluster through redis-py's ``RedisCluster``, which follows
  MOVED/ASK redirections and routes each command to its key's master. Every host listed is a
  startup node (one suffices; list several so that start-up survives one being down). The query
  options are redis-py's, as for ``redis://``; there is no database number on a cluster.
  (redis-py has no cluster scheme of its own: its ``RedisCluster.from_url`` takes one
  ``redis://`` node.)

On a cluster each command, pipeline entry and script call must touch one slot: the key layout
(:mod:`indexes.redis_schema`) puts everything of one song, or of one feed, in its hash tag's slot,
and the stores pick their one-slot paths up front (:func:`is_cluster_url`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cached_property
from typing import Any
from urllib.parse import urlsplit

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
import redis.exceptions
from redis.commands.core import Script

#: The schemes that name Redis Cluster (``indexes`` registers these with the one-node ones).
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")

#: A synchronous client of either kind (both offer the same data commands and pipelines).
SyncClient = redis.Redis | redis.cluster.RedisCluster
AsyncClient = redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster

#: What "the cluster cannot be reached" raises besides redis-py's ConnectionError (it is not a RedisError).
UNREACHABLE: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.RedisClusterException,
)


def is_cluster_url(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster (``redis+cluster://``, ``rediss+cluster://``)."""
    return urlsplit(url).scheme.lower() in CLUSTER_SCHEMES


def cluster_nodes(url: str) -> tuple[str, list[tuple[str, int]]]:
    """A cluster URL as (a ``redis://`` URL of its first node with the credentials and options,
    every node's (host, port)). ValueError, never echoing the URL (it may hold a password), if
    it names no node or a database other than 0."""
    parts = urlsplit(url)
    base = "rediss" if parts.scheme.lower() == "rediss+cluster" else "redis"
    userinfo, _, hosts = parts.netloc.rpartition("@")
    nodes: list[tuple[str, int]] = []
    for item in filter(None, hosts.split(",")):
        if item.startswith("["):  # [::1]:7000
            host, _, rest = item[1:].partition("]")
            port_text = rest.removeprefix(":")
        else:
            host, _, port_text = item.rpartition(":") if ":" in item else (item, "", "")
        try:
            port = int(port_text) if port_text else 6379
        except ValueError:
            raise ValueError(f"{parts.scheme}:// URL: a node's port is not a number") from None
        if not host:
            raise ValueError(f"{parts.scheme}:// URL: a node has no host")
        nodes.append((host, port))
    if not nodes:
        raise ValueError(f"{parts.scheme}:// URL names no node: use {parts.scheme}://host:port[,host:port...]")
    if parts.path.strip("/") not in ("", "0"):
        raise ValueError(f"{parts.scheme}:// URL: Redis Cluster has only database 0")
    host, port = nodes[0]
    shown = f"[{host}]" if ":" in host else host
    first = f"{base}://{userinfo + '@' if userinfo else ''}{shown}:{port}"
    return first + (f"/?{parts.query}" if parts.query else ""), nodes


def _options(socket_timeout_s: float) -> dict[str, Any]:
    """The client options of both kinds of client: str replies, the timeout on every socket."""
    return {
        "decode_responses": True,
        "socket_timeout": socket_timeout_s,
        "socket_connect_timeout": socket_timeout_s,
        "health_check_interval": 30,
    }


def connect(url: str, socket_timeout_s: float) -> SyncClient:
    """A client for ``url`` with decoded (str) replies. A cluster client connects (and reads the
    slot map) here: an unreachable cluster raises redis-py's ConnectionError, as a node would on
    its first command."""
    options = _options(socket_timeout_s)
    if not is_cluster_url(url):
        return redis.Redis.from_url(url, **options)
    first, nodes = cluster_nodes(url)
    startup = [redis.cluster.ClusterNode(host, port) for host, port in nodes[1:]]
    try:
        return redis.cluster.RedisCluster(url=first, startup_nodes=startup, **options)
    except redis.exceptions.RedisClusterException as exc:
        raise redis.exceptions.ConnectionError(f"Redis Cluster: {exc}") from exc


def connect_async(url: str, socket_timeout_s: float) -> AsyncClient:
    """The asyncio client for ``url`` (create it inside the event loop that uses it; it connects
    on its first command)."""
    options = _options(socket_timeout_s)
    if not is_cluster_url(url):
        return redis.asyncio.Redis.from_url(url, **options)
    first, nodes = cluster_nodes(url)
    startup = [redis.asyncio.cluster.ClusterNode(host, port) for host, port in nodes[1:]]
    return redis.asyncio.cluster.RedisCluster.from_url(first, startup_nodes=startup, **options)


class LazyClient:
    """A store's client, made on first use, with its Lua scripts registered once each.

    Lets a store be built while Redis is down (a cluster client connects when made) and closed
    without ever having connected; the stores share it rather than each keeping its own copy.
    """

    def __init__(self, client: SyncClient | Callable[[], SyncClient]) -> None:
        """``client``: a client, or what makes one on first use."""
        self._connect: Callable[[], SyncClient] = client if callable(client) else lambda: client
        self._scripts: dict[str, Script] = {}

    @cached_property
    def client(self) -> SyncClient:
        return self._connect()

    def script(self, source: str) -> Script:
        """``source`` registered on the client (once; redis-py loads it on a node's first NOSCRIPT)."""
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = self.client.register_script(source)
        return script

    def close(self) -> None:
        if "client" in self.__dict__:  # never connected: nothing to close
            self.client.close()


def cross_slot(exc: redis.exceptions.ResponseError) -> bool:
    """Whether Redis (a proxy, or a node) refused a multi-key command because its keys span cluster slots."""
    text = str(exc).lower()
    return "cross" in text or "same slot" in text


def run_script_calls(client: SyncClient, script: Script, calls: Sequence[tuple[list[str], list[Any]]]) -> list[Any]:
    """``script`` once per (keys, args), pipelined in one round trip; the replies in order.

    Raises the first call's error after all ran (the others' writes stand). A cluster pipeline
    cannot load a script first, so a node that lacks it answers NOSCRIPT: the script is then
    loaded on every master and those calls alone are sent again (NOSCRIPT means they never ran).
    """
    pipe = client.pipeline(transaction=False)
    for keys, args in calls:
        script(keys=keys, args=args, client=pipe)
    out: list[Any] = pipe.execute(raise_on_error=False)
    missing = [i for i, reply in enumerate(out) if isinstance(reply, redis.exceptions.NoScriptError)]
    if missing:
        client.script_load(script.script)
        pipe = client.pipeline(transaction=False)
        for i in missing:
            script(keys=calls[i][0], args=calls[i][1], client=pipe)
        for i, reply in zip(missing, pipe.execute(raise_on_error=False), strict=True):
            out[i] = reply
    for reply in out:
        if isinstance(reply, Exception):
            raise reply
    return out
