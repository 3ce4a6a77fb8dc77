"""Single node, cluster and sentinel behind one small interface.

Brokers, result backends and schedule sources are written once against
:class:`RedisConnection`; the topology is only a choice of factory here. Commands go through
:meth:`RedisConnection.execute`, which is ``execute_command`` of the underlying redis-py client,
so routing (cluster slots, sentinel failover) stays redis-py's job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster, Sentinel
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff

from taskiq_redis.diagnostics import describe, server_message
from taskiq_redis.pipelining import AutoPipeline
from taskiq_redis.pools import CountingBlockingPool
from taskiq_redis.sentinels import BlockingSentinelPool, Sentinels

if TYPE_CHECKING:
    from redis.asyncio.client import PubSub

    Client: TypeAlias = "Redis | RedisCluster"

Topology = Literal["single", "cluster", "sentinel"]

logger = logging.getLogger("taskiq.redis")

# How often a sentinel connection asks the sentinels which server is the primary. redis-py asks
# only when it opens a connection, and a demoted primary keeps taking writes on the connections
# already open until the sentinels reconfigure it (8 s after SENTINEL FAILOVER): writes that
# the new primary never sees.
PRIMARY_CHECK = 0.5


class RedisConnection:
    """The client of one topology and how to close it.

    ``client`` is a ``redis.asyncio.Redis`` (single node, or the sentinel's current primary)
    or a ``redis.asyncio.RedisCluster``; both borrow a pooled connection per command, so a
    blocking read holds one connection and never stalls the others.
    """

    def __init__(
        self,
        client: Client,
        topology: Topology,
        closers: list[Callable[[], Awaitable[None]]],
        pool: BlockingConnectionPool | None = None,
        sentinel: Sentinel | None = None,
        master_name: str | None = None,
    ) -> None:
        self.client = client
        self._pipeline = AutoPipeline(client)
        self.topology: Topology = topology
        self.pool = pool
        self.sentinel = sentinel
        self.master_name = master_name
        self._closers = closers
        self._unwatched = sentinel is not None  # the primary watch starts with the first call
        self._watch: asyncio.Task[None] | None = None

    @property
    def is_cluster(self) -> bool:
        """Whether keys are spread over slots, so every script call must stay in one slot."""
        return self.topology == "cluster"

    async def execute(self, *args: Any, **options: Any) -> Any:
        """Send one command and return redis-py's parsed reply.

        Commands issued while others are under way share round trips (see :mod:`pipelining`);
        blocking commands are always sent on their own.
        """
        if self._unwatched:
            self._start_watch()
        try:
            return await self._pipeline.execute(*args, **options)
        except FINAL_ERRORS as error:
            raise explained(error) from None

    def pubsub(self) -> PubSub:
        """A pub/sub session; on a cluster it follows the nodes that own the channels."""
        if self._unwatched:
            self._start_watch()
        return self.client.pubsub()

    async def close(self) -> None:
        """Close every socket this connection opened (pools, sentinel links)."""
        self._unwatched = False
        if self._watch is not None:
            watch, self._watch = self._watch, None
            watch.cancel()
            # Bounded: redis-py's sentinel lookup can swallow a cancellation; the loop then
            # ends by itself, seeing that the watch is no longer this connection's.
            await asyncio.wait({watch}, timeout=1.0)
        await self._pipeline.close()
        for closer in self._closers:
            await closer()

    def _start_watch(self) -> None:
        self._unwatched = False
        self._watch = asyncio.ensure_future(self._follow_primary())

    async def _follow_primary(self) -> None:
        """Move every connection to the primary the sentinels name, as soon as they name it.

        Connections to the old primary, idle or in use (a blocking read, a kept connection),
        are closed; their commands are retried on the new primary by the reconnect retry.
        """
        assert isinstance(self.client, Redis)
        pool = self.client.connection_pool
        assert isinstance(pool, BlockingSentinelPool)
        primary = None
        me = asyncio.current_task()
        while self._watch is me:
            try:
                named = await pool.get_master_address()  # type: ignore[no-untyped-call]
            except Exception as error:  # the watch must outlive any error (asyncio timeouts too)
                logger.debug("Asking the sentinels for the primary failed: %s", describe(error))
                named = primary
            if primary is not None and named != primary:
                logger.warning(
                    "The sentinels name %s:%s the primary of %r (was %s:%s); reconnecting",
                    *named,
                    self.master_name,
                    *primary,
                )
                await self._pipeline.close()
                await pool.disconnect(inuse_connections=True)
            elif named is not None:
                await self._close_strays(pool, named)
            primary = named
            await asyncio.sleep(PRIMARY_CHECK)

    async def _close_strays(self, pool: BlockingSentinelPool, primary: Any) -> None:
        """Close the connections that are not to ``primary``, idle or in use.

        A connection whose lookup got the old primary just before the switch can finish
        connecting to it just after the switch closed every connection. The old primary takes
        writes that are lost when it is demoted, then answers READONLY; a blocking read there
        was once seen never to return. So every check closes such strays too.
        """
        for connection in list(pool.made_connections):
            address = getattr(connection, "host", None), getattr(connection, "port", None)
            if connection.is_connected and address != tuple(primary):
                logger.warning(
                    "A connection to %s:%s is not to the primary of %r (%s:%s); closing it",
                    *address,
                    self.master_name,
                    *primary,
                )
                with contextlib.suppress(Exception):
                    await connection.disconnect()


# Errors that retrying cannot fix: redis-py's AuthenticationError and AuthorizationError are
# ConnectionErrors, so a plain retry on ConnectionError would retry a wrong password.
FINAL_ERRORS: tuple[type[redis_errors.RedisError], ...] = (
    redis_errors.AuthenticationError,
    redis_errors.AuthorizationError,
    redis_errors.AuthenticationWrongNumberOfArgsError,
    redis_errors.NoPermissionError,
)

_ADVICE = {
    redis_errors.NoPermissionError: (
        'grant this Redis user what the README section "ACL: what a deployment needs" lists '
        "for this part (every part but the pub/sub broker runs Lua scripts: +@scripting, or at "
        "least +evalsha +script|load)"
    ),
}
_AUTH_ADVICE = (
    "check the username and password in the Redis URL (or the username/password arguments) "
    "against the server's ACL; retrying cannot fix this"
)
_EXPLAINED = "; taskiq-redis: "


def explained(error: redis_errors.RedisError) -> redis_errors.RedisError:
    """``error``, same class, with the server's words and what to do about it."""
    message = server_message(error)
    if _EXPLAINED not in message:
        advice = next(
            (text for kind, text in _ADVICE.items() if isinstance(error, kind)), _AUTH_ADVICE
        )
        error.args = (f"{message}{_EXPLAINED}{advice}", *error.args[1:])
    return error


class _Reconnect(Retry):
    """redis-py's Retry, except for :data:`FINAL_ERRORS`, which are raised at once."""

    async def call_with_retry(self, do: Any, fail: Any, *more: Any, **options: Any) -> Any:
        async def attempt() -> Any:
            try:
                return await do()
            except FINAL_ERRORS as error:
                raise _Final(error) from None

        try:
            return await super().call_with_retry(attempt, fail, *more, **options)
        except _Final as final:
            raise final.error from None


class _Final(Exception):
    """Carries a final error past the retry loop, which would retry any ConnectionError."""

    def __init__(self, error: redis_errors.RedisError) -> None:
        super().__init__(str(error))
        self.error = error


def with_reconnect(connection_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Retry a command whose pooled connection died (server restart, failover) on a new one.

    redis-py gives pooled connections no retries, so after a restart the first command on
    every stale connection would fail. Only connection errors are retried, with a short
    backoff, and never those retrying cannot fix (:data:`FINAL_ERRORS`); a caller's own
    ``retry`` wins.
    """
    if "retry" in connection_kwargs or "retry_on_error" in connection_kwargs:
        return connection_kwargs
    backoff = ExponentialBackoff(cap=1.0, base=0.05)
    retry = _Reconnect(backoff, 3, (redis_errors.ConnectionError,))
    return {**connection_kwargs, "retry": retry}


def single_node(
    url: str,
    max_connection_pool_size: int | None = None,
    **connection_kwargs: Any,
) -> RedisConnection:
    """One Redis server: a ``BlockingConnectionPool`` from ``url``, as in taskiq-redis 1.2."""
    pool = CountingBlockingPool.from_url(
        url,
        max_connections=max_connection_pool_size,
        **with_reconnect(connection_kwargs),
    )
    client = Redis(connection_pool=pool)
    return RedisConnection(client, "single", [client.aclose, pool.disconnect], pool=pool)


def cluster(
    url: str,
    max_connection_pool_size: int | None = None,
    **connection_kwargs: Any,
) -> RedisConnection:
    """A Redis Cluster found from one node's ``url``; keyword arguments go to ``RedisCluster``."""
    if max_connection_pool_size is not None:
        connection_kwargs["max_connections"] = max_connection_pool_size
    client = RedisCluster.from_url(url, **connection_kwargs)
    return RedisConnection(client, "cluster", [client.aclose])


# The links to the sentinels: one lookup asks every sentinel once (a second try only for a
# connection that went stale), and the primary's connection retries the lookup as a whole.
# redis-py's default (10 retries with exponential backoff) took seconds per dead sentinel, and
# the retries multiplied, so a producer's startup() took 16 s to say the sentinels were down.
SENTINEL_LINK_RETRIES = 1


def sentinel(
    sentinels: list[tuple[str, int]],
    master_name: str,
    min_other_sentinels: int = 0,
    sentinel_kwargs: Any | None = None,
    max_connection_pool_size: int | None = None,
    **connection_kwargs: Any,
) -> RedisConnection:
    """The primary that the sentinels name ``master_name``; it is looked up again on failover."""
    # The pool size goes to the primary's pool alone, not to the links to the sentinels.
    size = connection_kwargs.pop("max_connections", None)
    if max_connection_pool_size is not None:
        size = max_connection_pool_size
    if sentinel_kwargs is None:  # as redis-py: the links take the socket options
        sentinel_kwargs = {k: v for k, v in connection_kwargs.items() if k.startswith("socket_")}
    if "retry" not in sentinel_kwargs and "retry_on_error" not in sentinel_kwargs:
        sentinel_kwargs = {**sentinel_kwargs, "retry": Retry(NoBackoff(), SENTINEL_LINK_RETRIES)}
    watcher = Sentinels(
        sentinels,
        min_other_sentinels=min_other_sentinels,
        sentinel_kwargs=sentinel_kwargs,
        **with_reconnect(connection_kwargs),
    )
    client = watcher.master_for(
        master_name,
        connection_pool_class=BlockingSentinelPool,
        max_connections=size,
    )
    closers: list[Callable[[], Awaitable[None]]] = [client.aclose]
    closers += [link.aclose for link in watcher.sentinels]
    return RedisConnection(client, "sentinel", closers, sentinel=watcher, master_name=master_name)


class HasConnection:
    """Every broker, result backend and schedule source of this package: its connection."""

    _conn: RedisConnection

    @property
    def redis_connection(self) -> RedisConnection:
        """The connection its commands go through (the operators' tools use it too)."""
        return self._conn


class SingleNodeAttributes:
    """The public attributes taskiq-redis 1.2 gave its single-node classes."""

    _conn: RedisConnection

    @property
    def connection_pool(self) -> BlockingConnectionPool:
        """The connection pool every command borrows from."""
        assert self._conn.pool is not None
        return self._conn.pool

    @property
    def redis_pool(self) -> BlockingConnectionPool:
        """The result backend's name for :attr:`connection_pool` in taskiq-redis 1.2."""
        return self.connection_pool


class ClusterAttributes:
    """The public attribute taskiq-redis 1.2 gave its cluster classes."""

    _conn: RedisConnection

    @property
    def redis(self) -> RedisCluster:
        """The cluster client."""
        assert isinstance(self._conn.client, RedisCluster)
        return self._conn.client


class SentinelAttributes:
    """The public attribute taskiq-redis 1.2 gave its sentinel classes."""

    _conn: RedisConnection

    @property
    def sentinel(self) -> Sentinel:
        """The sentinel client that names the current primary."""
        assert self._conn.sentinel is not None
        return self._conn.sentinel

    @property
    def master_name(self) -> str:
        """The name the sentinels know the primary by."""
        assert self._conn.master_name is not None
        return self._conn.master_name


# Errors a listener waits out instead of raising: the server restarts, fails over or moves
# slots, or a read times out. redis-py's own retries have given up by the time one reaches us.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.ClusterDownError,
    redis_errors.TryAgainError,
    redis_errors.ReadOnlyError,
    redis_errors.SlotNotCoveredError,
    OSError,
)


class Backoff:
    """Capped exponential delays between reconnect attempts, with jitter.

    The jitter keeps a fleet of workers that lost the same server from reconnecting in
    lockstep; the cap bounds how long a worker stays idle after the server is back.
    """

    def __init__(self, first: float = 0.05, cap: float = 2.0) -> None:
        self.first = first
        self.cap = cap
        self._next = first

    def reset(self) -> None:
        """Start again from the shortest delay (after a success)."""
        self._next = self.first

    async def wait(self) -> None:
        """Sleep for the current delay, and double the next one up to the cap."""
        await asyncio.sleep(random.uniform(self._next / 2, self._next))
        self._next = min(self.cap, self._next * 2)
