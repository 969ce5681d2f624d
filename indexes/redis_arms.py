"""A/B arms' totals in Redis: one Lua script call per arm, on one node or Redis Cluster.

Keys are :mod:`indexes.redis_schema`'s, both hash-tagged by the experiment and the arm: the totals hash
``{prefix}:arm:{<experiment>:<arm>}`` (fields :data:`~indexes.redis_schema.ARM_FIELDS`) and a dedup key per
event, ``{prefix}:aevt:{<experiment>:<arm>}:<event_id>``. So one script call touches one slot, and the
same path serves a node and a cluster: the calls of a batch (one per arm, a few thousand events each)
go out pipelined, one round trip (one per node on a cluster).

A store keeps one experiment's arms (its config's ``experiment``, ``arms.experiment``): a new experiment
that reuses the arms' names starts from zero, and an old one's totals stay readable under its own name.
The totals have no TTL (an experiment may run for months); docs/arms.md says how to delete an old
experiment's.

For each event the script SETs the dedup key with NX and the dedup window as TTL (the engagement
counters' window) and, only if the key was new, adds the event's change; the changes are written
with one HINCRBY per field at the end. It reads the hash first, so a key of the wrong type fails
the call before anything is written: no dedup key is left without its count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from indexes.arms import ARM_DELTAS, ArmStore, ArmStoreUnavailable, ArmTotals, ArmUpdate
from indexes.redis_client import UNREACHABLE, LazyClient, SyncClient, connect, run_script_calls
from indexes.redis_schema import ARM_LIKES, ARM_PLAYS, RedisKeys, check_prefix

__all__ = ["CHUNK", "RedisArmConfig", "RedisArmStore"]

#: Most events per script call (an arm with more in one batch gets several calls).
CHUNK = 2000

# KEYS = the arm's hash, then one dedup key per event. ARGV = dedup ttl, then per event its plays change
# and likes change. Returns one character per event: n (counted now) or d (seen before).
_SCRIPT = """local ttl = tonumber(ARGV[1])
redis.call('HMGET', KEYS[1], '$plays', '$likes')  -- a key of the wrong type fails here, before any write
local plays, likes = 0, 0
local out = {}
local a = 2
for i = 2, #KEYS do
  if redis.call('SET', KEYS[i], '1', 'NX', 'EX', ttl) then
    plays = plays + tonumber(ARGV[a])
    likes = likes + tonumber(ARGV[a + 1])
    out[#out + 1] = 'n'
  else
    out[#out + 1] = 'd'
  end
  a = a + 2
end
if plays ~= 0 then redis.call('HINCRBY', KEYS[1], '$plays', plays) end
if likes ~= 0 then redis.call('HINCRBY', KEYS[1], '$likes', likes) end
return table.concat(out)
""".replace("$plays", ARM_PLAYS).replace("$likes", ARM_LIKES)


class RedisArmConfig(BaseModel):
    """Connection, key prefix, experiment and dedup window of :class:`RedisArmStore`."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(description="redis://, rediss://, unix:// (one node) or redis+cluster://, rediss+cluster://.")
    key_prefix: str = "apexrank"
    experiment: str = Field(
        min_length=1, description="The A/B experiment whose arms' totals are kept (arms.experiment)."
    )
    dedup_window_s: int = Field(gt=0, description="How long an event id is remembered (as the counters').")
    socket_timeout_s: float = Field(5.0, gt=0)


class RedisArmStore(ArmStore):
    """Per-arm totals of :mod:`indexes.arms`, stored as the module docstring says."""

    config_type: ClassVar[type[BaseModel]] = RedisArmConfig

    def __init__(self, client: SyncClient | Callable[[], SyncClient], config: RedisArmConfig) -> None:
        """``client``: a client, or what makes one on first use (a cluster client connects when made)."""
        self._redis = LazyClient(client)
        self.config = config
        self.keys = RedisKeys(check_prefix(config.key_prefix))

    @classmethod
    def from_config(cls, config: RedisArmConfig) -> RedisArmStore:
        """Connects on first use, so the store can be made while Redis is down."""
        return cls(lambda: connect(config.url, config.socket_timeout_s), config)

    def record(self, arm_names: Sequence[str], event_ids: Sequence[str], types: Sequence[str]) -> ArmUpdate:
        by_arm: dict[str, list[tuple[str, tuple[int, int]]]] = {}
        for arm, event_id, kind in zip(arm_names, event_ids, types, strict=True):
            delta = ARM_DELTAS.get(kind)
            if delta is not None:
                by_arm.setdefault(arm, []).append((event_id, delta))
        experiment = self.config.experiment
        calls: list[tuple[list[str], list[Any]]] = []
        for arm, events in by_arm.items():
            for lo in range(0, len(events), CHUNK):
                keys = [self.keys.arm(experiment, arm)]
                args: list[Any] = [self.config.dedup_window_s]
                for event_id, (plays, likes) in events[lo : lo + CHUNK]:
                    keys.append(self.keys.arm_event(experiment, arm, event_id))
                    args += (plays, likes)
                calls.append((keys, args))
        if not calls:
            return ArmUpdate()
        status = "".join(_text(out) for out in run_script_calls(self._redis.client, self._redis.script(_SCRIPT), calls))
        applied = status.count("n")
        return ArmUpdate(applied=applied, seen=len(status) - applied)

    def totals(self, arm_names: Iterable[str]) -> dict[str, ArmTotals]:
        arms = list(dict.fromkeys(arm_names))
        if not arms:
            return {}
        try:
            pipe = self._redis.client.pipeline(transaction=False)
            for arm in arms:
                pipe.hmget(self.keys.arm(self.config.experiment, arm), [ARM_PLAYS, ARM_LIKES])
            replies = pipe.execute()
        except UNREACHABLE as exc:
            raise ArmStoreUnavailable(f"arm totals: Redis cannot be reached ({type(exc).__name__})") from exc
        return {
            arm: ArmTotals(int(plays or 0), int(likes or 0)) for arm, (plays, likes) in zip(arms, replies, strict=True)
        }

    def close(self) -> None:
        self._redis.close()


def _text(reply: Any) -> str:
    return reply.decode() if isinstance(reply, bytes) else str(reply)
