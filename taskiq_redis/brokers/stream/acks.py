"""Acknowledging handed messages, in batches, and sending the undeliverable to dead letters.

``stream_ack`` acknowledges many entries per call (acks that arrive while one call is under way
go together in the next), or one entry copied first to the dead-letter stream ``{queue}:dead``
(too many deliveries, no ``data`` field). ``ack()`` only queues the acknowledgement, so a task's
slot in taskiq is free without waiting for Redis; the entry stays held (and renewed) until the
call is answered, and a clean stop sends what is queued before anything is released.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from taskiq_redis import connection, keys, scripts
from taskiq_redis.brokers.stream.claims import Claims
from taskiq_redis.brokers.stream.entries import DATA, Background, Delivery, Entry
from taskiq_redis.brokers.stream.streams import Streams
from taskiq_redis.diagnostics import describe

if TYPE_CHECKING:
    from redis.typing import EncodableT

logger = logging.getLogger("taskiq.redis_broker")

ACK = "stream_ack"
# The most ids one ack call carries, so no script call runs long.
ACK_BATCH = 1000
# How long an ack call waits for company in a busy worker (see Acks._send). Nobody waits for
# it but the entries' confirmation: a worker draining no-op tasks made ~350 ack calls for 5000
# tasks with 2 ms, ~170 with 5 ms, 57-73 with 10 ms (each step ran faster), ~2000 with none.
ACK_LINGER_SECONDS = 0.01
# Attempts of one ack call on connection errors before it is given up (and comes back later).
ACK_ATTEMPTS = 4
NO_DATA = "the entry has no data field"


class Ack:
    """The ``ack`` of one handed message; being collected unacknowledged means taskiq dropped it.

    ``__del__`` may run in any thread (a garbage collection triggered there), so it only sets a
    flag; the renewal loop acts on it.
    """

    __slots__ = ("_delivery", "_entry_id", "_queue", "_stream")

    def __init__(
        self,
        queue: Callable[[str, str, Delivery], Awaitable[None]],
        stream: str,
        entry_id: str,
        delivery: Delivery,
    ) -> None:
        self._queue = queue
        self._stream = stream
        self._entry_id = entry_id
        self._delivery = delivery

    def __call__(self) -> Awaitable[None]:
        return self._queue(self._stream, self._entry_id, self._delivery)

    def __del__(self) -> None:
        if not self._delivery.acking:
            self._delivery.dropped = True


async def _done() -> None:
    """What ``ack()`` returns: an awaitable that is done (the ack itself is queued)."""


class Acks:
    """Queues acknowledgements and sends them, many per script call, one call per stream."""

    def __init__(
        self,
        conn: connection.RedisConnection,
        streams: Streams,
        claims: Claims,
        background: Background,
        handed: Callable[[], int],
    ) -> None:
        self._conn = conn
        self._streams = streams
        self._claims = claims
        self._background = background
        self._handed = handed  # how many messages taskiq took so far: busy if it grows
        self._queued: dict[str, list[tuple[str, Delivery]]] = {}
        self._sender: asyncio.Task[None] | None = None
        self.script = scripts.get(ACK)

    def ack_for(self, entry: Entry, delivery: Delivery) -> Ack:
        """The ``ack`` to hand taskiq with the entry's message."""
        return Ack(self.queue, entry.stream, entry.entry_id, delivery)

    def queue(self, stream: str, entry_id: str, delivery: Delivery) -> Awaitable[None]:
        """Queue one entry's acknowledgement; what it returns is already done.

        The caller does not wait for Redis: a task's slot in taskiq is free as soon as it ends,
        and a worker takes the next message instead of waiting for a round trip. Delivery stays
        at-least-once: the entry is held and renewed until its ack call is answered, an ack
        call that fails is logged and the entry delivered again after ``idle_timeout``, and a
        clean stop sends what is queued before it releases anything.
        """
        if not delivery.acking:
            delivery.acking = True
            self._queued.setdefault(stream, []).append((entry_id, delivery))
            if self._sender is None or self._sender.done():
                self._sender = self._background.spawn(self._send())
        return _done()

    async def _send(self) -> None:
        # One ack call per stream in flight at a time; the acks queued while it is under way go
        # together in the next. A first ack goes at once. The next call waits
        # ACK_LINGER_SECONDS for company only if taskiq took more messages while the last call
        # was under way: more acks are coming, and an ack call costs a worker about as much as
        # a no-op task, so acks go tens per call instead of one or two.
        busy = False
        while self._queued:
            if busy and sum(map(len, self._queued.values())) < ACK_BATCH:
                await asyncio.sleep(ACK_LINGER_SECONDS)
            batch, self._queued = self._queued, {}
            handed = self._handed()
            await asyncio.gather(
                *(
                    self._ack_stream(stream, items[start : start + ACK_BATCH])
                    for stream, items in batch.items()
                    for start in range(0, len(items), ACK_BATCH)
                )
            )
            busy = self._handed() != handed

    async def _ack_stream(self, stream: str, items: list[tuple[str, Delivery]]) -> None:
        """One ``stream_ack`` call, retried on connection errors (acking twice is harmless).

        The entries are no longer held afterwards, also when the call is cancelled: an ack that
        did not reach Redis is then delivered again after ``idle_timeout``.
        """
        args: list[EncodableT] = [self._streams.group_name, 0, *(entry for entry, _ in items)]
        dead_key = keys.dead_letter_key(self._streams.queue_of.get(stream, stream))
        backoff = connection.Backoff(first=0.1, cap=1.0)
        try:
            for attempt in range(1, ACK_ATTEMPTS + 1):
                try:
                    await scripts.run(self._conn, self.script, [stream, dead_key], args)
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
                self._claims.forget(stream, entry_id, delivery)


class DeadLetters:
    """Entries the transport cannot deliver, moved to ``{queue}:dead`` with why."""

    def __init__(
        self,
        conn: connection.RedisConnection,
        streams: Streams,
        claims: Claims,
        max_deliveries: int | None,
        on_dead: Callable[[Entry, str], Awaitable[None]],
    ) -> None:
        self._conn = conn
        self._streams = streams
        self._claims = claims
        self._max_deliveries = max_deliveries
        self._on_dead = on_dead  # told of each entry dead-lettered (the broker stores a result)
        self._script = scripts.get(ACK)

    def problem(self, entry: Entry) -> str | None:
        """Why an entry goes to the dead-letter stream instead of to taskiq; None: it does not.

        Only what the transport decides: whether the data is a taskiq message is taskiq's
        receiver's business (it logs and acknowledges what it cannot parse).
        """
        if self._max_deliveries is not None and entry.deliveries > self._max_deliveries:
            return f"delivered {entry.deliveries} times, max_deliveries is {self._max_deliveries}"
        return NO_DATA if entry.data is None else None

    async def send(self, entry: Entry, delivery: Delivery, reason: str) -> None:
        """Copy the entry to the dead-letter stream and acknowledge it, in one script call."""
        dead_key = keys.dead_letter_key(self._streams.queue_of.get(entry.stream, entry.stream))
        logger.error(
            "Entry %s of stream %r goes to %r: %s", entry.entry_id, entry.stream, dead_key, reason
        )
        about: dict[bytes, EncodableT] = {
            b"reason": reason,
            b"stream": entry.stream,
            b"id": entry.entry_id,
            b"deliveries": entry.deliveries,
            b"group": self._streams.group_name,
        }
        fields: list[EncodableT] = [
            item
            for pair in {**(entry.fields or {DATA: entry.data or b""}), **about}.items()
            for item in pair
        ]
        try:
            await scripts.run(
                self._conn,
                self._script,
                [entry.stream, dead_key],
                [self._streams.group_name, len(fields), *fields, entry.entry_id],
            )
        except Exception as exc:  # it is no longer renewed: it comes back
            logger.warning(
                "Dead-lettering entry %s of stream %r failed: %s",
                entry.entry_id,
                entry.stream,
                describe(exc),
            )
            return
        finally:
            self._claims.forget(entry.stream, entry.entry_id, delivery)
        await self._on_dead(entry, reason)
