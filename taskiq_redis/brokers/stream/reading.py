"""Reading a stream broker's queues: what is handed to taskiq next, in priority order.

How many tasks run at once is taskiq's business (``--max-async-tasks``): its receiver pulls a
message only when it has room. ``xread_count`` is the COUNT of one read. After a full read (a
backlog) the next one starts, without blocking, while a quarter of it is left to hand over, or
sooner when the held entries are due for a look at the levels above (see
:meth:`Reader._recheck`); it asks for no more than keeps what was read and not yet handed over
below 1.25 times ``xread_count``. Otherwise a read starts when taskiq asks and nothing is held.

Reads name the levels highest first: the ``stream_read`` script returns the first level that
has new entries, and a native read, which may wake with several, hands the higher levels over
first. The script looks at every level (one that does not exist costs an EXISTS); a native read
names only the levels known to exist (see :mod:`taskiq_redis.brokers.stream.streams`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from taskiq_redis import connection, priorities, scripts
from taskiq_redis.brokers.base import READ_AHEAD_SHARE
from taskiq_redis.brokers.stream.claims import Claims
from taskiq_redis.brokers.stream.entries import (
    Background,
    Entry,
    by_stream,
    entry_of,
    no_group,
    text,
)
from taskiq_redis.brokers.stream.streams import Group, Streams
from taskiq_redis.diagnostics import describe

logger = logging.getLogger("taskiq.redis_broker")

READ = "stream_read"
# A read unanswered this long after its BLOCK and the socket timeout have passed is given up.
READ_MARGIN_SECONDS = 5.0
# The COUNT of a script read when xread_count is None (no limit, as a native read without COUNT).
ALL = 2**31 - 1


class Reader:
    """Reads ahead, reclaims when due, and orders what is read by level; see the module doc."""

    def __init__(
        self,
        conn: connection.RedisConnection,
        streams: Streams,
        claims: Claims,
        background: Background,
        consumer_name: str,
        count: int | None,
        block_ms: int,
        socket_timeout: float | None,
    ) -> None:
        self._conn = conn
        self._streams = streams
        self._claims = claims
        self._background = background
        self._consumer = consumer_name
        self._count = count
        self._block_ms = block_ms
        # How long a read may go unanswered before it is given up (see _give_up_stuck_reads).
        self.read_patience = block_ms / 1000 + (socket_timeout or 0) + READ_MARGIN_SECONDS
        self._read_ahead_at = (count or 0) // READ_AHEAD_SHARE
        self._script = scripts.get(READ)
        self._ready: deque[Entry] = deque()  # read or reclaimed, not yet handed to taskiq
        self._reads: dict[Group, asyncio.Task[list[Entry]]] = {}
        self._read_since: dict[Group, float] = {}  # when each read in flight began
        self._full: dict[Group, bool] = {}  # the last read filled its COUNT
        self._checked = 0.0  # when Redis last said which levels have new entries (monotonic)
        self._higher: asyncio.Task[list[Entry]] | None = None  # the check of higher levels
        self._now = 0.0  # when next() took its entry
        self._last_handed = 0.0  # when taskiq last took a message (monotonic)
        self._answered = False  # a read has answered and its entries are not taken yet
        self._backoff = connection.Backoff()
        self.handed_count = 0  # messages handed to taskiq so far

    async def next(self) -> Entry:
        """The next entry to hand over; waits for one, and never raises (errors are retried)."""
        while not self._ready:
            self._take_higher()
            if self._ready:
                break
            try:
                self._ready.extend(await self._fetch())
            except Exception as exc:  # redis-py raises more than RedisError
                logger.warning(
                    "Reading streams %s failed; retrying: %s", self._streams.queues, describe(exc)
                )
                await self._backoff.wait()
            else:
                self._backoff.reset()
        self._now = now = time.monotonic()
        if self._higher is not None or now - self._checked > priorities.RECHECK_SECONDS:
            await self._recheck()
        if len(self._ready) <= self._read_ahead_at and len(self._reads) < len(self._streams.groups):
            self._start_reads(ahead=True)  # answered before these are handed over
        if self._answered:
            await self._take_read_ahead()
        return self._ready.popleft()

    def handed(self) -> float:
        """Note that the entry :meth:`next` returned went to taskiq; when that was."""
        self._last_handed = self._now
        self.handed_count += 1
        return self._now

    def clear(self) -> None:
        self._ready.clear()

    async def _fetch(self) -> list[Entry]:
        """The next entries to yield: reclaimed ones when a scan is due, else new ones."""
        if self._claims.reclaim_due():
            entries = await self._claims.reclaim()
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
        level = self._streams.level_of.get(stream, self._streams.max_priority)
        if level >= self._streams.max_priority or now - self._checked <= priorities.RECHECK_SECONDS:
            return
        self._checked = now
        group = self._streams.group_of[stream]
        above, known = self._streams.above(stream)
        if (
            not unhurried
            and known
            and self._full.get(group)
            and group not in self._reads
            and self._start_reads(ahead=True)
        ):
            # A backlog drains: the read that tops the held entries up (made sooner than it
            # would be) looks at the levels above too, in the same round trip. While no level
            # above exists, the look is a read of its own instead, which finds nothing at the
            # cost of an EXISTS per level, and the reads ahead keep their size.
            return
        self._higher = self._background.spawn(self._read_higher(above))
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
                "Checking the higher levels of %s failed: %s", self._streams.queues, describe(error)
            )
        elif not task.cancelled():
            self._ready.extendleft(reversed(task.result()))

    async def _read_higher(self, streams: tuple[str, ...]) -> list[Entry]:
        entries = await self._read_script(streams, self._count or 100, [1] * len(streams))
        return self._claims.hold(entries)

    def _start_reads(self, ahead: bool = False) -> bool:
        """Start a read for each stream group that has none in flight; whether any started.

        A read ahead (before the held entries run out) is made only for a group whose last read
        came back full, a backlog, and never blocks: a worker whose taskiq stopped asking must
        not sit on new messages that idle workers could run. It asks for no more than keeps
        what is held within xread_count plus a read ahead's share, and is not made when that
        is full already.
        """
        count = self._count
        if count is not None:
            room = min(count, count + self._read_ahead_at - len(self._ready))
            if ahead and room < 1:
                return False
            count = max(1, room // len(self._streams.groups))
        started = False
        for group in self._streams.groups:
            if group in self._reads or (ahead and not self._full.get(group)):
                continue
            task = self._reads[group] = self._background.spawn(
                self._read_group(group, count, block=not ahead)
            )
            task.add_done_callback(self._read_answered)
            self._read_since[group] = time.monotonic()
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
            logger.warning("Reading streams %s failed: %s", self._streams.queues, describe(exc))
            return
        if entries:
            self._checked = time.monotonic()
            merged = sorted((*self._ready, *entries), key=self._streams.rank)
            self._ready.clear()
            self._ready.extend(merged)

    async def _read(self) -> list[Entry]:
        """Start a read for each stream group that has none, and take the first answer."""
        self._start_reads()
        oldest = min(self._read_since[group] for group in self._reads)
        wait = max(0.0, oldest + self.read_patience - time.monotonic())
        # A check of the higher levels that answers meanwhile is handed over without waiting
        # for a blocking read to end.
        higher = [self._higher] if self._higher is not None else []
        await asyncio.wait(
            [*self._reads.values(), *higher], timeout=wait, return_when=asyncio.FIRST_COMPLETED
        )
        self._give_up_stuck_reads()
        return await self._collect_reads()

    async def _collect_reads(self) -> list[Entry]:
        """What the reads that answered brought; a failure is raised when none brought any."""
        self._answered = False
        entries: list[Entry] = []
        failure: BaseException | None = None
        for group, task in list(self._reads.items()):
            if task.done():
                del self._reads[group]
                error = task.exception()
                if error is None:
                    entries += task.result()
                else:
                    failure = error
                    if no_group(error):
                        known = self._streams.known[group]
                        await self._background.run(self._streams.recreate_group(known))
        if failure is not None and not entries:
            raise failure
        if failure is not None:
            logger.warning(
                "Reading streams %s failed; retrying: %s", self._streams.queues, describe(failure)
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
        for group, task in list(self._reads.items()):
            if not task.done() and now - self._read_since[group] >= self.read_patience:
                logger.warning(
                    "Reading streams %s got no answer in %.0f s; reading again on a new connection",
                    list(self._streams.known[group]),
                    self.read_patience,
                )
                task.cancel()
                del self._reads[group]

    async def _read_group(self, group: Group, count: int | None, block: bool = True) -> list[Entry]:
        """Read new entries of the group's known streams; what it returns is held from then on.

        After a full batch more are likely waiting, so the next read is the ``stream_read``
        script (two reply values per entry instead of six, and no dict per entry); after a
        short one, or when the script finds nothing, a native XREADGROUP blocks for new ones.
        """
        entries = []
        tiers = self._streams.tiers[group]
        # With several levels the script also goes first, so a backlog is read level by level.
        if self._full.get(group) or len(tiers) > 1:
            entries = await self._read_script(group, count or ALL, tiers)
        if not entries and block:
            streams = self._streams.known[group]
            counting = () if count is None else ("COUNT", count)
            reply = await self._conn.execute(
                "XREADGROUP",
                *("GROUP", self._streams.group_name, self._consumer),
                *counting,
                *("BLOCK", self._block_ms, "STREAMS", *streams),
                *(">",) * len(streams),
            )
            for stream, stream_entries in by_stream(reply):
                name = text(stream)
                entries += [
                    entry_of(name, entry_id, 1, fields) for entry_id, fields in stream_entries
                ]
            # A read that woke with several levels hands the higher ones over first.
            entries.sort(key=self._streams.rank)
        self._full[group] = count is not None and len(entries) >= count
        return self._claims.hold(entries)

    async def _read_script(
        self, streams: tuple[str, ...], count: int, tiers: list[int]
    ) -> list[Entry]:
        """``stream_read``: new entries of the first tier of streams that has any, not held yet.

        It also says which of the streams exist, and where it gave a level stream the group.
        """
        reply = await scripts.run(
            self._conn,
            self._script,
            list(streams),
            [self._streams.group_name, self._consumer, count, *tiers],
        )
        existing, created = reply[0], reply[1]
        self._streams.learn(self._streams.group_of[streams[0]], existing)
        for stream in map(text, created):
            logger.info(
                "Stream %r had no consumer group %r; created it, from the stream's start",
                stream,
                self._streams.group_name,
            )
        entries = []
        for stream, flat in zip(reply[2::2], reply[3::2], strict=True):
            name = text(stream)
            for entry_id, data in zip(flat[::2], flat[1::2], strict=True):
                if isinstance(data, bytes):
                    entries.append(Entry(name, text(entry_id), 1, data))
                else:
                    entries.append(entry_of(name, entry_id, 1, data))
        return entries
