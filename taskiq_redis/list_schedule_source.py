"""Schedule sources that keep ids in lists: one implementation, three topologies.

Keys (``base`` is the prefix, or ``{prefix}`` on a cluster so one script can reach them all):

- ``base:data:<id>``: the serialized schedule (taskiq-redis 1.2 name)
- ``base:cron``, ``base:interval``: lists of cron and interval schedule ids (1.2 names)
- ``base:time:<YYYY-MM-DDTHH:MM>``: a list of the timed schedule ids due in that UTC minute
  (1.2 names, still written so taskiq-redis 1.2 can read what this package stores)
- ``base__time_index`` (``{prefix}__time_index``): added here, every timed schedule id scored by
  its bucket minute, so the timed schedules due now or in any past minute are one range read,
  on every call, without scanning the keyspace as 1.2 did.

Writing a schedule, deleting one and fetching what is due are Lua scripts
(``schedule_write``, ``schedule_fetch``). Timed schedules that taskiq-redis 1.2 wrote are not
in the index: ``startup()`` (or the first ``get_schedules()``) scans for their bucket lists
once and indexes them.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any, TypeVar

from redis.crc import key_slot
from taskiq import ScheduledTask, ScheduleSource
from taskiq.abc.serializer import TaskiqSerializer
from taskiq.serializers import PickleSerializer

from taskiq_redis import connection, keys, scripts
from taskiq_redis.exceptions import TaskIQRedisError
from taskiq_redis.schedule_source import (
    SCAN_COUNT,
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
FETCH = "schedule_fetch"

# A write is retried when the schedule sat in a time bucket the caller did not know of; only a
# concurrent writer moving it again and again can use them all up.
WRITE_ATTEMPTS = 4

_Source = TypeVar("_Source", bound="BaseListRedisScheduleSource")


class ScheduleMovedError(TaskIQRedisError):
    """A schedule kept changing its time while it was being written."""

    __template__ = (
        "schedule {schedule_id} was moved to another time by someone else on every attempt to "
        "write it; try again"
    )
    schedule_id: str


def bucket_name(minute: int) -> str:
    """The UTC minute a time bucket list is named after, in taskiq-redis 1.2's format."""
    return datetime.fromtimestamp(minute, timezone.utc).strftime(keys.TIME_BUCKET_FORMAT)


def bucket_minute(name: str) -> int | None:
    """The minute (unix seconds) of a bucket list's name, or None if it is not one."""
    try:
        parsed = datetime.strptime(name, keys.TIME_BUCKET_FORMAT)
    except ValueError:
        return None
    return minute_of(parsed)


def kind_of(schedule: ScheduledTask) -> tuple[str, int | None]:
    """Which list a schedule goes to, taskiq-redis 1.2's order: cron, then time, then interval."""
    if schedule.cron is not None:
        return "cron", None
    if schedule.time is not None:
        return "time", minute_of(schedule.time)
    if schedule.interval:
        return "interval", None
    raise ValueError(f"schedule {schedule.schedule_id} has no cron, time or interval")


class BaseListRedisScheduleSource(ScheduleSource):
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
        self._cron = keys.schedule_cron_key(self._base)
        self._interval = keys.schedule_interval_key(self._base)
        self._time_index = keys.schedule_time_index_key(self._base)
        self._indexed = False
        # With skip_past_schedules, timed schedules of minutes before this one are dropped: the
        # minute of the first fetch, then that of the previous fetch, so a schedule added between
        # two fetches for a minute in between is still sent.
        self._skip_before: int | None = None
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
        """Load the scripts, index timed schedules taskiq-redis 1.2 wrote, then migrate."""
        await super().startup()
        await scripts.load(self._conn, [scripts.get(WRITE), scripts.get(FETCH)])
        await self._index_legacy()
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
        payload: bytes = b"",
        minute: int | None = None,
        hint: int | None = None,
        move_from: Sequence[str] = (),
    ) -> None:
        """Run the write script, naming the buckets the schedule is in or goes to.

        ``minute`` is the bucket a timed schedule is stored in, ``hint`` the bucket it is
        believed to be in now; a bucket the script reports that neither named is added and the
        call repeated.
        """
        minutes = list(dict.fromkeys(m for m in (minute, hint) if m is not None))
        for _ in range(WRITE_ATTEMPTS):
            fixed = [self._data_key(schedule_id), self._cron, self._interval, self._time_index]
            buckets = [self._bucket(m) for m in minutes]
            stored_at: int | str = "" if minute is None else minute
            args: list[bytes | str | int] = [schedule_id, action, payload, stored_at]
            args += [len(minutes), *minutes]
            moved = await scripts.run(
                self._conn,
                scripts.get(WRITE),
                [*fixed, *buckets, *move_from],
                args,
            )
            if moved is None:
                return
            minutes.append(int(float(moved)))
        raise ScheduleMovedError(schedule_id=schedule_id)

    async def _store(self, schedule: ScheduledTask, move_from: Sequence[str] = ()) -> None:
        schedule = check_schedule(schedule)
        kind, minute = kind_of(schedule)
        payload = self._serializer.dumpb(schedule.model_dump(mode="json"))
        await self._write(schedule.schedule_id, kind, payload, minute, move_from=move_from)

    async def add_schedule(self, schedule: ScheduledTask) -> None:
        """Store a schedule and its list entry, replacing one with the same id wherever it was."""
        await self._store(schedule)

    async def delete_schedule(self, schedule_id: str) -> None:
        """Remove a schedule and its list entry; an unknown id is not an error."""
        await self._write(check_schedule_id(schedule_id), "delete")

    async def post_send(self, task: ScheduledTask) -> None:
        """A one-off timed schedule is deleted once it was sent."""
        if task.time is not None:
            await self._write(task.schedule_id, "delete", hint=minute_of(task.time))

    async def _index_legacy(self) -> None:
        """Index the timed schedules in bucket lists that taskiq-redis 1.2 wrote."""
        bucket_prefix = keys.schedule_time_prefix(self._base)
        pattern = keys.glob_escape(bucket_prefix) + "*"
        async for key in scan_keys(self._conn, pattern, "list"):
            minute = bucket_minute(key[len(bucket_prefix) :])
            if minute is None:
                logger.debug("List %s is not a time bucket; left alone", key)
                continue
            start = 0
            while True:
                ids = await self._conn.execute("LRANGE", key, start, start + SCAN_COUNT - 1)
                if ids:
                    scored = [item for schedule_id in ids for item in (minute, schedule_id)]
                    await self._conn.execute("ZADD", self._time_index, "NX", *scored)
                if len(ids) < SCAN_COUNT:
                    break
                start += SCAN_COUNT
        self._indexed = True

    async def _due_ids(self, now: int) -> tuple[list[str], dict[str, int]]:
        """Cron and interval ids, and due timed ids with their minutes, page by page."""
        listed: list[str] = []
        timed: dict[str, int] = {}
        position, offset = 1, 0
        while True:
            position, offset, ids, pairs = await scripts.run(
                self._conn,
                scripts.get(FETCH),
                [self._cron, self._interval, self._time_index],
                [position, offset, self._batch, now],
            )
            listed += [text(schedule_id) for schedule_id in ids]
            for index in range(0, len(pairs), 2):
                timed[text(pairs[index])] = int(float(pairs[index + 1]))
            if position == 0:
                return listed, timed

    async def get_schedules(self) -> list[ScheduledTask]:
        """Every cron and interval schedule, and every timed one whose minute has come.

        With 1000 schedules and nothing past due this is five Redis commands: the fetch script
        (which runs LRANGE, LRANGE and ZRANGE) and one MGET.
        """
        if not self._indexed:
            await self._index_legacy()
        now = minute_of(datetime.now(timezone.utc))
        listed, timed = await self._due_ids(now)
        if self._skip_past_schedules:
            skip_before = now if self._skip_before is None else self._skip_before
            past = {i: minute for i, minute in timed.items() if minute < skip_before}
            for schedule_id, minute in past.items():
                await self._write(schedule_id, "delete", hint=minute)
            if past:
                logger.info("Removed %d timed schedules of past minutes", len(past))
            timed = {i: minute for i, minute in timed.items() if i not in past}
            self._skip_before = now
        found, missing = await read_schedules(
            self._conn,
            self._serializer,
            list(dict.fromkeys([*listed, *timed])),
            self._data_key,
            self._batch,
        )
        for schedule_id in missing:
            # An id whose schedule was deleted by a writer that removes the data first (1.2).
            await self._write(schedule_id, "prune", hint=timed.get(schedule_id))
        return list(found.values())

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
                    old = [source._key(schedule.schedule_id), source._index]
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
        if source._conn.is_cluster != self._conn.is_cluster:
            return False
        if self._conn.is_cluster and key_slot(source._index.encode()) != key_slot(
            self._time_index.encode()
        ):
            return False
        probe, token = keys.schedule_probe_key(source._base), uuid.uuid4().hex
        await source._conn.execute("SET", probe, token, "PX", 60_000)
        try:
            seen = await self._conn.execute("GET", probe)
        finally:
            await source._conn.execute("DEL", probe)
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
