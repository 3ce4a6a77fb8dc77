"""The stream broker: at-least-once delivery over a Redis stream and a consumer group.

``kick`` appends the message to the stream ``queue_name`` (one XADD, field ``data``). A worker
is one consumer of the group ``consumer_group_name``: it reads with XREADGROUP and acknowledges
with one script that also deletes the entry once every group of the stream is done with it.

What a consumer read and has not acknowledged stays in the group's pending list, so nothing is
lost when a worker dies; three scripts keep those entries moving:

- ``stream_reclaim`` (every second at most, also when the queue is idle): entries idle longer
  than ``idle_timeout`` ms are claimed by this consumer. Their consumer died, or let them go.
- ``stream_renew`` (every ``idle_timeout / 3``): while this consumer works on entries it resets
  their idle time, so a task that runs longer than ``idle_timeout`` is not run a second time
  elsewhere; it never takes back an entry another consumer reclaimed meanwhile. On a clean stop
  the same script releases what this consumer still holds (idle time set huge), so the next
  reclaim by any consumer takes it at once instead of after ``idle_timeout``.
- ``stream_ack``: acknowledge, optionally after copying the entry to the dead-letter stream
  ``{queue}:dead`` (too many deliveries, no ``data`` field, data taskiq cannot parse).

All Redis traffic of ``listen()`` runs in tasks of their own that a stop never cancels, because
a cancelled read could lose a reply holding messages (they would wait out ``idle_timeout``), and
because Python 3.11's ``asyncio.wait_for``, which redis-py uses to send, can swallow a
cancellation: taskiq-redis 1.2's stream worker then never stops.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from redis.crc import key_slot
from redis.exceptions import RedisError, ResponseError
from taskiq import AckableMessage, AsyncResultBackend, BrokerMessage

from taskiq_redis import connection, delays, keys, scripts
from taskiq_redis.brokers.base import BaseRedisBroker

logger = logging.getLogger("taskiq.redis_broker")

ACK, RECLAIM, RENEW = "stream_ack", "stream_reclaim", "stream_renew"
DATA = b"data"
# The longest one XREADGROUP blocks and the longest between two reclaim scans. Below
# redis-py's 5 s socket timeout; it bounds how long a stopping worker waits for a read in
# flight, and how long released entries wait for another consumer.
MAX_BLOCK_SECONDS = 1.0
# redis-py 8's socket timeout when none is given (redis-py 7 has none).
REDIS_PY_SOCKET_TIMEOUT = 5.0
# The idle time that releases an entry: over 31 years, yet below the server clock in ms
# (Redis ignores an IDLE that would date the delivery before 1970).
RELEASE_IDLE_MS = 10**12
# The most ids one renewal call carries, so no script call runs long.
RENEW_BATCH = 1000

_Key = tuple[str, str]  # (stream, entry id)


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


@dataclass(slots=True)
class _Delivery:
    """An entry this consumer holds: read, not yet acknowledged."""

    deliveries: int
    handed: bool = False  # yielded to taskiq; False: only buffered here
    lost: bool = False  # another consumer reclaimed it: stop renewing


@dataclass(slots=True, frozen=True)
class _Entry:
    stream: str
    entry_id: str
    deliveries: int
    fields: dict[bytes, bytes]


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
    ) -> None:
        super().__init__(conn, queue_name, result_backend, task_id_generator)
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
        self._streams = tuple(self._start_ids)
        # One XREADGROUP may only name streams of one cluster slot.
        by_slot: dict[int, list[str]] = {}
        for stream in self._streams:
            slot = key_slot(stream.encode()) if conn.is_cluster else 0
            by_slot.setdefault(slot, []).append(stream)
        self._read_groups = [tuple(streams) for streams in by_slot.values()]

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
        self._renew_every = self.idle_timeout / 3000
        self._scripts = {name: scripts.get(name) for name in (ACK, RECLAIM, RENEW)}

        self._held: dict[_Key, _Delivery] = {}
        self._reserved = 0  # entries that reads and reclaims in flight may still add
        self._room = asyncio.Event()
        self._io: set[asyncio.Task[Any]] = set()
        self._reads: dict[tuple[str, ...], asyncio.Task[list[_Entry]]] = {}
        self._cursors = dict.fromkeys(self._streams, "0-0")
        self._next_reclaim = 0.0
        self._renewer: asyncio.Task[None] | None = None
        self._closing = False
        trim = None if self.maxlen is None else (self.maxlen, approximate)
        self._mover = delays.Mover(conn, {s: [s] for s in self._streams}, "stream", trim)

    async def startup(self) -> None:
        """Load the scripts and create the consumer group on every stream read."""
        await super().startup()
        await scripts.load(self._conn, self._scripts.values())
        await self._create_groups()

    async def _create_groups(self) -> None:
        """XGROUP CREATE on each stream; a group that exists already is fine."""
        mkstream = ("MKSTREAM",) if self.mkstream else ()
        for stream, start in self._start_ids.items():
            try:
                await self._conn.execute(
                    "XGROUP", "CREATE", stream, self.consumer_group_name, start, *mkstream
                )
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    logger.warning("Cannot create group on stream %r: %s", stream, exc)

    async def kick(self, message: BrokerMessage) -> None:
        """Append the message to its stream: one XADD (trimmed to ``maxlen`` if set).

        A message with a ``delay`` label waits in the stream's delayed set instead (see delays).
        """
        if await delays.defer(self._conn, self.queue_of(message), message):
            return
        await self._conn.execute(
            "XADD", self.queue_of(message), *self._trim, "*", DATA, message.message
        )

    async def listen(self) -> AsyncGenerator[AckableMessage, None]:
        """Yield messages of every stream read, each with its ack; never raises Redis errors.

        Connection errors, a lost consumer group (recreated) and the like are logged and
        retried with a capped backoff, because an exception here would stop the worker.
        """
        if self._renewer is None:
            self._renewer = asyncio.ensure_future(self._keep_claims())
        self._mover.start()
        ready: deque[_Entry] = deque()
        backoff = connection.Backoff()
        group_lost = False
        while True:
            while ready:
                entry = ready.popleft()
                problem = self._problem(entry)
                if problem is None:
                    self._held[entry.stream, entry.entry_id].handed = True
                    yield AckableMessage(
                        data=entry.fields[DATA],
                        ack=partial(self._ack, entry.stream, entry.entry_id),
                    )
                    continue
                try:
                    await self._await(self._dead_letter(entry, problem))
                except (RedisError, OSError) as exc:  # it is no longer held: it comes back
                    logger.warning("Dead-lettering entry %s failed: %r", entry.entry_id, exc)
            try:
                if group_lost:
                    await self._await(self._create_groups())
                ready.extend(await self._fetch())
            except (RedisError, OSError) as exc:
                logger.warning("Reading streams %s failed; retrying: %r", self._streams, exc)
                group_lost = "NOGROUP" in str(exc)
                await backoff.wait()
            else:
                group_lost = False
                backoff.reset()

    async def _fetch(self) -> list[_Entry]:
        """The next entries to yield: reclaimed ones when a scan is due, else new ones."""
        while self.count is not None and len(self._held) >= self.count:
            self._room.clear()
            await self._room.wait()
        if time.monotonic() >= self._next_reclaim:
            entries = await self._reclaim()
            if entries:
                return entries
        return await self._read()

    def _budget(self) -> int | None:
        """How many more entries this consumer may take now (None: no limit)."""
        if self.count is None:
            return None
        return self.count - len(self._held) - self._reserved

    def _spawn(self, work: Awaitable[Any], reserve: int = 0) -> asyncio.Task[Any]:
        """Run Redis work in a task of its own that a stop does not cancel (see module doc)."""
        task = asyncio.ensure_future(work)
        self._reserved += reserve
        self._io.add(task)

        def settled(_: asyncio.Task[Any]) -> None:
            self._reserved -= reserve
            self._io.discard(task)

        task.add_done_callback(settled)
        return task

    async def _await(self, work: Awaitable[Any], reserve: int = 0) -> Any:
        task = self._spawn(work, reserve)
        await asyncio.wait({task})
        return task.result()

    async def _read(self) -> list[_Entry]:
        """Start a read for each stream group that has none, and take the first answer."""
        for streams in self._read_groups:
            if streams in self._reads:
                continue
            budget = self._budget()
            if budget is not None and budget < 1:
                break
            count = budget if budget is None else max(1, budget // len(self._read_groups))
            self._reads[streams] = self._spawn(self._read_group(streams, count), count or 0)
        if not self._reads:  # the whole budget is held: wait for an ack
            self._room.clear()
            await self._room.wait()
            return []
        await asyncio.wait(self._reads.values(), return_when=asyncio.FIRST_COMPLETED)
        entries: list[_Entry] = []
        failure: BaseException | None = None
        for streams, task in list(self._reads.items()):
            if task.done():
                del self._reads[streams]
                if task.exception() is None:
                    entries += task.result()
                else:
                    failure = task.exception()
        if failure is not None and not entries:
            raise failure
        if failure is not None:
            logger.warning("Reading streams %s failed; retrying: %r", self._streams, failure)
        return entries

    async def _read_group(self, streams: tuple[str, ...], count: int | None) -> list[_Entry]:
        """One XREADGROUP of new entries; what it returns is held from then on."""
        counting = () if count is None else ("COUNT", count)
        reply = await self._conn.execute(
            "XREADGROUP",
            *("GROUP", self.consumer_group_name, self.consumer_name),
            *counting,
            *("BLOCK", self._block_ms, "STREAMS", *streams),
            *(">",) * len(streams),
        )
        entries = []
        for stream, stream_entries in _by_stream(reply):
            for entry_id, fields in stream_entries:
                entries.append(_Entry(_text(stream), _text(entry_id), 1, _fields(fields)))
        return self._hold(entries)

    async def _reclaim(self) -> list[_Entry]:
        """Claim entries idle longer than ``idle_timeout`` from each stream, within budget."""
        self._next_reclaim = time.monotonic() + self._reclaim_every
        entries: list[_Entry] = []
        for stream in self._streams:
            budget = self._budget()
            count = self.unacknowledged_batch_size if budget is None else budget
            count = min(count, self.unacknowledged_batch_size)
            if count < 1:
                break
            claimed = await self._await(self._reclaim_stream(stream, count), count)
            if len(claimed) == count:
                self._next_reclaim = 0.0  # a full batch: more may be waiting
            entries += claimed
        return entries

    async def _reclaim_stream(self, stream: str, count: int) -> list[_Entry]:
        cursor, claimed = await scripts.run(
            self._conn,
            self._scripts[RECLAIM],
            [stream],
            [
                self.consumer_group_name,
                self.consumer_name,
                self.idle_timeout,
                self._cursors[stream],
                count,
            ],
        )
        self._cursors[stream] = _text(cursor)
        entries = [
            _Entry(stream, _text(entry_id), int(deliveries), _fields(fields))
            for entry_id, deliveries, fields in claimed
        ]
        if entries:
            logger.info("Reclaimed %d idle entries of stream %r", len(entries), stream)
        return self._hold(entries)

    def _hold(self, entries: list[_Entry]) -> list[_Entry]:
        for entry in entries:
            self._held[entry.stream, entry.entry_id] = _Delivery(entry.deliveries)
        return entries

    def _forget(self, stream: str, entry_id: str) -> None:
        self._held.pop((stream, entry_id), None)
        self._room.set()

    def _problem(self, entry: _Entry) -> str | None:
        """Why an entry goes to the dead-letter stream instead of to a task, if it does."""
        if self.max_deliveries is not None and entry.deliveries > self.max_deliveries:
            return f"delivered {entry.deliveries} times, max_deliveries is {self.max_deliveries}"
        data = entry.fields.get(DATA)
        if data is None:
            return "the entry has no data field"
        try:
            self.formatter.loads(data)
        except Exception as exc:  # whatever the formatter raises, the message is unusable
            return f"the data is not a taskiq message: {exc!r}"[:1000]
        return None

    async def _dead_letter(self, entry: _Entry, reason: str) -> None:
        logger.error(
            "Entry %s of stream %r goes to %r: %s",
            entry.entry_id,
            entry.stream,
            keys.dead_letter_key(entry.stream),
            reason,
        )
        about = {
            b"reason": reason,
            b"stream": entry.stream,
            b"id": entry.entry_id,
            b"deliveries": entry.deliveries,
            b"group": self.consumer_group_name,
        }
        fields = [item for pair in {**entry.fields, **about}.items() for item in pair]
        await self._ack(entry.stream, entry.entry_id, fields)

    async def _ack(self, stream: str, entry_id: str, dead_letter: Iterable[Any] = ()) -> None:
        """Acknowledge one entry (one script call); it is no longer held whatever happens.

        A connection error is retried once: a pooled connection that died with a restarted
        server fails its first command, and acknowledging twice is harmless.
        """
        run = partial(
            scripts.run,
            self._conn,
            self._scripts[ACK],
            [stream, keys.dead_letter_key(stream)],
            [self.consumer_group_name, entry_id, *dead_letter],
        )
        try:
            try:
                await run()
            except connection.TRANSIENT_ERRORS:
                await run()
        finally:
            self._forget(stream, entry_id)

    async def _keep_claims(self) -> None:
        """Renew the claim on every held entry, well within ``idle_timeout``."""
        while not self._closing:
            await asyncio.sleep(self._renew_every)
            held = [(key, "") for key, delivery in self._held.items() if not delivery.lost]
            try:
                await self._set_idle(0, held)
            except (RedisError, OSError) as exc:
                logger.warning("Renewing claims failed; retrying: %r", exc)

    async def _set_idle(self, idle_ms: int, items: list[tuple[_Key, str]]) -> None:
        """Run ``stream_renew`` on held entries, by stream and in bounded batches."""
        by_stream: dict[str, list[str]] = {}
        for (stream, entry_id), deliveries in items:
            by_stream.setdefault(stream, []).extend((entry_id, deliveries))
        for stream, args in by_stream.items():
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
                for entry_id in map(_text, lost):
                    if (delivery := self._held.get((stream, entry_id))) is not None:
                        delivery.lost = True
                        logger.warning(
                            "Entry %s of stream %r was reclaimed by another consumer "
                            "while this one held it",
                            entry_id,
                            stream,
                        )

    async def shutdown(self) -> None:
        """Stop renewing, release every held entry to the other consumers, close.

        Reads still in flight are awaited (at most about a second) so that what they took is
        released too. An entry never handed to taskiq gets its delivery count back.
        """
        self._closing = True
        if self._renewer is not None:
            self._renewer.cancel()
        await self._mover.stop()
        pending = self._io | ({self._renewer} if self._renewer else set())
        if pending:
            await asyncio.wait(pending, timeout=MAX_BLOCK_SECONDS + 2)
        held = [
            (key, "" if delivery.handed else str(delivery.deliveries - 1))
            for key, delivery in self._held.items()
            if not delivery.lost
        ]
        try:
            await self._set_idle(RELEASE_IDLE_MS, held)
        except (RedisError, OSError) as exc:
            logger.error(
                "Could not release %d held entries; they return after idle_timeout: %r",
                len(held),
                exc,
            )
        else:
            if held:
                logger.info("Released %d held entries to other consumers", len(held))
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
        )
