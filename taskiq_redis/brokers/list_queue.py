"""The list queue broker: each message goes to one worker, at most once.

A queue is a Redis list named ``queue_name``, as in taskiq-redis 1.2: ``kick`` LPUSHes, a
listener pops from the other end, so messages come out oldest first. A listener takes up to
``batch_size`` messages at once with the ``list_pop`` script, so a busy queue costs one round
trip per batch; only when the queue is empty does it block, natively, in BRPOP. After a pop
that took a whole batch (a backlog), the next one starts while a quarter of it is still held,
asking for what tops the held messages up to ``batch_size``: taskiq does not wait for it.

A ``priority`` label puts the message in the list of its level (see :mod:`priorities`; no
label: the queue itself). The script takes its batch from the highest level that holds messages,
and BRPOP names the levels highest first, so higher levels always go first.

There are no acknowledgements: a message is gone from Redis once popped. A worker killed
while running a task loses that task, and a worker killed outright also loses the messages it
popped but has not yet handed to taskiq (at most ``batch_size``). A worker that stops
cleanly puts those back at the end of their level's list that is popped next, so they keep
their place.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterable
from typing import Any

from taskiq import AsyncResultBackend, BrokerMessage

from taskiq_redis import connection, delays, keys, priorities, scripts, task_ids
from taskiq_redis.brokers.base import READ_AHEAD_SHARE, QueueBroker, refuse_options
from taskiq_redis.brokers.levels_watch import watch_levels_above
from taskiq_redis.diagnostics import describe

logger = logging.getLogger("taskiq.redis_broker")

LIST_POP = "list_pop"
# Messages one pop takes. A worker killed outright loses what it popped and had not handed to
# taskiq, at most this many; a worker draining no-op tasks ran at a median 71% of taskiq's
# ceiling with 10, 81-93% with 30 (docs/performance.md, "Worker drain").
DEFAULT_BATCH_SIZE = 30
MAX_BATCH_SIZE = 1000
# How long one BRPOP blocks. Below redis-py's default 5 s socket timeout, so an idle queue
# never looks like a dead connection; it is also about the longest an idle worker takes to
# stop, since a stop waits for a pop in flight to answer before putting its message back.
BLOCK_SECONDS = 1
# How long a stop waits for the answer of a pop in flight before giving up on it.
RESCUE_SECONDS = BLOCK_SECONDS + 2.0

_Popped = tuple[int, bytes]  # (priority level, message)


def _highest_first(popped: _Popped) -> int:
    return -popped[0]


def check_batch_size(batch_size: int) -> int:
    """Refuse a batch size the ``list_pop`` script would refuse, before any worker starts."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise TypeError(f"batch_size must be a whole number, got {batch_size!r}")
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise ValueError(f"batch_size must be from 1 to {MAX_BATCH_SIZE}, got {batch_size}")
    return batch_size


class BaseListQueueBroker(QueueBroker):
    """The list queue broker; the public classes below only choose how to reach Redis."""

    def __init__(
        self,
        conn: connection.RedisConnection,
        queue_name: str = "taskiq",
        result_backend: AsyncResultBackend[Any] | None = None,
        task_id_generator: Callable[[], str] | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_priority: int = priorities.DEFAULT_MAX_PRIORITY,
    ) -> None:
        super().__init__(conn, queue_name, result_backend, task_id_generator)
        self.batch_size = check_batch_size(batch_size)
        self._pop_ahead_at = self.batch_size // READ_AHEAD_SHARE
        self.max_priority = priorities.check_max_priority(max_priority)
        self._levels = priorities.Levels(queue_name, self.max_priority)
        self._script = scripts.get(LIST_POP)
        self._mover = delays.Mover(conn, {queue_name: self._levels.by_level}, "list")

    async def startup(self) -> None:
        """Load the script now, so the first batch does not pay for a NOSCRIPT answer."""
        await super().startup()
        await scripts.load(self._conn, [self._script])

    async def kick(self, message: BrokerMessage) -> None:
        """Append the message to its queue: one LPUSH, to the list of its ``priority`` level.

        A ``delay`` label parks it instead (see delays). A bad label raises ValueError and
        nothing is sent.
        """
        queue = self.queue_of(message)
        level = priorities.level_of(message.labels, self.max_priority)
        if task_ids.is_recorded(message.labels, "list"):
            await self.kick_recorded(message, level)
            return
        if await delays.defer(self._conn, queue, message, level):
            return
        await self._conn.execute("LPUSH", keys.priority_key(queue, level), message.message)

    def task_queue(self, queue_name: str | None = None) -> task_ids.Queue:
        return task_ids.Queue(queue_name or self.queue_name, "list", self.max_priority)

    async def listen(self) -> AsyncGenerator[bytes, None]:
        """Yield messages highest level first and oldest first within a level.

        Redis errors are logged and waited out, never raised. On a clean stop (the generator is
        closed or cancelled) the messages already popped but not yet yielded go back to their
        lists.
        """
        popped: deque[_Popped] = deque()
        ahead: asyncio.Task[list[_Popped]] | None = None  # a pop before `popped` runs out
        asked = self.batch_size  # how many the last pop asked for
        backlog = False  # the last pop took all it asked for
        checked = 0.0  # when Redis last said which levels hold messages (monotonic)
        backoff = connection.Backoff()
        self._mover.start()
        watch = asyncio.ensure_future(
            watch_levels_above(self._conn, [self.queue_name], self.max_priority, "list")
        )
        try:
            while True:
                while popped:
                    if ahead is None and backlog and len(popped) <= self._pop_ahead_at:
                        asked = self.batch_size - len(popped)
                        ahead = asyncio.ensure_future(self._take_batch(count=asked))
                    if ahead is not None and ahead.done():
                        taken, ahead = self._taken(ahead), None
                        backlog = len(taken) >= asked
                        popped = deque(sorted((*popped, *taken), key=_highest_first))
                        checked = time.monotonic()
                    level = popped[0][0]
                    if (
                        level < self.max_priority
                        and time.monotonic() - checked > priorities.RECHECK_SECONDS
                    ):
                        popped.extendleft(reversed(await self._recheck(level)))
                        checked = time.monotonic()
                    yield popped.popleft()[1]
                try:
                    taken = []
                    if ahead is not None:
                        request, ahead = ahead, None
                        taken = await self._finish(request)
                        backlog = len(taken) >= asked
                    if not taken:
                        taken = await self._pop_batch()
                        backlog = len(taken) >= self.batch_size
                    popped.extend(taken)
                except Exception as exc:  # any Redis error (WRONGTYPE too) must not end a worker
                    logger.warning(
                        "Reading queue %r failed; retrying: %s", self.queue_name, describe(exc)
                    )
                    await backoff.wait()
                else:
                    checked = time.monotonic()
                    backoff.reset()
        finally:
            watch.cancel()
            if ahead is not None:  # stopping: what the pop ahead took goes back too
                await asyncio.wait({ahead}, timeout=RESCUE_SECONDS)
                popped.extend(self._taken(ahead) if ahead.done() else [])
            await self._put_back(popped)

    def _taken(self, pop: asyncio.Task[list[_Popped]]) -> list[_Popped]:
        """What a finished pop ahead took; its failure is logged (the next pop tries again)."""
        error = asyncio.CancelledError() if pop.cancelled() else pop.exception()
        if error is None:
            return pop.result()
        logger.warning("Reading queue %r failed: %s", self.queue_name, describe(error))
        return []

    async def shutdown(self) -> None:
        """Stop moving delayed messages, then close."""
        await self._mover.stop()
        await super().shutdown()

    async def _pop_batch(self) -> list[_Popped]:
        """Take up to ``batch_size`` of the oldest messages of the highest level holding any; if
        there are none, wait for one.

        The script comes first, so a busy queue costs one round trip per batch. Only an
        empty queue is waited on, with BRPOP; the script call that found it empty was made
        before the wait, so it adds no delay to the message that ends the wait.
        """
        taken = await self._finish(self._take_batch())
        if not taken:
            taken = await self._finish(self._wait_for_one())
        return taken

    async def _recheck(self, level: int) -> list[_Popped]:
        """A batch of the levels above ``level``, to go before the held messages of ``level``.

        The held messages are popped already, so a failure here must not hold them up: it is
        logged, and they are handed over.
        """
        try:
            return await self._finish(self._take_batch(above=level))
        except Exception as exc:  # whatever it is, the held messages go on
            logger.warning(
                "Checking the higher levels of %r failed: %s", self.queue_name, describe(exc)
            )
            return []

    async def _take_batch(self, above: int = -1, count: int | None = None) -> list[_Popped]:
        read_order = self._levels.read_order(above)
        taken = await scripts.run(self._conn, self._script, read_order, [count or self.batch_size])
        if not taken:
            return []
        level = self._levels.level(read_order[int(taken[0]) - 1])
        return [(level, message) for message in taken[1]]

    async def _wait_for_one(self) -> list[_Popped]:
        popped = await self._conn.execute("BRPOP", *self._levels.read_order(), BLOCK_SECONDS)
        return [] if popped is None else [(self._levels.level(popped[0]), popped[1])]

    async def _finish(
        self, pop: Coroutine[Any, Any, list[_Popped]] | asyncio.Task[list[_Popped]]
    ) -> list[_Popped]:
        """Run a pop to its end even when a stop cancels the listener, and put back its take.

        Cancelling the pop itself would close the connection under a reply that may already
        hold popped messages; so the pop runs as a task of its own, and a stop waits for its
        answer (at most BLOCK_SECONDS for a BRPOP) before letting the cancellation through.
        """
        request = asyncio.ensure_future(pop)
        try:
            return await asyncio.shield(request)
        except asyncio.CancelledError:
            try:
                taken = await asyncio.wait_for(request, RESCUE_SECONDS)
            except Exception as exc:  # stopping: a failed pop has nothing to put back
                logger.warning(
                    "A pop in flight on %r failed on stop: %s", self.queue_name, describe(exc)
                )
            else:
                await self._put_back(taken)
            raise

    async def _put_back(self, messages: Iterable[_Popped]) -> None:
        """Return popped messages to their level's end that is popped next, in their order."""
        newest_first: dict[int, list[bytes]] = {}
        for level, message in reversed(list(messages)):
            newest_first.setdefault(level, []).append(message)
        for level, returned in newest_first.items():
            key = self._levels.key(level)
            try:
                await self._conn.execute("RPUSH", key, *returned)
            except connection.TRANSIENT_ERRORS as exc:
                logger.error(
                    "Could not put %d popped messages back on %r; they are lost: %s",
                    len(returned),
                    key,
                    describe(exc),
                )
            else:
                logger.info("Put %d popped messages back on %r", len(returned), key)


class ListQueueBroker(connection.SingleNodeAttributes, BaseListQueueBroker):
    """A list queue on one Redis server."""

    def __init__(
        self,
        url: str,
        task_id_generator: Callable[[], str] | None = None,
        result_backend: AsyncResultBackend[Any] | None = None,
        queue_name: str = "taskiq",
        max_connection_pool_size: int | None = None,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_priority: int = priorities.DEFAULT_MAX_PRIORITY,
        **connection_kwargs: Any,
    ) -> None:
        refuse_options(type(self).__name__, connection_kwargs)
        super().__init__(
            connection.single_node(url, max_connection_pool_size, **connection_kwargs),
            queue_name,
            result_backend,
            task_id_generator,
            batch_size,
            max_priority,
        )


class ListQueueClusterBroker(connection.ClusterAttributes, BaseListQueueBroker):
    """A list queue on a Redis Cluster; the list lives in the slot of ``queue_name``."""

    def __init__(
        self,
        url: str,
        queue_name: str = "taskiq",
        max_connection_pool_size: int = 2**31,
        *,
        result_backend: AsyncResultBackend[Any] | None = None,
        task_id_generator: Callable[[], str] | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_priority: int = priorities.DEFAULT_MAX_PRIORITY,
        **connection_kwargs: Any,
    ) -> None:
        refuse_options(type(self).__name__, connection_kwargs)
        super().__init__(
            connection.cluster(url, max_connection_pool_size, **connection_kwargs),
            queue_name,
            result_backend,
            task_id_generator,
            batch_size,
            max_priority,
        )


class ListQueueSentinelBroker(connection.SentinelAttributes, BaseListQueueBroker):
    """A list queue on the primary that Redis Sentinel names."""

    def __init__(
        self,
        sentinels: list[tuple[str, int]],
        master_name: str,
        result_backend: AsyncResultBackend[Any] | None = None,
        task_id_generator: Callable[[], str] | None = None,
        queue_name: str = "taskiq",
        min_other_sentinels: int = 0,
        sentinel_kwargs: Any | None = None,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_priority: int = priorities.DEFAULT_MAX_PRIORITY,
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
            batch_size,
            max_priority,
        )
