"""Presence in Redis: each user's open connections, on every hub process.

A sorted set per user (``hub:c:<user>``) holds connection ids scored by when
their process last vouched for them. Processes refresh their connections
every few seconds; entries of a process that died without cleaning up
expire after ``ttl_s``. Admission is one Lua script (expire old entries,
count, add), so two processes cannot both admit the 11th connection.

While Redis is unreachable admission falls back to this process's own count
(fail open): connections keep working, the cluster-wide bound loosens.
"""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from .presence import MemoryPresence

__all__ = ["RedisPresence"]

log = logging.getLogger("hub.presence")

# Redis connections for admissions and refreshes, per process. A connect
# storm waits for one of them (at most the socket timeout) rather than opening
# a connection per concurrent admission, which could exhaust Redis's clients.
MAX_CONNECTIONS = 16
POOL_WAIT_S = 10.0  # for a free connection; past it, this admission is counted locally

ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ttl = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
if redis.call('ZSCORE', KEYS[1], ARGV[3]) then
    redis.call('ZADD', KEYS[1], now, ARGV[3])
    return 1
end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
    return 0
end
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('PEXPIRE', KEYS[1], math.floor(ttl * 2000))
return 1
"""

REFRESH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
for i = 2, #ARGV do
    redis.call('ZADD', KEYS[1], now, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], math.floor(tonumber(ARGV[1]) * 2000))
return 1
"""


LIVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
return redis.call('ZRANGEBYSCORE', KEYS[1], now - tonumber(ARGV[1]), '+inf')
"""


def key(user: str) -> str:
    return "hub:c:" + user


class RedisPresence:
    def __init__(self, url: str, *, ttl_s: float = 30.0) -> None:
        # One retry on a fresh connection: after a Redis restart the pooled
        # connections are dead, and the first admission would otherwise fall
        # back to this process's own count.
        pool = redis.BlockingConnectionPool.from_url(
            url,
            max_connections=MAX_CONNECTIONS,
            timeout=POOL_WAIT_S,
            socket_connect_timeout=2.0,
            socket_timeout=2.0,
            retry=Retry(NoBackoff(), 1),
            retry_on_error=[RedisConnectionError],
        )
        self._client = redis.Redis.from_pool(pool)  # closed with the client
        self._ttl_s = ttl_s
        self._admit = self._client.register_script(ADMIT)
        self._refresh = self._client.register_script(REFRESH)
        self._live = self._client.register_script(LIVE)
        self._local = MemoryPresence()
        self._mine: dict[str, set[str]] = {}
        self._task: asyncio.Task[None] | None = None
        # Released while a refresh was on its way: removed again after it, so
        # that the refresh (which adds every connection it names, to put them
        # back after a Redis restart) leaves no entry of a closed one.
        self._released: list[tuple[str, str]] | None = None

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self._client.aclose()

    async def acquire(self, user: str, connection: str, limit: int) -> bool:
        try:
            admitted = bool(
                await self._admit(keys=[key(user)], args=[self._ttl_s, limit, connection])
            )
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("presence unavailable, counting locally: %s", type(exc).__name__)
            admitted = await self._local.acquire(user, connection, limit)
        if admitted:
            self._mine.setdefault(user, set()).add(connection)
        return admitted

    async def connections(self, user: str) -> list[str]:
        try:
            found = await self._live(keys=[key(user)], args=[self._ttl_s])
        except (RedisError, OSError, TimeoutError):
            return await self._local.connections(user)
        return sorted(m.decode() if isinstance(m, bytes) else str(m) for m in found)

    def release(self, user: str, connection: str) -> None:
        self._local.release(user, connection)
        mine = self._mine.get(user)
        if mine is not None:
            mine.discard(connection)
            if not mine:
                del self._mine[user]
        if self._released is not None:
            self._released.append((user, connection))
        asyncio.get_running_loop().create_task(self._forget(user, connection))

    async def _forget(self, user: str, connection: str) -> None:
        try:
            await self._client.zrem(key(user), connection)
        except (RedisError, OSError, TimeoutError):
            pass  # the entry expires on its own

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self._ttl_s / 3)
            # Every connection of this process, added again if missing: after a
            # Redis restart (which keeps nothing), and for connections admitted
            # on the local count while Redis was away, so the limit holds again.
            self._released = []
            try:
                async with self._client.pipeline(transaction=False) as pipe:
                    for user, connections in list(self._mine.items()):
                        await self._refresh(
                            keys=[key(user)], args=[self._ttl_s, *connections], client=pipe
                        )
                    await pipe.execute()
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning("presence refresh failed: %s", type(exc).__name__)
            released, self._released = self._released, None
            for user, connection in released:
                await self._forget(user, connection)
