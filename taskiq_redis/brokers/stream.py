"""The stream broker: at-least-once delivery over a Redis stream and a consumer group.

``kick`` appends the message to the stream ``queue_name`` (one XADD, field ``data``). A worker
is one consumer of the group ``consumer_group_name``: it reads with XREADGROUP, hands taskiq the
``data`` bytes exactly as kicked, and acknowledges with one script that also deletes the entry
once every group of the stream is done with it.

How many tasks run at once is taskiq's business (``--max-async-tasks``): its receiver pulls a
message from ``listen()`` only when it has room. ``xread_count`` is the COUNT of one read.
After a full read (a backlog) the next one starts, without blocking, while a quarter of it is
left to hand over, or sooner when the held entries are due for a look at the levels above (see
:meth:`BaseStreamBroker._recheck`); it asks for no more than keeps what was read and not yet
handed over below 1.25 times ``xread_count``. Otherwise a read starts when taskiq asks and
nothing is held.

What a consumer read and has not acknowledged stays in the group's pending list, so nothing is
lost when a worker dies; three scripts keep those entries moving:

- ``stream_reclaim`` (every second at most, when taskiq asks for messages): entries idle longer
  than ``idle_timeout`` ms are claimed by this consumer. Their consumer died, or let them go.
- ``stream_renew`` (every ``idle_timeout / 3``, in a background task): the entries this consumer
  holds get their idle time reset, so a task that runs longer than ``idle_timeout`` is not run a
  second time elsewhere; it never takes back an entry another consumer reclaimed meanwhile. On a
  clean stop the same script releases what this consumer still holds (idle time set huge), so
  the next reclaim by any consumer takes it at once instead of after ``idle_timeout``.
- ``stream_ack``: acknowledge, many entries per call (acks that arrive while one call is under
  way go together in the next), or one entry copied first to the dead-letter stream
  ``{queue}:dead`` (too many deliveries, no ``data`` field). ``ack()`` only queues the
  acknowledgement, so a task's slot in taskiq is free without waiting for Redis; the entry is
  held (and renewed) until the call is answered, and a clean stop sends what is queued.

A ``priority`` label sends the message to the stream of its level (see :mod:`priorities`; no
label: the queue itself), one more stream in the same consumer group, so reclaim, renewal, acks
and dead letters work on it as on any stream read. Reads name the levels highest first: the
``stream_read`` script returns the first level that has new entries, and a native read, which
may wake with several, hands the higher levels over first.

taskiq skips the ack when a middleware or a dependency cleanup raises. The ``ack`` handed out
with each message is a :class:`_Ack`; when taskiq lets go of the message without calling it, the
object is collected and the entry is no longer renewed, so any consumer takes it again
``idle_timeout`` later. A task that is still running keeps its message, so it keeps its claim.

All Redis traffic of ``listen()`` runs in tasks of their own that a stop never cancels, because
a cancelled read could lose a reply holding messages (they would wait out ``idle_timeout``), and
because Python 3.11's ``asyncio.wait_for``, which redis-py uses to send, can swallow a
cancellation: taskiq-redis 1.2's stream worker then never stops.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from redis.crc import key_slot
from redis.exceptions import ResponseError
from taskiq import AckableMessage, AsyncResultBackend, BrokerMessage

from taskiq_redis import connection, delays, keys, priorities, scripts
from taskiq_redis.brokers.base import READ_AHEAD_SHARE, BaseRedisBroker
from taskiq_redis.diagnostics import describe, server_message

if TYPE_CHECKING:
    from redis.typing import EncodableT

logger = logging.getLogger("taskiq.redis_broker")

ACK, READ, RECLAIM, RENEW = "stream_ack", "stream_read", "stream_reclaim", "stream_renew"
DATA = b"data"
# The longest one XREADGROUP blocks and the longest between two reclaim scans. Below
# redis-py's 5 s socket timeout; it bounds how long a stopping worker waits for a read in
# flight, and how long released entries wait for another consumer.
MAX_BLOCK_SECONDS = 1.0
# redis-py 8's socket timeout when none is given (redis-py 7 has none).
REDIS_PY_SOCKET_TIMEOUT = 5.0
# A read unanswered this long after its BLOCK and the socket timeout have passed is given up.
READ_MARGIN_SECONDS = 5.0
# The idle time that releases an entry: over 31 years, yet below the server clock in ms
# (Redis ignores an IDLE that would date the delivery before 1970).
RELEASE_IDLE_MS = 10**12
# The most ids one renewal or ack call carries, so no script call runs long.
RENEW_BATCH = 1000
ACK_BATCH = 1000
# XAUTOCLAIM calls per reclaim script call: each scans up to ten times what is still wanted.
RECLAIM_SCANS = 10
# How long an ack call waits for company in a busy worker (see _send_acks). Nobody waits for
# it but the entries' confirmation: a worker draining no-op tasks made ~350 ack calls for 5000
# tasks with 2 ms, ~170 with 5 ms, 57-73 with 10 ms (each step ran faster), ~2000 with none.
ACK_LINGER_SECONDS = 0.01
# Attempts of one ack call on connection errors before it is given up (and comes back later).
ACK_ATTEMPTS = 4

_Key = tuple[str, str]  # (stream, entry id)
# An ack waiting for the next call: the entry id and its delivery.
_AckItem = tuple[str, "_Delivery"]


def _whole(name: str, value: Any, minimum: int, optional: bool = False) -> Any:
    """Refuse a count or duration that is not a whole number of at least ``minimum``."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a whole number, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return value


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _binary(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _fields(raw: Mapping[Any, Any] | list[Any] | None) -> dict[bytes, bytes]:
    """An entry's fields from redis-py's parsed dict or a script's flat field/value list."""
    if raw is None:
        return {}
    pairs = raw.items() if isinstance(raw, Mapping) else zip(raw[::2], raw[1::2], strict=True)
    return {_binary(field): _binary(value) for field, value in pairs}


def _by_stream(reply: Any) -> Iterable[tuple[Any, list[Any]]]:
    """XREADGROUP's (stream, entries) pairs as redis-py parses them for RESP2 or RESP3."""
    if not reply:
        return ()
    if isinstance(reply, Mapping):  # RESP3: {stream: [entries]}
        return [(stream, nested[0] if nested else []) for stream, nested in reply.items()]
    return [(stream, entries) for stream, entries in reply]


def _no_group(error: BaseException) -> bool:
    """Whether the server lost the group: from a command, or from a script (``script x: ...``)."""
    if not isinstance(error, ResponseError):
        return False
    message = server_message(error)
    if message.startswith("script "):
        message = message.partition(": ")[2]
    return message.startswith("NOGROUP")


def _entry(stream: str, entry_id: Any, deliveries: int, fields: Any) -> _Entry:
    """An entry from a flat field list or a parsed dict of fields."""
    every = _fields(fields)
    return _Entry(stream, _text(entry_id), deliveries, every.get(DATA), every)


@dataclass(slots=True)
class _Delivery:
    """An entry this consumer holds: read, not yet acknowledged."""

    deliveries: int
    handed: float = 0.0  # when it was yielded to taskiq (monotonic); 0: only buffered here
    acking: bool = False  # its ack was called
    dropped: bool = False  # taskiq let go of it without an ack: stop renewing


class _Entry(NamedTuple):
    """One read or reclaimed entry (a tuple: a frozen dataclass took 2 us per entry to build)."""

    stream: str
    entry_id: str
    deliveries: int
    data: bytes | None  # None: the entry has no data field
    fields: dict[bytes, bytes] | None = None  # all of them, where known (for a dead letter)


class _Ack:
    """The ``ack`` of one handed message; being collected unacknowledged means taskiq dropped it.

    ``__del__`` may run in any thread (a garbage collection triggered there), so it only sets a
    flag; the renewal loop acts on it.
    """

    __slots__ = ("_ack", "_delivery", "_entry_id", "_stream")

    def __init__(
        self,
        ack: Callable[[str, str, _Delivery], Awaitable[None]],
        stream: str,
        entry_id: str,
        delivery: _Delivery,
    ) -> None:
        self._ack = ack
        self._stream = stream
        self._entry_id = entry_id
        self._delivery = delivery

    def __call__(self) -> Awaitable[None]:
        return self._ack(self._stream, self._entry_id, self._delivery)

    def __del__(self) -> None:
        if not self._delivery.acking:
            self._delivery.dropped = True


async def _done() -> None:
    """What ``ack()`` returns: an awaitable that is done (the ack itself is queued)."""


class BaseStreamBroker(BaseRedisBroker):
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
        self._start_ids = {queue_name: consumer_id}
        for stream, start in self.additional_streams.items():
            self._start_ids.setdefault(stream, consumer_id if start == ">" else str(start))
        # Each stream read is a queue with priority levels; level n of every queue is read
        # before level n - 1 of any, and each level stream's group starts where its queue's does.
        self._levels = {q: priorities.Levels(q, self.max_priority) for q in self._start_ids}
        self._queues = tuple(self._levels)  # as logs name them: with their levels
        self._queue_of: dict[str, str] = {}
        self._level_of: dict[str, int] = {}
        for level in range(self.max_priority, -1, -1):
            for queue, levels in self._levels.items():
                stream = levels.key(level)
                self._start_ids.setdefault(stream, self._start_ids[queue])
                self._queue_of.setdefault(stream, queue)
                self._level_of.setdefault(stream, level)
        self._streams = tuple(sorted(self._start_ids, key=self._level_of.__getitem__, reverse=True))
        # One XREADGROUP may only name streams of one cluster slot.
        by_slot: dict[int, list[str]] = {}
        for stream in self._streams:
            slot = key_slot(stream.encode()) if conn.is_cluster else 0
            by_slot.setdefault(slot, []).append(stream)
        self._read_groups = [tuple(streams) for streams in by_slot.values()]
        self._group_of = {stream: group for group in self._read_groups for stream in group}
        self._tiers: dict[tuple[str, ...], list[int]] = {}  # streams per level, for stream_read
        for streams in self._read_groups:
            per_level: dict[int, int] = {}
            for stream in streams:
                per_level[self._level_of[stream]] = per_level.get(self._level_of[stream], 0) + 1
            self._tiers[streams] = list(per_level.values())

        self._trim: tuple[Any, ...] = ()
        if self.maxlen is not None:
            self._trim = ("MAXLEN", "~", self.maxlen) if approximate else ("MAXLEN", self.maxlen)
        self._reclaim_every = min(MAX_BLOCK_SECONDS, self.idle_timeout / 2000)
        # A read must also end well before the socket timeout, or redis-py calls it a failure.
        socket_timeout = conn.client.get_connection_kwargs().get(
            "socket_timeout", REDIS_PY_SOCKET_TIMEOUT
        )
        longest = min(self._reclaim_every, socket_timeout / 2 if socket_timeout else 10**6)
        self._block_ms = max(1, int(min(self.block or 10**9, longest * 1000)))
        # How long a read may go unanswered before it is given up (see _read).
        self._read_patience = self._block_ms / 1000 + (socket_timeout or 0) + READ_MARGIN_SECONDS
        self._read_ahead_at = (self.count or 0) // READ_AHEAD_SHARE
        self._renew_every = self.idle_timeout / 3000
        self._scripts = {name: scripts.get(name) for name in (ACK, READ, RECLAIM, RENEW)}

        self._held: dict[_Key, _Delivery] = {}
        self._ready: deque[_Entry] = deque()  # read or reclaimed, not yet handed to taskiq
        self._io: set[asyncio.Task[Any]] = set()
        self._reads: dict[tuple[str, ...], asyncio.Task[list[_Entry]]] = {}
        self._read_since: dict[tuple[str, ...], float] = {}  # when each read in flight began
        self._full: dict[tuple[str, ...], bool] = {}  # the last read filled its COUNT
        self._cursors = dict.fromkeys(self._streams, "0-0")
        self._next_reclaim = 0.0
        self._renewer: asyncio.Task[None] | None = None
        self._acks: dict[str, list[_AckItem]] = {}
        self._acker: asyncio.Task[None] | None = None
        self._handed = 0  # messages handed to taskiq so far
        self._collected_at = 0.0
        self._checked = 0.0  # when Redis last said which levels have new entries (monotonic)
        self._higher: asyncio.Task[list[_Entry]] | None = None  # the check of higher levels
        self._last_handed = 0.0  # when taskiq last took a message (monotonic)
        self._answered = False  # a read has answered and its entries are not taken yet
        self._closing = False
        trim = None if self.maxlen is None else (self.maxlen, approximate)
        by_level = {queue: levels.by_level for queue, levels in self._levels.items()}
        self._mover = delays.Mover(conn, by_level, "stream", trim)

    async def startup(self) -> None:
        """Load the scripts and create the consumer group on every stream read."""
        await super().startup()
        await scripts.load(self._conn, self._scripts.values())
        for stream, start in self._start_ids.items():
            await self._create_group(stream, start)

    async def _create_group(self, stream: str, start: str) -> None:
        """XGROUP CREATE; a group that exists already is fine."""
        # A level stream is the broker's own: it is always created (mkstream is about the queue).
        mkstream = ("MKSTREAM",) if self.mkstream or self._level_of.get(stream) else ()
        try:
            await self._conn.execute(
                "XGROUP", "CREATE", stream, self.consumer_group_name, start, *mkstream
            )
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                logger.warning(
                    "Cannot create group %r on stream %r: %s",
                    self.consumer_group_name,
                    stream,
                    describe(exc),
                )

    async def _recreate_group(self, streams: Iterable[str]) -> None:
        """Create again the group the server lost (NOGROUP), from the stream's start.

        The group is gone because the stream was deleted or recreated empty (a restart without
        data, a new primary) or the group was destroyed. Starting it at ``$`` would skip every
        entry added since then, so it starts at ``0``: nothing kicked after the loss is lost,
        and entries that were in the stream before it (only those no group had finished with)
        are delivered again: at-least-once.
        """
        for stream in streams:
            logger.warning(
                "Consumer group %r of stream %r is gone; creating it again from the start",
                self.consumer_group_name,
                stream,
            )
            try:
                await self._create_group(stream, "0")
            except Exception as exc:  # the next NOGROUP tries again
                logger.warning(
                    "Cannot create group %r on stream %r: %s",
                    self.consumer_group_name,
                    stream,
                    describe(exc),
                )

    async def kick(self, message: BrokerMessage) -> None:
        """Append the message to the stream of its level: one XADD (trimmed to ``maxlen`` if set).

        A message with a ``delay`` label waits in the stream's delayed set instead (see delays).
        A bad label raises ValueError and nothing is sent.
        """
        queue = self.queue_of(message)
        level = priorities.level_of(message.labels, self.max_priority)
        if await delays.defer(self._conn, queue, message, level):
            return
        await self._conn.execute(
            "XADD", keys.priority_key(queue, level), *self._trim, "*", DATA, message.message
        )

    async def listen(self) -> AsyncGenerator[AckableMessage, None]:
        """Yield the messages of every stream read, each with its ack; never raises.

        Whatever goes wrong with Redis (connection errors, failovers, cluster errors, a lost
        consumer group, which is created again) is logged and retried with a capped backoff,
        because an exception here would stop the worker.
        """
        self._mover.start()
        backoff = connection.Backoff()
        while True:
            self._keep_renewing()
            self._take_higher()
            while self._ready:
                now = time.monotonic()
                if self._higher is not None or now - self._checked > priorities.RECHECK_SECONDS:
                    await self._recheck()
                if len(self._ready) <= self._read_ahead_at and len(self._reads) < len(
                    self._read_groups
                ):
                    self._start_reads(ahead=True)  # answered before these are handed over
                if self._answered:
                    await self._take_read_ahead()
                entry = stream, entry_id, deliveries, data, _ = self._ready.popleft()
                delivery = self._held.get((stream, entry_id))
                if delivery is None:  # another consumer reclaimed it meanwhile
                    continue
                if data is None or (
                    self.max_deliveries is not None and deliveries > self.max_deliveries
                ):
                    self._spawn(self._dead_letter(entry, delivery, self._problem(entry)))
                    continue
                delivery.handed = self._last_handed = now
                self._handed += 1
                yield AckableMessage(data=data, ack=_Ack(self._ack, stream, entry_id, delivery))
            try:
                self._ready.extend(await self._fetch())
            except Exception as exc:  # redis-py raises more than RedisError
                logger.warning(
                    "Reading streams %s failed; retrying: %s", self._queues, describe(exc)
                )
                await backoff.wait()
            else:
                backoff.reset()

    def _keep_renewing(self) -> None:
        """Start the renewal task, and again should it ever have ended."""
        if self._renewer is None or self._renewer.done():
            if self._renewer is not None:
                logger.error("Renewing claims had stopped; starting it again")
            self._renewer = asyncio.ensure_future(self._keep_claims())

    async def _fetch(self) -> list[_Entry]:
        """The next entries to yield: reclaimed ones when a scan is due, else new ones."""
        if time.monotonic() >= self._next_reclaim:
            entries = await self._reclaim()
            if entries:
                return entries
        entries = await self._read()
        self._checked = time.monotonic()
        return entries

    async def _recheck(self) -> None:
        """Put new entries of the levels above the next entry in front of it, if it has waited.

        An entry read a while ago (taskiq was busy) may by now have newer entries of higher
        levels; these are read (``stream_read``) and handed over first. At most one such read
        per :data:`priorities.RECHECK_SECONDS`. When taskiq took its time to ask for this entry,
        the answer is awaited, so the order is right; while taskiq asks as fast as it can (a
        backlog drains), the held entries go on being handed over until it is here (waiting for
        it held a draining worker up 2-4% of its time). In a backlog that read is the read ahead,
        started early and topping the held entries up: the levels above come first in it, and
        a drain makes one round trip where it made two. A failure is logged; what is held goes
        on.
        """
        now = time.monotonic()
        unhurried = now - self._last_handed > priorities.RECHECK_SECONDS
        if self._higher is not None:
            if not self._higher.done() and unhurried:
                await asyncio.wait({self._higher})
            self._take_higher()
            if self._higher is not None:
                return
        stream = self._ready[0].stream
        level = self._level_of.get(stream, self.max_priority)
        if level >= self.max_priority or now - self._checked <= priorities.RECHECK_SECONDS:
            return
        self._checked = now
        group = self._group_of[stream]
        if (
            not unhurried
            and self._full.get(group)
            and group not in self._reads
            and self._start_reads(ahead=True)
        ):
            # A backlog drains: the read that tops the held entries up (made sooner than it
            # would be) looks at the levels above too, in the same round trip.
            return
        above = self._levels[self._queue_of[stream]].read_order(above=level)
        self._higher = self._spawn(self._read_higher(above))
        if unhurried:
            await asyncio.wait({self._higher})
            self._take_higher()

    def _take_higher(self) -> None:
        """Hand over first what the check of the higher levels found, once it is done."""
        task = self._higher
        if task is None or not task.done():
            return
        self._higher = None
        error = None if task.cancelled() else task.exception()
        if error is not None:
            logger.warning(
                "Checking the higher levels of %s failed: %s", self._queues, describe(error)
            )
        elif not task.cancelled():
            self._ready.extendleft(reversed(task.result()))

    async def _read_higher(self, streams: tuple[str, ...]) -> list[_Entry]:
        entries = await self._read_script(streams, self.count or 100, [1] * len(streams))
        return self._hold(entries)

    def _spawn(self, work: Awaitable[Any]) -> asyncio.Task[Any]:
        """Run Redis work in a task of its own that a stop does not cancel (see module doc)."""
        task = asyncio.ensure_future(work)
        self._io.add(task)

        def settled(_: asyncio.Task[Any]) -> None:
            self._io.discard(task)
            if not task.cancelled():
                task.exception()  # whoever awaits it sees it; nobody else must be told

        task.add_done_callback(settled)
        return task

    async def _await(self, work: Awaitable[Any]) -> Any:
        task = self._spawn(work)
        await asyncio.wait({task})
        return task.result()

    def _start_reads(self, ahead: bool = False) -> bool:
        """Start a read for each stream group that has none in flight; whether any started.

        A read ahead (before the held entries run out) is made only for a group whose last read
        came back full, a backlog, and never blocks: a worker whose taskiq stopped asking must
        not sit on new messages that idle workers could run. It asks for no more than keeps
        what is held within xread_count plus a read ahead's share, and is not made when that
        is full already.
        """
        count = self.count
        if count is not None:
            room = min(count, count + self._read_ahead_at - len(self._ready))
            if ahead and room < 1:
                return False
            count = max(1, room // len(self._read_groups))
        started = False
        for streams in self._read_groups:
            if streams in self._reads or (ahead and not self._full.get(streams)):
                continue
            task = self._reads[streams] = self._spawn(
                self._read_group(streams, count, block=not ahead)
            )
            task.add_done_callback(self._read_answered)
            self._read_since[streams] = time.monotonic()
            started = True
        return started

    def _read_answered(self, _: object) -> None:
        self._answered = True

    async def _take_read_ahead(self) -> None:
        """Merge what the reads that answered brought with the entries held, levels highest
        first (a read ahead may have found a level above the held ones)."""
        try:
            entries = await self._collect_reads()
        except Exception as exc:  # the entries held go on; the next read ahead tries again
            logger.warning("Reading streams %s failed: %s", self._queues, describe(exc))
            return
        if entries:
            self._checked = time.monotonic()
            merged = sorted((*self._ready, *entries), key=self._rank)
            self._ready.clear()
            self._ready.extend(merged)

    def _rank(self, entry: _Entry) -> int:
        return -self._level_of.get(entry.stream, 0)

    async def _read(self) -> list[_Entry]:
        """Start a read for each stream group that has none, and take the first answer."""
        self._start_reads()
        oldest = min(self._read_since[streams] for streams in self._reads)
        wait = max(0.0, oldest + self._read_patience - time.monotonic())
        # A check of the higher levels that answers meanwhile is handed over without waiting
        # for a blocking read to end.
        higher = [self._higher] if self._higher is not None else []
        await asyncio.wait(
            [*self._reads.values(), *higher], timeout=wait, return_when=asyncio.FIRST_COMPLETED
        )
        self._give_up_stuck_reads()
        return await self._collect_reads()

    async def _collect_reads(self) -> list[_Entry]:
        """What the reads that answered brought; a failure is raised when none brought any."""
        self._answered = False
        entries: list[_Entry] = []
        failure: BaseException | None = None
        for streams, task in list(self._reads.items()):
            if task.done():
                del self._reads[streams]
                error = task.exception()
                if error is None:
                    entries += task.result()
                else:
                    failure = error
                    if _no_group(error):
                        await self._await(self._recreate_group(streams))
        if failure is not None and not entries:
            raise failure
        if failure is not None:
            logger.warning(
                "Reading streams %s failed; retrying: %s", self._queues, describe(failure)
            )
        return entries

    def _give_up_stuck_reads(self) -> None:
        """Cancel reads that got no answer long after their BLOCK and socket timeout ended.

        A read must answer within its BLOCK time, or fail by the socket timeout. During a
        sentinel failover a worker's blocking read once waited for ever on a connection that
        got neither (the worker stopped taking tasks, silently); cancelling closes that
        connection and the next read goes out on a new one. What such a read may have delivered
        stays pending for this consumer and is reclaimed after ``idle_timeout``.
        """
        now = time.monotonic()
        for streams, task in list(self._reads.items()):
            if not task.done() and now - self._read_since[streams] >= self._read_patience:
                logger.warning(
                    "Reading streams %s got no answer in %.0f s; reading again on a new connection",
                    list(streams),
                    self._read_patience,
                )
                task.cancel()
                del self._reads[streams]

    async def _read_group(
        self, streams: tuple[str, ...], count: int | None, block: bool = True
    ) -> list[_Entry]:
        """Read new entries; what it returns is held from then on.

        After a full batch more are likely waiting, so the next read is the ``stream_read``
        script (two reply values per entry instead of six, and no dict per entry); after a
        short one, or when the script finds nothing, a native XREADGROUP blocks for new ones.
        """
        entries = []
        tiers = self._tiers[streams]
        # With several levels the script also goes first, so a backlog is read level by level.
        if count is not None and (self._full.get(streams) or len(tiers) > 1):
            entries = await self._read_script(streams, count, tiers)
        if not entries and block:
            counting = () if count is None else ("COUNT", count)
            reply = await self._conn.execute(
                "XREADGROUP",
                *("GROUP", self.consumer_group_name, self.consumer_name),
                *counting,
                *("BLOCK", self._block_ms, "STREAMS", *streams),
                *(">",) * len(streams),
            )
            for stream, stream_entries in _by_stream(reply):
                name = _text(stream)
                entries += [
                    _entry(name, entry_id, 1, fields) for entry_id, fields in stream_entries
                ]
            # A read that woke with several levels hands the higher ones over first.
            entries.sort(key=self._rank)
        self._full[streams] = count is not None and len(entries) >= count
        return self._hold(entries)

    async def _read_script(
        self, streams: Iterable[str], count: int, tiers: list[int]
    ) -> list[_Entry]:
        """``stream_read``: new entries of the first tier of streams that has any, not held yet."""
        reply = await scripts.run(
            self._conn,
            self._scripts[READ],
            list(streams),
            [self.consumer_group_name, self.consumer_name, count, *tiers],
        )
        entries = []
        for stream, flat in zip(reply[::2], reply[1::2], strict=True):
            name = _text(stream)
            for entry_id, data in zip(flat[::2], flat[1::2], strict=True):
                if isinstance(data, bytes):
                    entries.append(_Entry(name, _text(entry_id), 1, data))
                else:
                    entries.append(_entry(name, entry_id, 1, data))
        return entries

    async def _reclaim(self) -> list[_Entry]:
        """Claim entries idle longer than ``idle_timeout``, each stream on its own."""
        self._next_reclaim = time.monotonic() + self._reclaim_every
        entries: list[_Entry] = []
        for stream in self._streams:
            try:
                claimed = await self._await(self._reclaim_stream(stream))
            except Exception as exc:  # reading goes on; next scan retries
                logger.warning(
                    "Reclaiming idle entries of stream %r failed; retrying: %s",
                    stream,
                    describe(exc),
                )
                if _no_group(exc):
                    await self._await(self._recreate_group([stream]))
                continue
            if len(claimed) >= self.unacknowledged_batch_size:
                self._next_reclaim = 0.0  # a full batch: more may be waiting
            entries += claimed
        return entries

    async def _reclaim_stream(self, stream: str) -> list[_Entry]:
        cursor, claimed = await scripts.run(
            self._conn,
            self._scripts[RECLAIM],
            [stream],
            [
                self.consumer_group_name,
                self.consumer_name,
                self.idle_timeout,
                self._cursors[stream],
                self.unacknowledged_batch_size,
                RECLAIM_SCANS,
            ],
        )
        self._cursors[stream] = _text(cursor)
        entries = [
            _entry(stream, entry_id, int(deliveries), fields)
            for entry_id, deliveries, fields in claimed
        ]
        if entries:
            logger.info("Reclaimed %d idle entries of stream %r", len(entries), stream)
        return self._hold(entries)

    def _hold(self, entries: list[_Entry]) -> list[_Entry]:
        for entry in entries:
            self._held[entry.stream, entry.entry_id] = _Delivery(entry.deliveries)
        return entries

    def _forget(self, stream: str, entry_id: str, delivery: _Delivery) -> None:
        """No longer hold an entry, unless it was delivered to this consumer again since."""
        if self._held.get((stream, entry_id)) is delivery:
            del self._held[stream, entry_id]

    def _problem(self, entry: _Entry) -> str:
        """Why an entry goes to the dead-letter stream instead of to taskiq.

        Only what the transport decides: whether the data is a taskiq message is taskiq's
        receiver's business (it logs and acknowledges what it cannot parse).
        """
        if self.max_deliveries is not None and entry.deliveries > self.max_deliveries:
            return f"delivered {entry.deliveries} times, max_deliveries is {self.max_deliveries}"
        return "the entry has no data field"

    async def _dead_letter(self, entry: _Entry, delivery: _Delivery, reason: str) -> None:
        """Copy the entry to the dead-letter stream and acknowledge it, in one script call."""
        dead_key = keys.dead_letter_key(self._queue_of.get(entry.stream, entry.stream))
        logger.error(
            "Entry %s of stream %r goes to %r: %s", entry.entry_id, entry.stream, dead_key, reason
        )
        about: dict[bytes, EncodableT] = {
            b"reason": reason,
            b"stream": entry.stream,
            b"id": entry.entry_id,
            b"deliveries": entry.deliveries,
            b"group": self.consumer_group_name,
        }
        fields: list[EncodableT] = [
            item
            for pair in {**(entry.fields or {DATA: entry.data or b""}), **about}.items()
            for item in pair
        ]
        try:
            await scripts.run(
                self._conn,
                self._scripts[ACK],
                [entry.stream, dead_key],
                [self.consumer_group_name, len(fields), *fields, entry.entry_id],
            )
        except Exception as exc:  # it is no longer renewed: it comes back
            logger.warning(
                "Dead-lettering entry %s of stream %r failed: %s",
                entry.entry_id,
                entry.stream,
                describe(exc),
            )
        finally:
            self._forget(entry.stream, entry.entry_id, delivery)

    def _ack(self, stream: str, entry_id: str, delivery: _Delivery) -> Awaitable[None]:
        """Queue one entry's acknowledgement for the ack task; what it returns is already done.

        The ack task sends what is queued, one ``stream_ack`` call per stream at a time (see
        :meth:`_send_acks`). The caller does not wait for Redis: a task's slot in taskiq is
        free as soon as it ends, and a worker takes the next message instead of waiting for a
        round trip. Delivery stays at-least-once: the entry is held and renewed until its ack
        call is answered, an ack call that fails is logged and the entry delivered again after
        ``idle_timeout``, and a clean stop sends what is queued before it releases anything.
        """
        if not delivery.acking:
            delivery.acking = True
            self._acks.setdefault(stream, []).append((entry_id, delivery))
            if self._acker is None or self._acker.done():
                self._acker = self._spawn(self._send_acks())
        return _done()

    async def _send_acks(self) -> None:
        # One ack call per stream in flight at a time; the acks queued while it is under way go
        # together in the next. A first ack goes at once. The next call waits
        # ACK_LINGER_SECONDS for company only if taskiq took more messages while the last call
        # was under way: more acks are coming, and an ack call costs a worker about as much as
        # a no-op task, so acks go tens per call instead of one or two.
        busy = False
        while self._acks:
            if busy and sum(map(len, self._acks.values())) < ACK_BATCH:
                await asyncio.sleep(ACK_LINGER_SECONDS)
            batch, self._acks = self._acks, {}
            handed = self._handed
            await asyncio.gather(
                *(
                    self._ack_stream(stream, items[start : start + ACK_BATCH])
                    for stream, items in batch.items()
                    for start in range(0, len(items), ACK_BATCH)
                )
            )
            busy = self._handed != handed

    async def _ack_stream(self, stream: str, items: list[_AckItem]) -> None:
        """One ``stream_ack`` call, retried on connection errors (acking twice is harmless).

        The entries are no longer held afterwards, also when the call is cancelled: an ack that
        did not reach Redis is then delivered again after ``idle_timeout``.
        """
        args: list[EncodableT] = [self.consumer_group_name, 0, *(entry for entry, _ in items)]
        dead_key = keys.dead_letter_key(self._queue_of.get(stream, stream))
        backoff = connection.Backoff(first=0.1, cap=1.0)
        try:
            for attempt in range(1, ACK_ATTEMPTS + 1):
                try:
                    await scripts.run(self._conn, self._scripts[ACK], [stream, dead_key], args)
                    return
                except Exception as exc:  # whatever it is, the entries come back
                    final = attempt == ACK_ATTEMPTS
                    if final or not isinstance(exc, connection.TRANSIENT_ERRORS):
                        logger.error(
                            "Acknowledging %d entries of stream %r failed; they are delivered "
                            "again after idle_timeout: %s",
                            len(items),
                            stream,
                            describe(exc),
                        )
                        return
                    await backoff.wait()
        finally:
            for entry_id, delivery in items:
                self._forget(stream, entry_id, delivery)

    async def _keep_claims(self) -> None:
        """Renew the claim on every held entry, well within ``idle_timeout``; never ends.

        Each stream is renewed on its own, so one that fails does not stop the others; a
        failure is retried sooner, with backoff, but never later than the usual period.
        """
        backoff = connection.Backoff(cap=self._renew_every)
        failed = False
        while not self._closing:
            if failed:
                await backoff.wait()
            else:
                backoff.reset()
                await asyncio.sleep(self._renew_every)
            failed = False
            try:
                by_stream = self._to_renew()
            except Exception as exc:  # a bug here must not end renewal
                logger.error("Renewing claims failed; retrying: %s", describe(exc))
                failed = True
                continue
            for stream, ids in by_stream.items():
                try:
                    await self._set_idle(stream, 0, [(entry_id, "") for entry_id in ids])
                except Exception as exc:  # renewal must outlive any error
                    failed = True
                    logger.warning(
                        "Renewing claims on stream %r failed; retrying: %s",
                        stream,
                        describe(exc),
                    )
                    if _no_group(exc):
                        await self._recreate_group([stream])

    def _to_renew(self) -> dict[str, list[str]]:
        """Held entries by stream, after forgetting those taskiq dropped without an ack.

        When a message handed over a renewal period ago is still held, a garbage collection
        runs first (at most once a period): a message taskiq dropped inside a reference cycle
        (an exception's traceback) is only collected then.
        """
        now = time.monotonic()
        if now - self._collected_at >= self._renew_every and any(
            0 < delivery.handed < now - self._renew_every for delivery in self._held.values()
        ):
            self._collected_at = now
            gc.collect()
        by_stream: dict[str, list[str]] = {}
        for (stream, entry_id), delivery in list(self._held.items()):
            if delivery.dropped:
                del self._held[stream, entry_id]
                logger.warning(
                    "taskiq dropped entry %s of stream %r without acknowledging it (a "
                    "middleware or a dependency raised?); it is delivered again after "
                    "idle_timeout",
                    entry_id,
                    stream,
                )
            else:
                by_stream.setdefault(stream, []).append(entry_id)
        return by_stream

    async def _set_idle(self, stream: str, idle_ms: int, items: list[tuple[str, str]]) -> None:
        """Run ``stream_renew`` on held entries of one stream, in bounded batches."""
        args = [item for pair in items for item in pair]
        for start in range(0, len(args), 2 * RENEW_BATCH):
            lost = await scripts.run(
                self._conn,
                self._scripts[RENEW],
                [stream],
                [
                    self.consumer_group_name,
                    self.consumer_name,
                    idle_ms,
                    *args[start : start + 2 * RENEW_BATCH],
                ],
            )
            if idle_ms == RELEASE_IDLE_MS:
                continue
            for entry_id in map(_text, lost):
                if self._held.pop((stream, entry_id), None) is not None:
                    logger.warning(
                        "Entry %s of stream %r was reclaimed by another consumer "
                        "while this one held it",
                        entry_id,
                        stream,
                    )

    async def shutdown(self) -> None:
        """Stop renewing, release every held entry to the other consumers, close.

        Reads and acks still in flight are awaited (at most about a second) so that what reads
        took is released too. An entry never handed to taskiq gets its delivery count back.
        """
        self._closing = True
        if self._renewer is not None:
            self._renewer.cancel()
        await self._mover.stop()
        pending = self._io | ({self._renewer} if self._renewer else set())
        if pending:
            await asyncio.wait(pending, timeout=MAX_BLOCK_SECONDS + 2)
        by_stream: dict[str, list[tuple[str, str]]] = {}
        for (stream, entry_id), delivery in self._held.items():
            count = "" if delivery.handed else str(delivery.deliveries - 1)
            by_stream.setdefault(stream, []).append((entry_id, count))
        for stream, items in by_stream.items():
            try:
                await self._set_idle(stream, RELEASE_IDLE_MS, items)
            except Exception as exc:  # stopping goes on whatever happens
                logger.error(
                    "Could not release %d held entries of stream %r; they return after "
                    "idle_timeout: %s",
                    len(items),
                    stream,
                    describe(exc),
                )
            else:
                logger.info("Released %d held entries of stream %r", len(items), stream)
        self._held.clear()
        self._ready.clear()
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
