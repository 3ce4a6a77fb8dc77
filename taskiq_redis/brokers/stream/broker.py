"""The stream broker: at-least-once delivery over a Redis stream and a consumer group.

``kick`` appends the message to the stream ``queue_name`` (one XADD, field ``data``). A worker
is one consumer of the group ``consumer_group_name``: it reads, hands taskiq the ``data`` bytes
exactly as kicked, and acknowledges with one script that also deletes the entry once every group
of the stream is done with it. The broker composes parts with one concern each:

- :class:`~taskiq_redis.brokers.stream.streams.Streams`: which streams are read (the queue, the
  additional streams, their priority levels), their consumer group, and kicks to a level;
- :class:`~taskiq_redis.brokers.stream.reading.Reader`: reads, reads ahead, the order of
  priority levels, and what is handed over next;
- :class:`~taskiq_redis.brokers.stream.claims.Claims`: the entries this consumer holds, their
  renewal and release, and reclaim of entries other consumers left idle;
- :class:`~taskiq_redis.brokers.stream.acks.Acks` and
  :class:`~taskiq_redis.brokers.stream.acks.DeadLetters`: batched acknowledgements, and entries
  moved to ``{queue}:dead``.

All Redis traffic of ``listen()`` runs in tasks of their own that a stop never cancels (see
:class:`~taskiq_redis.brokers.stream.entries.Background`).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Any

from taskiq import AckableMessage, AsyncResultBackend, BrokerMessage
from taskiq.result_backends.dummy import DummyResultBackend

from taskiq_redis import connection, delays, priorities, scripts, task_ids
from taskiq_redis.brokers.base import QueueBroker, refuse_options
from taskiq_redis.brokers.levels_watch import watch_levels_above
from taskiq_redis.brokers.stream.acks import NO_DATA, Acks, DeadLetters
from taskiq_redis.brokers.stream.claims import Claims
from taskiq_redis.brokers.stream.entries import Background, Entry
from taskiq_redis.brokers.stream.reading import Reader
from taskiq_redis.brokers.stream.streams import Streams
from taskiq_redis.exceptions import TaskDeadLetteredError

logger = logging.getLogger("taskiq.redis_broker")

# The longest one XREADGROUP blocks and the longest between two reclaim scans. Below
# redis-py's 5 s socket timeout; it bounds how long a stopping worker waits for a read in
# flight, and how long released entries wait for another consumer.
MAX_BLOCK_SECONDS = 1.0
# redis-py 8's socket timeout when none is given (redis-py 7 has none).
REDIS_PY_SOCKET_TIMEOUT = 5.0


def _whole(name: str, value: Any, minimum: int, optional: bool = False) -> Any:
    """Refuse a count or duration that is not a whole number of at least ``minimum``."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a whole number, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return value


class BaseStreamBroker(QueueBroker):
    """The stream broker; the public classes below only choose how to reach Redis."""

    def __init__(
        self,
        conn: connection.RedisConnection,
        queue_name: str = "taskiq",
        consumer_group_name: str = "taskiq",
        consumer_name: str | None = None,
        consumer_id: str = "$",
        mkstream: bool = True,
        xread_block: int = 2000,
        maxlen: int | None = None,
        approximate: bool = True,
        idle_timeout: int = 600000,
        unacknowledged_batch_size: int = 100,
        unacknowledged_lock_timeout: float | None = None,
        xread_count: int | None = 100,
        additional_streams: Mapping[str, str | int] | None = None,
        max_deliveries: int | None = None,
        result_backend: AsyncResultBackend[Any] | None = None,
        task_id_generator: Callable[[], str] | None = None,
        max_priority: int = priorities.DEFAULT_MAX_PRIORITY,
    ) -> None:
        super().__init__(conn, queue_name, result_backend, task_id_generator)
        self.max_priority = priorities.check_max_priority(max_priority)
        self.consumer_group_name = consumer_group_name
        self.consumer_name = consumer_name or str(uuid.uuid4())
        self.consumer_id = consumer_id
        self.mkstream = mkstream
        self.block: int = _whole("xread_block", xread_block, 0)
        self.maxlen: int | None = _whole("maxlen", maxlen, 0, optional=True)
        self.approximate = approximate
        self.idle_timeout: int = _whole("idle_timeout", idle_timeout, 1)
        self.unacknowledged_batch_size: int = _whole(
            "unacknowledged_batch_size", unacknowledged_batch_size, 1
        )
        self.unacknowledged_lock_timeout = unacknowledged_lock_timeout  # no lock: unused
        self.count: int | None = _whole("xread_count", xread_count, 1, optional=True)
        self.additional_streams = dict(additional_streams or {})
        self.max_deliveries: int | None = _whole("max_deliveries", max_deliveries, 1, optional=True)

        # Where each stream's group starts. 1.2 passed the additional streams' values to
        # XREADGROUP, where only ">" reads new entries; here every stream is read with ">"
        # and a value other than ">" is where that stream's group starts.
        start_ids = {queue_name: consumer_id}
        for stream, start in self.additional_streams.items():
            start_ids.setdefault(stream, consumer_id if start == ">" else str(start))
        self._trim: tuple[Any, ...] = ()
        if self.maxlen is not None:
            self._trim = ("MAXLEN", "~", self.maxlen) if approximate else ("MAXLEN", self.maxlen)
        reclaim_every = min(MAX_BLOCK_SECONDS, self.idle_timeout / 2000)
        # A read must also end well before the socket timeout, or redis-py calls it a failure.
        socket_timeout = conn.client.get_connection_kwargs().get(
            "socket_timeout", REDIS_PY_SOCKET_TIMEOUT
        )
        longest = min(reclaim_every, socket_timeout / 2 if socket_timeout else 10**6)
        block_ms = max(1, int(min(self.block or 10**9, longest * 1000)))

        self._background = Background()
        self._streams = Streams(conn, consumer_group_name, start_ids, self.max_priority, mkstream)
        self._claims = Claims(
            conn,
            self._streams,
            self.consumer_name,
            self.idle_timeout,
            self.unacknowledged_batch_size,
            reclaim_every,
            self._background,
        )
        self._reader = Reader(
            conn,
            self._streams,
            self._claims,
            self._background,
            self.consumer_name,
            self.count,
            block_ms,
            socket_timeout,
        )
        self._acks = Acks(conn, self._streams, self._claims, self._background, self._handed_count)
        self._dead_letters = DeadLetters(
            conn, self._streams, self._claims, self.max_deliveries, self._tell_waiters
        )
        trim = None if self.maxlen is None else (self.maxlen, approximate)
        by_level = {queue: levels.by_level for queue, levels in self._streams.levels.items()}
        self._mover = delays.Mover(conn, by_level, "stream", trim)
        self._levels_watch: asyncio.Task[None] | None = None  # warns of levels above ours

    @property
    def read_patience(self) -> float:
        """Seconds a read may go unanswered before it is given up and made again."""
        return self._reader.read_patience

    def _handed_count(self) -> int:
        return self._reader.handed_count

    async def _tell_waiters(self, entry: Entry, reason: str) -> None:
        """Store an error result for a dead-lettered task, so ``wait_result()`` returns at once.

        Only for a taskiq message (anything else has no task id anyone could wait for).
        """
        if entry.data is None or isinstance(self.result_backend, DummyResultBackend):
            return
        try:
            task_id = self.formatter.loads(entry.data).task_id
        except Exception:  # not a taskiq message: nobody can be waiting for it
            return
        error = TaskDeadLetteredError(task_id=task_id, deliveries=entry.deliveries, reason=reason)
        await self.store_error_result(task_id, error)

    def task_queue(self, queue_name: str | None = None) -> task_ids.Queue:
        name = queue_name or self.queue_name
        return task_ids.Queue(name, "stream", self.max_priority, self.consumer_group_name)

    async def startup(self) -> None:
        """Load the scripts, create the consumer group on each queue, find its level streams."""
        await super().startup()
        needed = {self._acks.script, *self._claims.scripts, *self._streams.scripts}
        needed.add(scripts.get("stream_read"))
        await scripts.load(self._conn, needed)
        await self._streams.startup()

    async def kick(self, message: BrokerMessage) -> None:
        """Append the message to the stream of its level: one XADD (trimmed to ``maxlen`` if set).

        A message with a ``delay`` label waits in the stream's delayed set instead (see delays).
        A bad label raises ValueError and nothing is sent.
        """
        queue = self.queue_of(message)
        level = priorities.level_of(message.labels, self.max_priority)
        if task_ids.is_recorded(message.labels, "stream"):
            await self.kick_recorded(message, level, self._trim)
            return
        if await delays.defer(self._conn, queue, message, level):
            return
        await self._streams.add(queue, level, message.message, self._trim)

    async def listen(self) -> AsyncGenerator[AckableMessage, None]:
        """Yield the messages of every stream read, each with its ack; never raises.

        Whatever goes wrong with Redis (connection errors, failovers, cluster errors, a lost
        consumer group, which is created again) is logged and retried with a capped backoff,
        because an exception here would stop the worker.
        """
        self._mover.start()
        if self._levels_watch is None:
            queue_names = list(self._streams.levels)
            self._levels_watch = asyncio.ensure_future(
                watch_levels_above(self._conn, queue_names, self.max_priority, "stream")
            )
        while True:
            self._claims.keep_renewing()
            entry = await self._reader.next()
            delivery = self._claims.get(entry)
            if delivery is None:  # another consumer reclaimed it meanwhile
                continue
            problem, data = self._dead_letters.problem(entry), entry.data
            if problem is not None or data is None:
                why = problem or NO_DATA
                self._background.spawn(self._dead_letters.send(entry, delivery, why))
                continue
            delivery.handed = self._reader.handed()
            yield AckableMessage(data=data, ack=self._acks.ack_for(entry, delivery))

    async def shutdown(self) -> None:
        """Stop renewing, release every held entry to the other consumers, close.

        Reads and acks still in flight are awaited (at most about a second) so that what reads
        took is released too. An entry never handed to taskiq gets its delivery count back.
        """
        renewer = self._claims.stop_renewing()
        if self._levels_watch is not None:
            self._levels_watch.cancel()
        await self._mover.stop()
        pending = self._background.tasks | ({renewer} if renewer else set())
        if pending:
            await asyncio.wait(pending, timeout=MAX_BLOCK_SECONDS + 2)
        await self._claims.release()
        self._reader.clear()
        await super().shutdown()


class RedisStreamBroker(connection.SingleNodeAttributes, BaseStreamBroker):
    """A stream broker on one Redis server."""

    def __init__(
        self,
        url: str,
        queue_name: str = "taskiq",
        max_connection_pool_size: int | None = None,
        consumer_group_name: str = "taskiq",
        consumer_name: str | None = None,
        consumer_id: str = "$",
        mkstream: bool = True,
        xread_block: int = 2000,
        maxlen: int | None = None,
        approximate: bool = True,
        idle_timeout: int = 600000,
        unacknowledged_batch_size: int = 100,
        unacknowledged_lock_timeout: float | None = None,
        xread_count: int | None = 100,
        additional_streams: dict[str, str | int] | None = None,
        *,
        max_deliveries: int | None = None,
        result_backend: AsyncResultBackend[Any] | None = None,
        task_id_generator: Callable[[], str] | None = None,
        max_priority: int = priorities.DEFAULT_MAX_PRIORITY,
        **connection_kwargs: Any,
    ) -> None:
        refuse_options(type(self).__name__, connection_kwargs)
        super().__init__(
            connection.single_node(url, max_connection_pool_size, **connection_kwargs),
            queue_name,
            consumer_group_name,
            consumer_name,
            consumer_id,
            mkstream,
            xread_block,
            maxlen,
            approximate,
            idle_timeout,
            unacknowledged_batch_size,
            unacknowledged_lock_timeout,
            xread_count,
            additional_streams,
            max_deliveries,
            result_backend,
            task_id_generator,
            max_priority,
        )


class RedisStreamClusterBroker(connection.ClusterAttributes, BaseStreamBroker):
    """A stream broker on a Redis Cluster; each stream lives in the slot of its name."""

    def __init__(
        self,
        url: str,
        queue_name: str = "taskiq",
        max_connection_pool_size: int = 2**31,
        consumer_group_name: str = "taskiq",
        consumer_name: str | None = None,
        consumer_id: str = "$",
        mkstream: bool = True,
        xread_block: int = 10000,
        maxlen: int | None = None,
        approximate: bool = True,
        additional_streams: dict[str, str | int] | None = None,
        *,
        idle_timeout: int = 600000,
        unacknowledged_batch_size: int = 100,
        unacknowledged_lock_timeout: float | None = None,
        xread_count: int | None = 100,
        max_deliveries: int | None = None,
        result_backend: AsyncResultBackend[Any] | None = None,
        task_id_generator: Callable[[], str] | None = None,
        max_priority: int = priorities.DEFAULT_MAX_PRIORITY,
        **connection_kwargs: Any,
    ) -> None:
        refuse_options(type(self).__name__, connection_kwargs)
        super().__init__(
            connection.cluster(url, max_connection_pool_size, **connection_kwargs),
            queue_name,
            consumer_group_name,
            consumer_name,
            consumer_id,
            mkstream,
            xread_block,
            maxlen,
            approximate,
            idle_timeout,
            unacknowledged_batch_size,
            unacknowledged_lock_timeout,
            xread_count,
            additional_streams,
            max_deliveries,
            result_backend,
            task_id_generator,
            max_priority,
        )


class RedisStreamSentinelBroker(connection.SentinelAttributes, BaseStreamBroker):
    """A stream broker on the primary that Redis Sentinel names."""

    def __init__(
        self,
        sentinels: list[tuple[str, int]],
        master_name: str,
        min_other_sentinels: int = 0,
        queue_name: str = "taskiq",
        consumer_group_name: str = "taskiq",
        consumer_name: str | None = None,
        consumer_id: str = "$",
        mkstream: bool = True,
        xread_block: int = 10000,
        maxlen: int | None = None,
        approximate: bool = True,
        additional_streams: dict[str, str | int] | None = None,
        *,
        sentinel_kwargs: Any | None = None,
        max_connection_pool_size: int | None = None,
        idle_timeout: int = 600000,
        unacknowledged_batch_size: int = 100,
        unacknowledged_lock_timeout: float | None = None,
        xread_count: int | None = 100,
        max_deliveries: int | None = None,
        result_backend: AsyncResultBackend[Any] | None = None,
        task_id_generator: Callable[[], str] | None = None,
        max_priority: int = priorities.DEFAULT_MAX_PRIORITY,
        **connection_kwargs: Any,
    ) -> None:
        refuse_options(type(self).__name__, connection_kwargs)
        super().__init__(
            connection.sentinel(
                sentinels,
                master_name,
                min_other_sentinels,
                sentinel_kwargs,
                max_connection_pool_size,
                **connection_kwargs,
            ),
            queue_name,
            consumer_group_name,
            consumer_name,
            consumer_id,
            mkstream,
            xread_block,
            maxlen,
            approximate,
            idle_timeout,
            unacknowledged_batch_size,
            unacknowledged_lock_timeout,
            xread_count,
            additional_streams,
            max_deliveries,
            result_backend,
            task_id_generator,
            max_priority,
        )
