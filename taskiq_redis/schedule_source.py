"""The key-based schedule source of taskiq-redis 1.2 (deprecated), and what both sources share.

Each schedule is one key, ``prefix:schedule_id``, as in taskiq-redis 1.2. 1.2 found them by
scanning the whole keyspace on every ``get_schedules()``, which costs thousands of commands in a
busy database; here every add and delete also maintains an index (a sorted set beside the
prefix), so reading 1000 schedules is two commands. Schedules that taskiq-redis 1.2 wrote are
not in the index: ``startup()`` (or the first ``get_schedules()``) scans for them, and so does
a ``get_schedules()`` every ten minutes, which also warns that a 1.2 process is still writing.

On a cluster the keys live under ``{prefix}`` so a schedule and its index entry share a slot;
1.2's ``prefix:schedule_id`` keys found there are moved under it. A 1.2 process deleting a
schedule afterwards deletes the old name and is not seen, so on a cluster the processes that add
or delete schedules are upgraded before the scheduler; every add and delete here also removes
1.2's name, so a 1.2 scheduler still running does not keep a deleted schedule either.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime, timezone
from typing import Any

from taskiq import ScheduledTask, ScheduleSource
from taskiq.abc.serializer import TaskiqSerializer
from taskiq.serializers import PickleSerializer

from taskiq_redis import connection, keys, scripts

logger = logging.getLogger("taskiq.redis_schedule_source")

KEY_WRITE = "schedule_key_write"

# No Redis command of get_schedules() reads more than this many schedules, unless buffer_size
# asks for more: large enough that a scheduler with a thousand schedules reads them in one
# command, small enough that no command keeps Redis busy for long.
MIN_READ_BATCH = 2000

SCAN_COUNT = 1000

# How often get_schedules() looks for keys a taskiq-redis 1.2 process wrote since (seconds).
LEGACY_RESCAN_SECONDS = 600.0


def read_batch(prefix: object, buffer_size: object) -> int:
    """Check the options every source shares and return how many schedules one command reads."""
    if not isinstance(prefix, str) or not prefix:
        raise ValueError(f"prefix must be a non-empty string, got {prefix!r}")
    if isinstance(buffer_size, bool) or not isinstance(buffer_size, int) or buffer_size < 1:
        raise ValueError(f"buffer_size must be a whole number of at least 1, got {buffer_size!r}")
    return max(buffer_size, MIN_READ_BATCH)


def check_schedule(schedule: object) -> ScheduledTask:
    """Refuse anything but a ``ScheduledTask`` before it is serialized into Redis."""
    if not isinstance(schedule, ScheduledTask):
        raise TypeError(f"expected a taskiq ScheduledTask, got {type(schedule).__name__}")
    return schedule


def check_schedule_id(schedule_id: object) -> str:
    """Refuse an id that could not have been stored (keys are built from it)."""
    if not isinstance(schedule_id, str):
        raise TypeError(f"schedule_id must be a string, got {type(schedule_id).__name__}")
    return schedule_id


def minute_of(time: datetime) -> int:
    """The start of ``time``'s minute in unix seconds; a naive time is taken as UTC."""
    if time.tzinfo is None:
        time = time.replace(tzinfo=timezone.utc)
    return int(time.timestamp()) // 60 * 60


def chunks(items: Sequence[str], size: int) -> list[Sequence[str]]:
    """``items`` cut into runs of at most ``size``, so every command stays bounded."""
    return [items[start : start + size] for start in range(0, len(items), size)]


def text(value: bytes | str) -> str:
    """A key or id as Redis returned it (bytes) as text."""
    return value.decode() if isinstance(value, bytes) else value


async def scan_keys(
    conn: connection.RedisConnection, pattern: str, kind: str
) -> AsyncIterator[str]:
    """Every key of type ``kind`` matching ``pattern``, on every primary of a cluster.

    Only used once per startup, to index what taskiq-redis 1.2 wrote without an index.
    """
    async for key in conn.client.scan_iter(match=pattern, count=SCAN_COUNT, _type=kind):
        yield text(key)


async def read_schedules(
    conn: connection.RedisConnection,
    serializer: TaskiqSerializer,
    ids: Sequence[str],
    data_key: Callable[[str], str],
    batch: int,
) -> tuple[dict[str, ScheduledTask], list[str]]:
    """Read and decode the schedules stored for ``ids``, ``batch`` keys per MGET.

    Returns the schedules by id, and the ids whose data key no longer exists. A stored value
    that cannot be decoded is logged with its id and left out: one bad schedule must not stop
    the scheduler from sending all the others.
    """
    found: dict[str, ScheduledTask] = {}
    missing: list[str] = []
    for part in chunks(ids, batch):
        values = await conn.execute("MGET", *(data_key(schedule_id) for schedule_id in part))
        for schedule_id, raw in zip(part, values, strict=True):
            if raw is None:
                missing.append(schedule_id)
                continue
            try:
                found[schedule_id] = ScheduledTask.model_validate(serializer.loadb(raw))
            except Exception as error:  # any decoding failure means the same
                logger.warning(
                    "Schedule %s cannot be read and is skipped: %s: %s",
                    schedule_id,
                    type(error).__name__,
                    error,
                )
    return found, missing


class BaseRedisScheduleSource(connection.HasConnection, ScheduleSource):
    """The key-based source; the public classes below only choose how to reach Redis."""

    def __init__(
        self,
        conn: connection.RedisConnection,
        prefix: str = "schedule",
        buffer_size: int = 50,
        serializer: TaskiqSerializer | None = None,
    ) -> None:
        self._batch = read_batch(prefix, buffer_size)
        self._conn = conn
        self.prefix = prefix
        self.buffer_size = buffer_size
        self.serializer = serializer or PickleSerializer()
        self.key_base = keys.schedule_base(prefix, conn.is_cluster)
        self.index_key = keys.schedule_index_key(self.key_base)
        self._indexed = False
        self._next_legacy_scan = 0.0

    def schedule_key(self, schedule_id: str) -> str:
        """The key that holds the schedule ``schedule_id``."""
        return keys.schedule_key(self.key_base, schedule_id)

    def _legacy_key(self, schedule_id: str) -> str | None:
        """taskiq-redis 1.2's name for a schedule where it differs from ours (a cluster)."""
        legacy = f"{self.prefix}:{schedule_id}"
        return None if legacy == self.schedule_key(schedule_id) else legacy

    async def startup(self) -> None:
        """Load the script and index the schedules taskiq-redis 1.2 wrote."""
        await super().startup()
        await scripts.load(self._conn, [scripts.get(KEY_WRITE)])
        await self._index_legacy()

    async def shutdown(self) -> None:
        """Close the connections."""
        await self._conn.close()
        await super().shutdown()

    async def _write(self, schedule_id: str, action: str, payload: bytes = b"") -> None:
        await scripts.run(
            self._conn,
            scripts.get(KEY_WRITE),
            [self.schedule_key(schedule_id), self.index_key],
            [schedule_id, action, payload],
        )
        legacy = self._legacy_key(schedule_id)
        if legacy is not None and action != "prune":
            # Another slot, so not in the script: a 1.2 copy must not outlive this write.
            await self._conn.execute("DEL", legacy)

    async def add_schedule(self, schedule: ScheduledTask) -> None:
        """Store a schedule (replacing one with the same id) and its index entry."""
        schedule = check_schedule(schedule)
        payload = self.serializer.dumpb(schedule.model_dump(mode="json"))
        await self._write(schedule.schedule_id, "set", payload)

    async def delete_schedule(self, schedule_id: str) -> None:
        """Remove a schedule and its index entry; an unknown id is not an error."""
        await self._write(check_schedule_id(schedule_id), "delete")

    async def post_send(self, task: ScheduledTask) -> None:
        """A one-off timed schedule is deleted once it was sent."""
        if task.time is not None:
            await self.delete_schedule(task.schedule_id)

    async def _index_legacy(self) -> int:
        """Index every ``prefix:schedule_id`` key taskiq-redis 1.2 wrote; how many were new.

        Where 1.2's key is the key this source uses (single node, sentinel, a prefix with a
        hash tag) it is only indexed; elsewhere (a cluster) it is copied under ``{prefix}``
        first and deleted after, so a crash half way loses nothing. A 1.2 key found there is
        newer than ours: every write here deletes 1.2's name.
        """
        pattern = keys.glob_escape(self.prefix) + ":*"
        in_place: list[str] = []
        found = 0
        async for key in scan_keys(self._conn, pattern, "string"):
            schedule_id = key[len(self.prefix) + 1 :]
            if key == self.schedule_key(schedule_id):
                in_place.append(schedule_id)
                continue
            payload = await self._conn.execute("GET", key)
            if payload is not None:
                await self._write(schedule_id, "set", payload)
                found += 1
        for part in chunks(in_place, SCAN_COUNT):
            found += await self._conn.execute("ZADD", self.index_key, "NX", *_scored(part))
        self._indexed = True
        self._next_legacy_scan = time.monotonic() + LEGACY_RESCAN_SECONDS
        return found

    async def _rescan_legacy(self) -> None:
        """Index what a taskiq-redis 1.2 process wrote since the last scan, and say so."""
        found = await self._index_legacy()
        if found:
            logger.warning(
                "%d schedules under prefix %s were written by taskiq-redis 1.2 after this source "
                "started; they are indexed now. Upgrade every process that adds or deletes "
                "schedules: %s",
                found,
                self.prefix,
                "on a cluster 1.2's deletes are not seen here"
                if self._conn.is_cluster
                else "their schedules are seen here only every few minutes",
            )

    async def _schedule_ids(self) -> list[str]:
        """Every indexed id, page by page in id order, so concurrent writes skip no one."""
        ids: list[str] = []
        start = b"-"
        while True:
            page = await self._conn.execute(
                "ZRANGE", self.index_key, start, "+", "BYLEX", "LIMIT", 0, self._batch
            )
            ids += [text(member) for member in page]
            if len(page) < self._batch:
                return ids
            start = b"(" + page[-1]

    async def get_schedules(self) -> list[ScheduledTask]:
        """Every schedule of the source: one index read and one MGET per batch."""
        if not self._indexed:
            await self._index_legacy()
        elif time.monotonic() >= self._next_legacy_scan:
            await self._rescan_legacy()
        found, missing = await read_schedules(
            self._conn, self.serializer, await self._schedule_ids(), self.schedule_key, self._batch
        )
        for schedule_id in missing:
            await self._write(schedule_id, "prune")
        schedules = []
        for schedule_id, schedule in found.items():
            if schedule.schedule_id == schedule_id:
                schedules.append(schedule)
            else:
                # A string under the prefix that is not one of this source's schedules, e.g. a
                # list source's ``prefix:data:id`` when both use the same prefix.
                logger.debug(
                    "Key %s is not a schedule of this source", self.schedule_key(schedule_id)
                )
                await self._conn.execute("ZREM", self.index_key, schedule_id)
        return schedules


def _scored(ids: Sequence[str]) -> list[int | str]:
    """ZADD arguments giving every id the score 0, so the index is ordered by id."""
    return [item for schedule_id in ids for item in (0, schedule_id)]


class RedisScheduleSource(connection.SingleNodeAttributes, BaseRedisScheduleSource):
    """Schedules on one Redis server, one key each (deprecated: use ListRedisScheduleSource)."""

    def __init__(
        self,
        url: str,
        prefix: str = "schedule",
        buffer_size: int = 50,
        max_connection_pool_size: int | None = None,
        serializer: TaskiqSerializer | None = None,
        **connection_kwargs: Any,
    ) -> None:
        warnings.warn(
            "RedisScheduleSource is deprecated. Please switch to ListRedisScheduleSource",
            DeprecationWarning,
            stacklevel=2,
        )
        super().__init__(
            connection.single_node(url, max_connection_pool_size, **connection_kwargs),
            prefix,
            buffer_size,
            serializer,
        )


class RedisClusterScheduleSource(connection.ClusterAttributes, BaseRedisScheduleSource):
    """Schedules on a Redis Cluster, one key each, all in the slot of ``{prefix}``."""

    def __init__(
        self,
        url: str,
        prefix: str = "schedule",
        serializer: TaskiqSerializer | None = None,
        **connection_kwargs: Any,
    ) -> None:
        super().__init__(
            connection.cluster(url, **connection_kwargs), prefix, serializer=serializer
        )


class RedisSentinelScheduleSource(connection.SentinelAttributes, BaseRedisScheduleSource):
    """Schedules on the primary that Redis Sentinel names, one key each."""

    def __init__(
        self,
        sentinels: list[tuple[str, int]],
        master_name: str,
        prefix: str = "schedule",
        buffer_size: int = 50,
        serializer: TaskiqSerializer | None = None,
        min_other_sentinels: int = 0,
        sentinel_kwargs: Any | None = None,
        **connection_kwargs: Any,
    ) -> None:
        super().__init__(
            connection.sentinel(
                sentinels, master_name, min_other_sentinels, sentinel_kwargs, **connection_kwargs
            ),
            prefix,
            buffer_size,
            serializer,
        )
