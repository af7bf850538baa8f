"""Pacing deliveries to an endpoint across every worker: pauses, a rate per second, concurrency.

All three live in Redis, so they hold for the whole fleet, not per process:

- **pause**: after a 429/503 an endpoint's deliveries wait until its ``Retry-After`` (1 s if
  absent, at most ``MAX_PAUSE_S``); every worker holds back what it takes for that endpoint.
- **rate**: ``max_rate_per_s`` is a counter per endpoint and wall-clock second.
- **concurrency**: ``max_concurrency`` is a set of slots (a sorted set scored by expiry); a
  batch takes up to that many, sends through them, and gives them back. Slots of a worker that
  died expire with its lease, so a crash never starves an endpoint for long.

What an endpoint cannot take now is *held*: the caller puts it back to due a little later
without counting an attempt. Redis being unreachable never stops delivery: pacing is then
skipped (sending beats stalling) and a warning is logged.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import redis

from herald import keys

logger = logging.getLogger(__name__)

# The longest an endpoint is paused for one 429/503 answer, whatever its Retry-After says.
MAX_PAUSE_S = 300.0

# Take up to ARGV[3] slots out of ARGV[2], after dropping expired ones; each slot is a member
# named ARGV[5]:n scored with its expiry ARGV[4]. Returns how many were taken.
_TAKE_SLOTS = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local free = tonumber(ARGV[2]) - redis.call('ZCARD', KEYS[1])
local n = math.min(tonumber(ARGV[3]), free)
for i = 1, n do redis.call('ZADD', KEYS[1], ARGV[4], ARGV[5] .. ':' .. i) end
if n > 0 then redis.call('PEXPIREAT', KEYS[1], math.ceil(tonumber(ARGV[4]) * 1000)) end
return math.max(n, 0)
"""


class Pacing:
    """Shared pacing state of endpoints, for one worker process."""

    def __init__(self, client: redis.Redis, *, prefix: str) -> None:
        self.redis = client
        self.prefix = prefix
        self._take_slots = client.register_script(_TAKE_SLOTS)

    def pause_keys(self, endpoint_ids: Sequence[str]) -> list[str]:
        """The keys to ``MGET`` for ``pauses`` (a worker reads them with its other commands at take)."""
        return [keys.pause(self.prefix, e) for e in endpoint_ids]

    @staticmethod
    def pauses(endpoint_ids: Sequence[str], raw: Sequence[Any]) -> dict[str, float]:
        """The endpoints paused now, with the epoch second their pause ends, from the values of
        ``pause_keys(endpoint_ids)``."""
        now = time.time()
        until = {e: float(v) for e, v in zip(endpoint_ids, raw, strict=True) if v is not None}
        return {e: t for e, t in until.items() if t > now}

    def pause(self, waits_s: Mapping[str, float]) -> None:
        """Pause each endpoint for its wait (bounded to ``MAX_PAUSE_S``), extending a shorter pause."""
        if not waits_s:
            return
        try:
            pipe = self.redis.pipeline(transaction=False)
            for endpoint_id, wait_s in waits_s.items():
                wait_s = min(max(wait_s, 0.1), MAX_PAUSE_S)
                pipe.set(keys.pause(self.prefix, endpoint_id), time.time() + wait_s, px=int(wait_s * 1000))
            pipe.execute()
        except redis.RedisError:
            logger.warning("pacing: could not record an endpoint pause")

    def admit_rate(self, wanted: Counter[str], limits: Mapping[str, int]) -> dict[str, int]:
        """How many of ``wanted`` sends per endpoint fit in this second's ``max_rate_per_s``."""
        wanted = Counter({e: n for e, n in wanted.items() if e in limits})
        if not wanted:
            return {}
        second = int(time.time())
        try:
            pipe = self.redis.pipeline(transaction=False)
            for endpoint_id, count in wanted.items():
                key = keys.rate(self.prefix, endpoint_id, second)
                pipe.incrby(key, count)
                pipe.expire(key, 5)
            totals = pipe.execute()[0::2]
        except redis.RedisError:
            logger.warning("pacing: Redis unreachable, endpoint rates not counted")
            return dict(wanted)
        return {
            endpoint_id: max(0, min(count, limits[endpoint_id] - (int(total) - count)))
            for (endpoint_id, count), total in zip(wanted.items(), totals, strict=True)
        }

    def take_slots(self, wanted: Mapping[str, int], limits: Mapping[str, int], *, hold_s: float) -> Slots:
        """Concurrency slots for ``wanted`` sends per endpoint, at most ``limits[e]`` in use fleet-wide."""
        slots = Slots(self, token=uuid.uuid4().hex)
        now = time.time()
        for endpoint_id, want in wanted.items():
            limit = limits.get(endpoint_id)
            if limit is None:
                continue
            try:
                taken = int(
                    self._take_slots(
                        keys=[keys.slots(self.prefix, endpoint_id)],
                        args=[now, limit, min(want, limit), now + hold_s, slots.token],
                    )
                )
            except redis.RedisError:
                logger.warning("pacing: Redis unreachable, endpoint concurrency not limited")
                taken = min(want, limit)
            slots.taken[endpoint_id] = taken
        return slots


class Slots:
    """Concurrency slots one batch holds; ``release()`` gives them back, ``renew()`` extends them."""

    def __init__(self, pacing: Pacing, *, token: str) -> None:
        self.pacing = pacing
        self.token = token
        self.taken: dict[str, int] = {}

    def _held(self) -> list[tuple[str, list[str]]]:
        return [
            (keys.slots(self.pacing.prefix, e), [f"{self.token}:{i}" for i in range(1, n + 1)])
            for e, n in self.taken.items()
            if n > 0
        ]

    def renew(self, hold_s: float) -> None:
        until = time.time() + hold_s
        try:
            pipe = self.pacing.redis.pipeline(transaction=False)
            for key, members in self._held():
                pipe.zadd(key, dict.fromkeys(members, until), xx=True)
            pipe.execute()
        except redis.RedisError:
            logger.warning("pacing: could not renew concurrency slots")

    def release(self) -> None:
        try:
            pipe = self.pacing.redis.pipeline(transaction=False)
            for key, members in self._held():
                pipe.zrem(key, *members)
            pipe.execute()
        except redis.RedisError:
            logger.warning("pacing: could not release concurrency slots; they expire by themselves")
        self.taken.clear()
