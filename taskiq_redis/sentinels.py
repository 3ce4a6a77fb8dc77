"""The sentinel topology's pieces: redis-py's sentinel classes, taught to follow a failover.

A connection to the primary asks the sentinels where it is on every reconnect, the primary's
pool waits for a free connection like the single-node one and remembers every connection it
made (for the primary watch in :mod:`taskiq_redis.connection`), and the sentinel client says what
each sentinel answered and rides out their absence. Subclasses of redis-py's classes name their
own state without a leading underscore, so it can never collide with redis-py's private names.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Sentinel
from redis.asyncio.sentinel import (
    MasterNotFoundError,
    SentinelConnectionPool,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)

from taskiq_redis.diagnostics import describe
from taskiq_redis.pools import CountsHandedOut

logger = logging.getLogger("taskiq.redis")


class AsksOnReconnect(SentinelManagedConnection):
    """A connection to the sentinels' primary that asks them where it is on every reconnect.

    redis-py's sentinel connection asks the sentinels in ``connect()``, but a connection closed
    under a command (a failover, the primary watch) is reconnected by redis-py's retry through
    ``connect_check_health()``, to the address it had: after a failover, the old primary. That
    primary takes writes that are lost when it is demoted, then answers READONLY, and a
    blocking read there was seen never to return (redis-py 7.2 to 8.1).
    """

    # connect_to() is connecting to an address the sentinels just gave. (The subclasses of
    # redis-py's classes name their own state without a leading underscore, so it can never
    # collide with redis-py's private names.)
    connecting_to_named = False

    async def connect_to(self, address: Any) -> None:
        self.connecting_to_named = True
        try:
            await super().connect_to(address)  # type: ignore[no-untyped-call]
        finally:
            self.connecting_to_named = False

    async def connect_check_health(
        self, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        if (
            not self.is_connected
            and not self.connecting_to_named
            and self.connection_pool.is_master
        ):
            await self.connect()  # type: ignore[no-untyped-call]
            return
        await super().connect_check_health(
            check_health=check_health, retry_socket_connect=retry_socket_connect
        )


class AsksOnReconnectSSL(AsksOnReconnect, SentinelManagedSSLConnection):
    """The same over TLS."""


class BlockingSentinelPool(CountsHandedOut, SentinelConnectionPool, BlockingConnectionPool):
    """The sentinel's primary pool, waiting for a free connection as the single-node pool does.

    redis-py's SentinelConnectionPool raises "Too many connections" once ``max_connections``
    are in use; blocking reads, pub/sub and command lanes share the pool, so under a small
    limit a command would fail instead of waiting its turn. Its connections ask the sentinels
    for the primary on every reconnect (see :class:`AsksOnReconnect`).
    """

    def __init__(self, service_name: str, sentinel_manager: Sentinel, **kwargs: Any) -> None:
        secure = kwargs.get("ssl", False)
        kwargs.setdefault("connection_class", AsksOnReconnectSSL if secure else AsksOnReconnect)
        # Every connection the pool made, idle or in use, for the primary watch to check.
        self.made_connections: weakref.WeakSet[Any] = weakref.WeakSet()
        self.handed_out = set()
        super().__init__(service_name, sentinel_manager, **kwargs)  # type: ignore[no-untyped-call]

    def make_connection(self) -> Any:
        connection = super().make_connection()  # type: ignore[no-untyped-call]
        self.made_connections.add(connection)
        return connection


class Sentinels(Sentinel):
    """redis-py's Sentinel, saying what each sentinel answered, and riding out their absence.

    redis-py's own "no primary" message lists a repr of each sentinel's client followed by the
    error's kind (``network:ConnectionError``): neither the address nor what went wrong.
    """

    def __init__(self, sentinels: Any, force_master_ip: str | None = None, **kwargs: Any) -> None:
        super().__init__(sentinels, force_master_ip=force_master_ip, **kwargs)  # type: ignore[no-untyped-call,unused-ignore]
        self.forced_primary_ip = force_master_ip
        self.last_named: dict[str, tuple[str, int]] = {}  # the primary last named, per service
        self.unanswered: set[str] = set()  # services now served from ``last_named``

    async def discover_master(self, service_name: str) -> tuple[str, int]:
        """The address the first sentinel that knows a healthy ``service_name`` names.

        Like redis-py, the sentinel that answered moves to the front for the next lookup. When
        no sentinel can be reached at all (a sentinel restarting, a network blip) the primary
        they last named is the answer: their absence says nothing about the primary, and a new
        connection, say one for a blocking read, should not fail because of it. Before any
        sentinel has answered (start-up) or when one answers that the primary is down, there is
        no such answer: the error says what each sentinel said.
        """
        answers = []
        reached = False
        for index, link in enumerate(self.sentinels):
            where = "{host}:{port}".format(**link.connection_pool.connection_kwargs)
            try:
                primaries: dict[str, Any] = await link.sentinel_masters()  # type: ignore[assignment]
            except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as error:
                answers.append(f"{where} ({describe(error)})")
                continue
            reached = True
            state = primaries.get(service_name)
            if state is None:
                answers.append(f"{where} (monitors no primary of that name)")
            elif not self.check_master_state(state, service_name):
                flags = state["flags"]  # a set of words, or one string with RESP3
                flags = flags if isinstance(flags, str) else ",".join(sorted(flags))
                answers.append(f"{where} (names {state['ip']}:{state['port']}, flags {flags})")
            else:
                self.sentinels[0], self.sentinels[index] = link, self.sentinels[0]
                forced = self.forced_primary_ip
                named = (state["ip"] if forced is None else forced), state["port"]
                self.last_named[service_name] = named
                if service_name in self.unanswered:
                    self.unanswered.discard(service_name)
                    logger.info("A sentinel answers again for %r: %s:%s", service_name, *named)
                return named
        told = "; ".join(answers)
        last = self.last_named.get(service_name)
        if last is not None and not reached:
            if service_name not in self.unanswered:
                self.unanswered.add(service_name)
                logger.warning(
                    "No sentinel answers for %r (%s); using the primary they last named, %s:%s",
                    service_name,
                    told,
                    *last,
                )
            return last
        raise MasterNotFoundError(f"No master found for {service_name!r}; sentinels asked: {told}")
