"""The entries this consumer holds: claimed by a read, renewed while held, released on a stop.

What a consumer read and has not acknowledged stays in the group's pending list, so nothing is
lost when a worker dies; two scripts keep those entries moving:

- ``stream_reclaim`` (every second at most, when the reader asks): entries idle longer than
  ``idle_timeout`` ms are claimed by this consumer. Their consumer died, or let them go.
- ``stream_renew`` (every ``idle_timeout / 3``, in a task of its own): the entries this consumer
  holds get their idle time reset, so a task that runs longer than ``idle_timeout`` is not run a
  second time elsewhere; it never takes back an entry another consumer reclaimed meanwhile. On a
  clean stop the same script releases what this consumer still holds (idle time set huge), so
  the next reclaim by any consumer takes it at once instead of after ``idle_timeout``.

taskiq skips the ack when a middleware or a dependency cleanup raises: a message it let go of
is collected, its :class:`~taskiq_redis.brokers.stream.entries.Delivery` marked dropped, and the
entry is no longer renewed, so any consumer takes it again ``idle_timeout`` later. A task that is
still running keeps its message, so it keeps its claim.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time

from taskiq_redis import connection, scripts
from taskiq_redis.brokers.stream.entries import (
    Background,
    Delivery,
    Entry,
    entry_of,
    no_group,
    text,
)
from taskiq_redis.brokers.stream.streams import Streams
from taskiq_redis.diagnostics import describe

logger = logging.getLogger("taskiq.redis_broker")

RECLAIM, RENEW, CONSUMERS = "stream_reclaim", "stream_renew", "stream_consumers"
# The idle time that releases an entry: over 31 years, yet below the server clock in ms
# (Redis ignores an IDLE that would date the delivery before 1970).
RELEASE_IDLE_MS = 10**12
# The most ids one renewal call carries, so no script call runs long.
RENEW_BATCH = 1000
# XAUTOCLAIM calls per reclaim script call: each scans up to ten times what is still wanted.
RECLAIM_SCANS = 10
# Consumers that hold nothing and have been idle this many idle timeouts (and at least
# PRUNE_IDLE_FLOOR seconds: a live worker's blocking read leaves it idle up to a second) are
# removed, by a reclaim pass at most every PRUNE_EVERY seconds; at most PRUNE_BATCH looked at.
PRUNE_IDLE_FACTOR = 3
PRUNE_IDLE_FLOOR = 10.0
PRUNE_EVERY = 30.0
PRUNE_BATCH = 1000


class Claims:
    """This consumer's claims: what it holds, their renewal and release, and reclaim."""

    def __init__(
        self,
        conn: connection.RedisConnection,
        streams: Streams,
        consumer_name: str,
        idle_timeout: int,
        reclaim_batch: int,
        reclaim_every: float,
        background: Background,
    ) -> None:
        self._conn = conn
        self._streams = streams
        self._consumer = consumer_name
        self._idle_timeout = idle_timeout
        self._reclaim_batch = reclaim_batch
        self._reclaim_every = reclaim_every
        self._background = background
        self._renew_every = idle_timeout / 3000
        self._held: dict[tuple[str, str], Delivery] = {}
        self._cursors: dict[str, str] = {}
        self._next_reclaim = 0.0
        self._renewer: asyncio.Task[None] | None = None
        self._collected_at = 0.0
        self._closing = False
        self._next_prune = 0.0
        self._prune_idle_ms = int(max(PRUNE_IDLE_FACTOR * idle_timeout, PRUNE_IDLE_FLOOR * 1000))
        self._reclaim = scripts.get(RECLAIM)
        self._renew = scripts.get(RENEW)
        self._consumers = scripts.get(CONSUMERS)
        self.scripts = (self._reclaim, self._renew, self._consumers)

    def hold(self, entries: list[Entry]) -> list[Entry]:
        """Hold what a read or a reclaim returned, from now until it is acknowledged."""
        for entry in entries:
            self._held[entry.stream, entry.entry_id] = Delivery(entry.deliveries)
        return entries

    def get(self, entry: Entry) -> Delivery | None:
        """The delivery of a held entry; None once another consumer reclaimed it."""
        return self._held.get((entry.stream, entry.entry_id))

    def _still_held(self, stream: str, entry_id: str) -> Delivery | None:
        delivery = self._held.get((stream, entry_id))
        return None if delivery is None or delivery.dropped else delivery

    def forget(self, stream: str, entry_id: str, delivery: Delivery) -> None:
        """No longer hold an entry, unless it was delivered to this consumer again since."""
        if self._held.get((stream, entry_id)) is delivery:
            del self._held[stream, entry_id]

    # ------------------------------------------------------------------ reclaim

    def reclaim_due(self) -> bool:
        return time.monotonic() >= self._next_reclaim

    async def reclaim(self) -> list[Entry]:
        """Claim entries idle longer than ``idle_timeout``, each known stream on its own."""
        self._next_reclaim = time.monotonic() + self._reclaim_every
        entries: list[Entry] = []
        for stream in self._streams.every_known():
            try:
                claimed = await self._background.run(self._reclaim_stream(stream))
            except Exception as exc:  # reading goes on; next scan retries
                logger.warning(
                    "Reclaiming idle entries of stream %r failed; retrying: %s",
                    stream,
                    describe(exc),
                )
                if no_group(exc):
                    await self._background.run(self._streams.recreate_group([stream]))
                continue
            if len(claimed) >= self._reclaim_batch:
                self._next_reclaim = 0.0  # a full batch: more may be waiting
            entries += claimed
        if time.monotonic() >= self._next_prune:
            self._next_prune = time.monotonic() + PRUNE_EVERY
            await self._background.run(self._remove_consumers("", self._prune_idle_ms))
        return entries

    async def _remove_consumers(self, me: str, idle_ms: int | str) -> None:
        """Remove the group's consumers that hold nothing: ``me``, and those idle ``idle_ms``.

        A failure is logged: consumers left behind cost only a line in ``XINFO CONSUMERS``.
        """
        for stream in self._streams.every_known():
            try:
                removed = await scripts.run(
                    self._conn,
                    self._consumers,
                    [stream],
                    [self._streams.group_name, me, idle_ms, PRUNE_BATCH],
                )
            except Exception as exc:
                logger.warning(
                    "Removing idle consumers of stream %r failed: %s", stream, describe(exc)
                )
                continue
            others = [name for name in map(text, removed) if name != me]
            if others:
                logger.info(
                    "Removed %d consumers of stream %r that held nothing and were idle over "
                    "%d s: %s",
                    len(others),
                    stream,
                    int(idle_ms) // 1000,
                    ", ".join(others),
                )

    async def _reclaim_stream(self, stream: str) -> list[Entry]:
        cursor, claimed = await scripts.run(
            self._conn,
            self._reclaim,
            [stream],
            [
                self._streams.group_name,
                self._consumer,
                self._idle_timeout,
                self._cursors.get(stream, "0-0"),
                self._reclaim_batch,
                RECLAIM_SCANS,
            ],
        )
        self._cursors[stream] = text(cursor)
        # An entry this consumer still holds went idle because Redis was away (its renewal or
        # its ack is still trying): claiming it again is no new delivery, it stays where it is.
        entries = [
            entry_of(stream, entry_id, int(deliveries), fields)
            for entry_id, deliveries, fields in claimed
            if self._still_held(stream, text(entry_id)) is None
        ]
        if entries:
            logger.info("Reclaimed %d idle entries of stream %r", len(entries), stream)
        return self.hold(entries)

    # ------------------------------------------------------------------ renewal

    def keep_renewing(self) -> None:
        """Start the renewal task, and again should it ever have ended."""
        renewer = self._renewer
        if renewer is None or renewer.done():
            if renewer is not None:
                logger.error("Renewing claims had stopped; starting it again")
            self._renewer = asyncio.ensure_future(self._keep_claims())

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
                    if no_group(exc):
                        await self._streams.recreate_group([stream])

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
                self._renew,
                [stream],
                [
                    self._streams.group_name,
                    self._consumer,
                    idle_ms,
                    *args[start : start + 2 * RENEW_BATCH],
                ],
            )
            if idle_ms == RELEASE_IDLE_MS:
                continue
            for entry_id in map(text, lost):
                delivery = self._held.pop((stream, entry_id), None)
                # An entry whose ack went first is no longer pending: not lost to anyone.
                if delivery is not None and not delivery.acking:
                    logger.warning(
                        "Entry %s of stream %r was reclaimed by another consumer "
                        "while this one held it",
                        entry_id,
                        stream,
                    )

    # ------------------------------------------------------------------ stop

    def stop_renewing(self) -> asyncio.Task[None] | None:
        """Stop renewing; the renewal task, for the caller to wait on."""
        self._closing = True
        if self._renewer is not None:
            self._renewer.cancel()
        return self._renewer

    async def release(self) -> None:
        """Release every held entry to the other consumers (after the stop waited for reads and
        acks in flight). An entry never handed to taskiq gets its delivery count back."""
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
        # Leaving: this consumer goes from every stream where it holds nothing (where it still
        # holds released entries, another worker's prune removes it once they are reclaimed).
        if self._renewer is not None:  # it listened, so it is a consumer
            await self._remove_consumers(self._consumer, "")
