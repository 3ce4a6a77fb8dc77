"""The pub/sub broker: every listening worker gets every message, at most once.

A queue is a Redis pub/sub channel named ``queue_name``, as in taskiq-redis 1.2. Redis keeps
nothing: a message published while no worker listens, or while a worker reconnects, is gone,
and there are no acknowledgements.

On a Redis Cluster the channel is a shard channel (SPUBLISH / SSUBSCRIBE, Redis 7.0+): a
message travels only to the primary that owns the channel's slot (and its replicas) instead
of being broadcast over the cluster bus to every node, so traffic does not grow with the
number of nodes, and redis-py's cluster pub/sub follows the slot when it moves.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, Callable
from typing import TYPE_CHECKING, Any

import redis
from taskiq import AsyncResultBackend, BrokerMessage

from taskiq_redis import connection, delays, priorities
from taskiq_redis.brokers.base import BaseRedisBroker, refuse_options
from taskiq_redis.diagnostics import describe

if TYPE_CHECKING:
    from redis.asyncio.client import PubSub

try:
    from redis.asyncio.cluster import ClusterPubSub
except ImportError:  # redis-py 7: asyncio cluster pub/sub came in redis-py 8.0
    ClusterPubSub = None  # type: ignore[assignment,misc]

logger = logging.getLogger("taskiq.redis_broker")

# Events that carry a published message; (un)subscribe confirmations and pongs do not.
DATA_EVENTS = frozenset({"message", "smessage"})
# The longest one read waits. Not a poll (no command is sent): a pending timer is what lets a
# worker stop, because taskiq sets its stop event from a plain signal handler, which does not
# wake an event loop that has nothing else to wait for.
WAKE_SECONDS = 1.0


class SubscriptionLostError(Exception):
    """The session no longer listens to the channel (a slot moved away); subscribe again."""


RESUBSCRIBE_ON: tuple[type[BaseException], ...] = (
    *connection.TRANSIENT_ERRORS,
    SubscriptionLostError,
)


def refuse_labels(message: BrokerMessage) -> None:
    """Refuse the labels the pub/sub broker cannot honour (see :meth:`BasePubSubBroker.kick`)."""
    if delays.delay_ms(message.labels) is not None:  # a bad delay raises there, named too
        raise ValueError(
            f"the pub/sub broker cannot delay a message (label {delays.DELAY_LABEL}="
            f"{message.labels[delays.DELAY_LABEL]!r}): Redis pub/sub keeps no message; use "
            "the stream or list broker, or a schedule source"
        )
    if message.labels.get(priorities.PRIORITY_LABEL) is not None:
        raise ValueError(
            f"the pub/sub broker cannot order messages by priority (label "
            f"{priorities.PRIORITY_LABEL}={message.labels[priorities.PRIORITY_LABEL]!r}): "
            "Redis pub/sub delivers each at once; use the stream or list broker"
        )


class BasePubSubBroker(BaseRedisBroker):
    """The pub/sub broker; the public classes below only choose how to reach Redis."""

    async def kick(self, message: BrokerMessage) -> None:
        """Publish the message to its channel: one PUBLISH (SPUBLISH on a cluster).

        A ``delay`` label that asks for a wait, or any ``priority`` label, is refused with a
        ValueError naming it, and nothing is sent: Redis keeps no pub/sub message, so there is
        nothing to hold back or to order, and ignoring the label would run the task at once
        (``SmartRetryMiddleware`` would retry without waiting).
        """
        refuse_labels(message)
        command = "SPUBLISH" if self._conn.is_cluster else "PUBLISH"
        await self._conn.execute(command, self.queue_of(message), message.message)

    async def listen(self) -> AsyncGenerator[bytes, None]:
        """Yield every message published to ``queue_name`` while subscribed.

        Connection errors are logged; the session is then opened and subscribed again after
        a capped backoff, so a server restart never ends the worker.
        """
        backoff = connection.Backoff()
        failed = False
        while True:
            session = self._conn.pubsub()
            try:
                await self._subscribe(session, failed)
                backoff.reset()
                while True:
                    event = await self._next_event(session)
                    if event is not None and event["type"] in DATA_EVENTS:
                        yield event["data"]
            except RESUBSCRIBE_ON as exc:
                logger.warning(
                    "Channel %r lost (%s); subscribing again", self.queue_name, describe(exc)
                )
                failed = True
            finally:
                with contextlib.suppress(Exception):
                    await session.aclose()  # type: ignore[no-untyped-call,unused-ignore]
            await backoff.wait()

    async def _subscribe(self, session: PubSub, after_failure: bool) -> None:
        """Subscribe to ``queue_name``; on a cluster, at the node that owns its slot now.

        The cluster client learns the slot map on its first command, which a listener may not
        have sent yet, and keeps it until a command fails; after a failure the map is read
        again, since the owner may have failed over.
        """
        if ClusterPubSub is not None and isinstance(session, ClusterPubSub):
            if after_failure:
                await session.cluster.nodes_manager.initialize()
            else:
                await session.cluster.initialize()
            await session.ssubscribe(self.queue_name)
        else:
            await session.subscribe(self.queue_name)

    async def _next_event(self, session: PubSub) -> dict[str, Any] | None:
        """The next event of the session, or None after WAKE_SECONDS without one."""
        if ClusterPubSub is not None and isinstance(session, ClusterPubSub):
            event = await session.get_sharded_message(timeout=WAKE_SECONDS)
            # A slot that moved away can leave the session with no node to read from.
            listening = bool(session.node_pubsub_mapping)
        else:
            event = await session.get_message(timeout=WAKE_SECONDS)
            listening = session.subscribed
        if event is None and not listening:
            raise SubscriptionLostError(self.queue_name)
        result: dict[str, Any] | None = event
        return result


class PubSubBroker(connection.SingleNodeAttributes, BasePubSubBroker):
    """Pub/sub on one Redis server."""

    def __init__(
        self,
        url: str,
        task_id_generator: Callable[[], str] | None = None,
        result_backend: AsyncResultBackend[Any] | None = None,
        queue_name: str = "taskiq",
        max_connection_pool_size: int | None = None,
        **connection_kwargs: Any,
    ) -> None:
        refuse_options(type(self).__name__, connection_kwargs)
        super().__init__(
            connection.single_node(url, max_connection_pool_size, **connection_kwargs),
            queue_name,
            result_backend,
            task_id_generator,
        )


class PubSubClusterBroker(connection.ClusterAttributes, BasePubSubBroker):
    """Pub/sub on a Redis Cluster, over the shard channel ``queue_name`` (Redis 7.0+).

    Needs redis-py 8: redis-py 7 has no cluster pub/sub in asyncio.
    """

    def __init__(
        self,
        url: str,
        queue_name: str = "taskiq",
        max_connection_pool_size: int = 2**31,
        *,
        result_backend: AsyncResultBackend[Any] | None = None,
        task_id_generator: Callable[[], str] | None = None,
        **connection_kwargs: Any,
    ) -> None:
        refuse_options(type(self).__name__, connection_kwargs)
        if ClusterPubSub is None:
            raise RuntimeError(
                "PubSubClusterBroker needs redis-py 8.0 or newer (asyncio cluster pub/sub);"
                f" redis-py {redis.__version__} is installed"
            )
        super().__init__(
            connection.cluster(url, max_connection_pool_size, **connection_kwargs),
            queue_name,
            result_backend,
            task_id_generator,
        )


class PubSubSentinelBroker(connection.SentinelAttributes, BasePubSubBroker):
    """Pub/sub on the primary that Redis Sentinel names."""

    def __init__(
        self,
        sentinels: list[tuple[str, int]],
        master_name: str,
        result_backend: AsyncResultBackend[Any] | None = None,
        task_id_generator: Callable[[], str] | None = None,
        queue_name: str = "taskiq",
        min_other_sentinels: int = 0,
        sentinel_kwargs: Any | None = None,
        **connection_kwargs: Any,
    ) -> None:
        refuse_options(type(self).__name__, connection_kwargs)
        super().__init__(
            connection.sentinel(
                sentinels, master_name, min_other_sentinels, sentinel_kwargs, **connection_kwargs
            ),
            queue_name,
            result_backend,
            task_id_generator,
        )
