"""The streams a stream broker reads, their priority levels, and their consumer group.

Every queue read (``queue_name`` and the ``additional_streams``) is level 0 of its own priority
levels (see :mod:`taskiq_redis.priorities`); level N is the stream ``{queue}:priority:N`` in the
queue's slot, in the same consumer group. A level's stream is made by the first message kicked
to it (the ``stream_add`` script creates it with the group), so a queue that never uses
priorities has only the keys taskiq-redis 1.2 had. The ``stream_read`` script looks at every
level and skips those that do not exist (an EXISTS each); it gives the group to a level stream
made without one (by the delay mover or a requeued dead letter), and says which exist. A
worker's blocking reads name only the streams *known* to exist: level 0 from the start, a
higher level once a script read has seen it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from redis.crc import key_slot
from redis.exceptions import ResponseError

from taskiq_redis import connection, keys, priorities, scripts, task_ids
from taskiq_redis.brokers.stream.entries import DATA, Entry, text
from taskiq_redis.diagnostics import describe

logger = logging.getLogger("taskiq.redis_broker")

ADD = "stream_add"

# A read group: the streams one XREADGROUP may name (one cluster slot), highest level first.
Group = tuple[str, ...]


class Streams:
    """Which streams a broker reads, in what order, and which of them exist yet."""

    def __init__(
        self,
        conn: connection.RedisConnection,
        group_name: str,
        start_ids: Mapping[str, str],
        max_priority: int,
        mkstream: bool,
    ) -> None:
        self._conn = conn
        self.group_name = group_name
        self.max_priority = max_priority
        self._mkstream = mkstream
        self._start_ids = dict(start_ids)  # level 0 of each queue: where its group starts
        self.levels = {queue: priorities.Levels(queue, max_priority) for queue in start_ids}
        self.queues = tuple(self.levels)  # as logs name them: with their levels
        self.queue_of: dict[str, str] = {}
        self.level_of: dict[str, int] = {}
        for level in range(max_priority, -1, -1):
            for queue, levels in self.levels.items():
                stream = levels.key(level)
                self.queue_of.setdefault(stream, queue)
                self.level_of.setdefault(stream, level)
        every = sorted(self.queue_of, key=self.level_of.__getitem__, reverse=True)
        by_slot: dict[int, list[str]] = {}
        for stream in every:
            slot = key_slot(stream.encode()) if conn.is_cluster else 0
            by_slot.setdefault(slot, []).append(stream)
        self.groups: list[Group] = [tuple(streams) for streams in by_slot.values()]
        self.group_of = {stream: group for group in self.groups for stream in group}
        self.known: dict[Group, Group] = {}  # per group, the streams known to exist
        self.tiers: dict[Group, list[int]] = {}  # per group, its streams per level
        for group in self.groups:
            self.known[group] = tuple(stream for stream in group if stream in self._start_ids)
            per_level: dict[int, int] = {}
            for stream in group:
                per_level[self.level_of[stream]] = per_level.get(self.level_of[stream], 0) + 1
            self.tiers[group] = list(per_level.values())
        self._add = scripts.get(ADD)
        self.scripts = (self._add,)

    def learn(self, group: Group, existing: Iterable[bytes | str]) -> None:
        """Note which streams of ``group`` exist, as a script read found them."""
        new = {text(stream) for stream in existing}.difference(self.known[group])
        if new:
            known = new.union(self.known[group])
            self.known[group] = tuple(stream for stream in group if stream in known)

    def every_known(self) -> list[str]:
        return [stream for group in self.groups for stream in self.known[group]]

    def rank(self, entry: Entry) -> int:
        """Sort key: higher levels first."""
        return -self.level_of.get(entry.stream, 0)

    def above(self, stream: str) -> tuple[tuple[str, ...], bool]:
        """The streams of levels above ``stream``'s, highest first; and whether one is known to
        exist (a read of those that do not is cheap, but not worth a read of its own)."""
        level = self.level_of.get(stream, self.max_priority)
        group = self.group_of[stream]
        higher = tuple(other for other in group if self.level_of[other] > level)
        known = any(self.level_of[other] > level for other in self.known[group])
        return higher, known

    async def startup(self) -> None:
        """Create the group on each queue read (its levels get it with their first message)."""
        for stream, start in self._start_ids.items():
            await self.create_group(stream, start)

    async def add(self, queue: str, level: int, message: bytes, trim: tuple[Any, ...]) -> None:
        """Append ``message`` to the queue's stream of ``level``."""
        stream = keys.priority_key(queue, level)
        if level == 0:
            await self._conn.execute("XADD", stream, *trim, "*", DATA, message)
            return
        maxlen, mode = task_ids.maxlen_args(trim)
        await scripts.run(self._conn, self._add, [stream], [self.group_name, maxlen, mode, message])

    async def create_group(self, stream: str, start: str) -> None:
        """XGROUP CREATE; a group that exists already is fine."""
        # A level stream is the broker's own: it is always created (mkstream is about the queue).
        mkstream = ("MKSTREAM",) if self._mkstream or self.level_of.get(stream) else ()
        try:
            await self._conn.execute("XGROUP", "CREATE", stream, self.group_name, start, *mkstream)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                logger.warning(
                    "Cannot create group %r on stream %r: %s",
                    self.group_name,
                    stream,
                    describe(exc),
                )

    async def recreate_group(self, streams: Iterable[str]) -> None:
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
                self.group_name,
                stream,
            )
            try:
                await self.create_group(stream, "0")
            except Exception as exc:  # the next NOGROUP tries again
                logger.warning(
                    "Cannot create group %r on stream %r: %s",
                    self.group_name,
                    stream,
                    describe(exc),
                )
