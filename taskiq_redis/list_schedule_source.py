"""Schedule sources that index schedule ids in one sorted set: one implementation, three topologies.

Keys (``base`` is the prefix, or ``{prefix}`` on a cluster so one script reaches them all):

- ``base:data:<id>``: the serialized schedule (taskiq-redis 1.2's name and format).
- ``{base}__schedules``: the index, a sorted set with every score 0 whose members are a
  placement followed by the id: ``c<id>`` cron, ``i<id>`` interval, ``t<YYYY-MM-DDTHH:MM><id>``
  a timed schedule of that UTC minute. Members sort crons first, then intervals, then timed
  schedules by minute, so "every cron and interval schedule and every timed one due by now" is
  one lexicographic range, read in pages whose cursor is the last member read. Writers cannot
  shift a member, so a schedule that stays stored for a whole ``get_schedules()`` is returned
  by it, however many others are added or deleted meanwhile.
- ``{base}__placement``: a hash, id -> placement, so a write finds the one member to replace.
  A write touches the data key, one member and one field: the same at 10 or 100k schedules.

taskiq-redis 1.2 kept ids in lists (``base:cron``, ``base:interval``,
``base:time:<YYYY-MM-DDTHH:MM>``), where removing one id costs a pass over the whole list. Those
lists are now an inbox: ``startup()`` moves every id in them into the index, and each
``get_schedules()`` moves what a still-running 1.2 process pushed since (and logs a warning).
1.2's deletes remove the data key, which this source notices and follows.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

from redis.crc import key_slot
from taskiq import ScheduledTask, ScheduleSource
from taskiq.abc.serializer import TaskiqSerializer
from taskiq.serializers import PickleSerializer

from taskiq_redis import connection, keys, scripts
from taskiq_redis.schedule_source import (
    BaseRedisScheduleSource,
    check_schedule,
    check_schedule_id,
    minute_of,
    read_batch,
    read_schedules,
    scan_keys,
    text,
)

logger = logging.getLogger("taskiq.redis_schedule_source")

WRITE = "schedule_write"
TAKE_OVER = "schedule_take_over"

INDEX_SUFFIX = "__schedules"
PLACEMENT_SUFFIX = "__placement"

# How many ids one script call takes over from taskiq-redis 1.2's lists: bounded, so taking
# over a large 1.2 deployment is many short calls rather than one long one.
TAKE_OVER_BATCH = 100

# 1.2's time buckets of the minutes since the previous get_schedules() are checked for ids a
# 1.2 process pushed; at most this many minutes back.
INBOX_MINUTES = 10

# How many of 1.2's lists one take-over call looks at.
TAKE_OVER_LISTS = 100

_Source = TypeVar("_Source", bound="BaseListRedisScheduleSource")


def bucket_name(minute: int) -> str:
    """The UTC minute a 1.2 time bucket list is named after, in taskiq-redis 1.2's format."""
    return datetime.fromtimestamp(minute, timezone.utc).strftime(keys.TIME_BUCKET_FORMAT)


def bucket_minute(name: str) -> int | None:
    """The minute (unix seconds) of a bucket list's name, or None if it is not one."""
    try:
        parsed = datetime.strptime(name, keys.TIME_BUCKET_FORMAT)
    except ValueError:
        return None
    return minute_of(parsed)


def timed_placement(minute: int) -> str:
    """``t`` and the minute as ``YYYY-MM-DDTHH:MM``, zero-padded so text order is time order."""
    at = datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=minute)
    return f"t{at.year:04}-{at.month:02}-{at.day:02}T{at.hour:02}:{at.minute:02}"


def placement_of(schedule: ScheduledTask) -> str:
    """Where a schedule is indexed, in taskiq-redis 1.2's order: cron, then time, then interval."""
    if schedule.cron is not None:
        return "c"
    if schedule.time is not None:
        return timed_placement(minute_of(schedule.time))
    if schedule.interval:
        return "i"
    raise ValueError(f"schedule {schedule.schedule_id} has no cron, time or interval")


def split_member(member: bytes) -> tuple[str, str]:
    """An index member as (placement, schedule id)."""
    value = member.decode()
    cut = 17 if value.startswith("t") else 1
    return value[:cut], value[cut:]


def now() -> datetime:
    """The scheduler's clock (tests replace it to step time)."""
    return datetime.now(timezone.utc)


class BaseListRedisScheduleSource(connection.HasConnection, ScheduleSource):
    """The list source; the public classes below only choose how to reach Redis."""

    def __init__(
        self,
        conn: connection.RedisConnection,
        prefix: str = "schedule",
        serializer: TaskiqSerializer | None = None,
        buffer_size: int = 50,
        skip_past_schedules: bool = False,
    ) -> None:
        self._batch = read_batch(prefix, buffer_size)
        self._conn = conn
        self._prefix = prefix
        self._buffer_size = buffer_size
        self._serializer = serializer or PickleSerializer()
        self._skip_past_schedules = skip_past_schedules
        self._base = keys.schedule_base(prefix, conn.is_cluster)
        self._index = keys.beside(self._base, INDEX_SUFFIX)
        self._placements = keys.beside(self._base, PLACEMENT_SUFFIX)
        self._legacy_lists = {
            keys.schedule_cron_key(self._base): "c",
            keys.schedule_interval_key(self._base): "i",
        }
        self._taken_over = False
        # The minute of the previous get_schedules(): 1.2's buckets from there to now are
        # checked for ids a 1.2 process pushed.
        self._previous_minute: int | None = None
        self._previous_schedule_source: ScheduleSource | None = None
        self._delete_schedules_after_migration = True

    def _data_key(self, schedule_id: str) -> str:
        return keys.schedule_data_key(self._base, schedule_id)

    def _bucket(self, minute: int) -> str:
        return keys.schedule_time_key(self._base, bucket_name(minute))

    def with_migrate_from(
        self: _Source, source: ScheduleSource, delete_schedules: bool = True
    ) -> _Source:
        """Move (or, with ``delete_schedules=False``, copy) ``source``'s schedules at startup."""
        if not isinstance(source, ScheduleSource):
            raise TypeError(f"can only migrate from a ScheduleSource, got {type(source).__name__}")
        if source is self:
            raise ValueError("a schedule source cannot migrate from itself")
        self._previous_schedule_source = source
        self._delete_schedules_after_migration = delete_schedules
        return self

    async def startup(self) -> None:
        """Load the scripts, take over what taskiq-redis 1.2 wrote, then migrate."""
        await super().startup()
        await scripts.load(self._conn, [scripts.get(WRITE), scripts.get(TAKE_OVER)])
        await self._take_over_legacy()
        if self._previous_schedule_source is not None:
            await self._migrate(self._previous_schedule_source)

    async def shutdown(self) -> None:
        """Close the connections."""
        await self._conn.close()
        await super().shutdown()

    async def _write(
        self,
        schedule_id: str,
        action: str,
        placement: str = "",
        payload: bytes = b"",
        move_from: Sequence[str] = (),
    ) -> int:
        touched: int = await scripts.run(
            self._conn,
            scripts.get(WRITE),
            [self._data_key(schedule_id), self._index, self._placements, *move_from],
            [schedule_id, action, placement, payload],
        )
        return touched

    async def _store(self, schedule: ScheduledTask, move_from: Sequence[str] = ()) -> None:
        schedule = check_schedule(schedule)
        placement = placement_of(schedule)
        payload = self._serializer.dumpb(schedule.model_dump(mode="json"))
        await self._write(schedule.schedule_id, "store", placement, payload, move_from)

    async def add_schedule(self, schedule: ScheduledTask) -> None:
        """Store a schedule and its index entry, replacing one with the same id wherever it was."""
        await self._store(schedule)

    async def delete_schedule(self, schedule_id: str) -> None:
        """Remove a schedule and its index entry; an unknown id is not an error."""
        await self._write(check_schedule_id(schedule_id), "delete")

    async def post_send(self, task: ScheduledTask) -> None:
        """A one-off timed schedule is deleted once sent (unless it was moved meanwhile)."""
        if task.time is not None:
            await self._write(task.schedule_id, "sent", placement_of(task))

    async def _take_over(self, inbox: dict[str, str]) -> list[str]:
        """Move the ids in taskiq-redis 1.2's ``inbox`` lists into the index, in short calls."""
        taken: list[str] = []
        while True:
            took = await scripts.run(
                self._conn,
                scripts.get(TAKE_OVER),
                [self._index, self._placements, *inbox],
                [TAKE_OVER_BATCH, *inbox.values()],
            )
            taken += [text(schedule_id) for schedule_id in took]
            if len(took) < TAKE_OVER_BATCH:
                return taken

    async def _read(self, ranges: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        """The index members in ``ranges``, page by page from the last member read.

        A member is a fixed point that writers cannot shift: a schedule indexed for the whole
        read is in one of the pages, however many others are added or removed meanwhile.
        """
        members: list[tuple[str, str]] = []
        for start, high in ranges:
            low: str | bytes = start
            while True:
                page = await self._conn.execute(
                    "ZRANGE", self._index, low, high, "BYLEX", "LIMIT", 0, self._batch
                )
                members += [split_member(member) for member in page]
                if len(page) < self._batch:
                    break
                low = b"(" + page[-1]
        return members

    async def _take_over_legacy(self) -> None:
        """Move every id in taskiq-redis 1.2's lists into the index (once per process start)."""
        inbox = dict(self._legacy_lists)
        bucket_prefix = keys.schedule_time_prefix(self._base)
        pattern = keys.glob_escape(bucket_prefix) + "*"
        async for key in scan_keys(self._conn, pattern, "list"):
            minute = bucket_minute(key[len(bucket_prefix) :])
            if minute is None:
                logger.debug("List %s is not a time bucket; left alone", key)
                continue
            inbox[key] = timed_placement(minute)
        lists = list(inbox.items())
        taken: list[str] = []
        for start in range(0, len(lists), TAKE_OVER_LISTS):
            taken += await self._take_over(dict(lists[start : start + TAKE_OVER_LISTS]))
        if taken:
            logger.info(
                "Took %d schedules written by taskiq-redis 1.2 under prefix %s into the index",
                len(taken),
                self._prefix,
            )
        self._taken_over = True

    def _ranges(self, minute: int) -> list[tuple[str, str]]:
        """The index ranges due at ``minute``: 1.2.4's rule for timed schedules.

        Every cron and interval schedule; timed schedules of this minute, and (unless
        ``skip_past_schedules``) of every earlier minute too. Nothing is dropped because of
        the clock: a schedule not handed out stays stored until sent or deleted.
        """
        next_minute = f"({timed_placement(minute + 60)}"
        if self._skip_past_schedules:
            return [("-", "(t"), (f"[{timed_placement(minute)}", next_minute)]
        return [("-", next_minute)]

    def _inbox(self, minute: int) -> dict[str, str]:
        """1.2's lists a 1.2 process may have pushed to since the previous call."""
        first = minute if self._previous_minute is None else self._previous_minute
        first = max(first, minute - INBOX_MINUTES * 60)
        inbox = dict(self._legacy_lists)
        for bucket_at in range(first, minute + 60, 60):
            inbox[self._bucket(bucket_at)] = timed_placement(bucket_at)
        return inbox

    async def get_schedules(self) -> list[ScheduledTask]:
        """Every cron and interval schedule, and the timed ones due (1.2.4's rule).

        With 1000 cron schedules this is three Redis commands: EXISTS (has a 1.2 process
        pushed ids to its lists?), ZRANGE of the index and MGET of the schedules.
        """
        if not self._taken_over:
            await self._take_over_legacy()
        minute = minute_of(now())
        inbox = self._inbox(minute)
        taken = []
        if await self._conn.execute("EXISTS", *inbox):
            taken = await self._take_over(inbox)
        members = await self._read(self._ranges(minute))
        self._previous_minute = minute
        if taken:
            logger.warning(
                "taskiq-redis 1.2 added schedules %s under prefix %s while this source runs; "
                "they are taken over now. Upgrade every process that adds schedules: 1.2 does "
                "not see schedules this package writes",
                ", ".join(taken[:10]) + (" ..." if len(taken) > 10 else ""),
                self._prefix,
            )
        placements = {schedule_id: placement for placement, schedule_id in members}
        found, missing = await read_schedules(
            self._conn,
            self._serializer,
            list(placements),
            self._data_key,
            self._batch,
        )
        for schedule_id in missing:
            # Deleted meanwhile, or by a writer that removes the data only (1.2).
            await self._write(schedule_id, "prune")
        schedules = []
        for schedule_id, schedule in found.items():
            seen = placements[schedule_id]
            try:
                placement = placement_of(schedule)
            except ValueError:
                logger.warning("Schedule %s has no cron, time or interval; skipped", schedule_id)
                continue
            if placement != seen:
                # Rewritten while this call ran (then it is already indexed elsewhere), or by a
                # 1.2 process whose list this source did not look at: index it where it belongs.
                # It is handed out from there, by the next call at the latest.
                await self._write(schedule_id, "move", placement, seen.encode())
                continue
            schedules.append(schedule)
        return schedules

    async def _migrate(self, source: ScheduleSource) -> None:
        """Copy ``source``'s schedules here, deleting them there when asked.

        A key-based source of this package in the same database and slot is moved with one
        script per schedule; any other source gets add, then delete, so a crash in between
        leaves the schedule in both places rather than in neither.
        """
        delete = self._delete_schedules_after_migration
        logger.info("Migrating schedules from %s", source)
        await source.startup()
        try:
            schedules = await source.get_schedules()
            logger.info("Found %d", len(schedules))
            moving = delete and await self._shares_slot_with(source)
            for schedule in schedules:
                if moving and isinstance(source, BaseRedisScheduleSource):
                    old = [source.schedule_key(schedule.schedule_id), source.index_key]
                    await self._store(schedule, move_from=old)
                    continue
                await self.add_schedule(schedule)
                if delete:
                    await source.delete_schedule(schedule.schedule_id)
        finally:
            await source.shutdown()
        logger.info("Migration complete")

    async def _shares_slot_with(self, source: ScheduleSource) -> bool:
        """Whether one script can reach both ``source``'s keys and this source's.

        True for a key-based source of this package whose keys hash to this source's slot and
        whose connection sees the same database: a key it writes is readable here.
        """
        if not isinstance(source, BaseRedisScheduleSource):
            return False
        if source.redis_connection.is_cluster != self._conn.is_cluster:
            return False
        if self._conn.is_cluster and key_slot(source.index_key.encode()) != key_slot(
            self._index.encode()
        ):
            return False
        probe, token = keys.schedule_probe_key(source.key_base), uuid.uuid4().hex
        await source.redis_connection.execute("SET", probe, token, "PX", 60_000)
        try:
            seen = await self._conn.execute("GET", probe)
        finally:
            await source.redis_connection.execute("DEL", probe)
        return bool(seen == token.encode())


class ListRedisScheduleSource(connection.SingleNodeAttributes, BaseListRedisScheduleSource):
    """Schedules on one Redis server, in the taskiq-redis 1.2 list layout."""

    def __init__(
        self,
        url: str,
        prefix: str = "schedule",
        max_connection_pool_size: int | None = None,
        serializer: TaskiqSerializer | None = None,
        buffer_size: int = 50,
        skip_past_schedules: bool = False,
        **connection_kwargs: Any,
    ) -> None:
        super().__init__(
            connection.single_node(url, max_connection_pool_size, **connection_kwargs),
            prefix,
            serializer,
            buffer_size,
            skip_past_schedules,
        )


class ListRedisClusterScheduleSource(connection.ClusterAttributes, BaseListRedisScheduleSource):
    """Schedules on a Redis Cluster, all keys in the slot of ``{prefix}``."""

    def __init__(
        self,
        url: str,
        prefix: str = "schedule",
        max_connection_pool_size: int | None = None,
        serializer: TaskiqSerializer | None = None,
        buffer_size: int = 50,
        skip_past_schedules: bool = False,
        **connection_kwargs: Any,
    ) -> None:
        super().__init__(
            connection.cluster(url, max_connection_pool_size, **connection_kwargs),
            prefix,
            serializer,
            buffer_size,
            skip_past_schedules,
        )


class ListRedisSentinelScheduleSource(connection.SentinelAttributes, BaseListRedisScheduleSource):
    """Schedules on the primary that Redis Sentinel names, in the taskiq-redis 1.2 layout."""

    def __init__(
        self,
        sentinels: list[tuple[str, int]],
        master_name: str,
        prefix: str = "schedule",
        max_connection_pool_size: int | None = None,
        serializer: TaskiqSerializer | None = None,
        buffer_size: int = 50,
        skip_past_schedules: bool = False,
        min_other_sentinels: int = 0,
        sentinel_kwargs: Any | None = None,
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
            prefix,
            serializer,
            buffer_size,
            skip_past_schedules,
        )
