"""What the dashboard reads from Redis, kept apart from the web layer so it is plain data.

Every figure of the queues view comes from :func:`taskiq_redis.queues.discover` and
:func:`taskiq_redis.queues.inspect`, the calls behind ``taskiq-redis queues``: the dashboard
shows what the command line prints, and costs Redis what one such call costs. A snapshot is
shared by every page, fragment and metrics scrape asking within :attr:`Monitor.min_age`
seconds, so ten open browser tabs cost what one does, and nothing is read while nobody looks.
The samples behind the charts are taken from those snapshots, in memory, per process.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from redis.exceptions import RedisError
from taskiq import ScheduledTask
from taskiq.abc.serializer import TaskiqSerializer
from taskiq.serializers import PickleSerializer

from taskiq_redis import keys, list_schedule_source, queues, schedule_source, scripts
from taskiq_redis.connection import RedisConnection
from taskiq_redis.dashboard import detail
from taskiq_redis.dashboard.detail import PAGE_ENTRIES, QueueDetail
from taskiq_redis.dead_letters import dead_letters
from taskiq_redis.exceptions import TaskIQRedisError

logger = logging.getLogger("taskiq.redis_dashboard")

# What one failed read of Redis can raise: the server is down, refuses, or holds odd data.
READ_ERRORS: tuple[type[BaseException], ...] = (RedisError, TaskIQRedisError, OSError)
# How long the charts reach back (seconds), and the most samples kept per queue.
HISTORY_SECONDS = 600.0
HISTORY_SAMPLES = 600
# Queue pages kept for the refresh interval (one per queue being looked at).
KEPT_DETAILS = 64
# How far ahead a cron schedule's next run is looked for, minute by minute.
CRON_HORIZON = timedelta(days=8)


def describe_error(error: BaseException) -> str:
    """One line for a banner: the class, for errors whose text alone says little."""
    text = str(error) or repr(error)
    return f"{type(error).__name__}: {text}"


@dataclass(frozen=True)
class Sample:
    """One snapshot of one queue: when, how long it was, and how many entries it ever got.

    ``added`` is the stream's count of every entry ever added (a group's entries read plus
    its lag), or None where Redis does not tell (a list, a stream without a group).
    """

    at: float
    length: int
    added: int | None


@dataclass
class Overview:
    """Every queue, as ``taskiq-redis queues`` sees it, or why Redis could not be read."""

    views: list[queues.QueueView] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    scan_complete: bool | None = None
    error: str | None = None  # Redis could not be read: the views are the last ones read
    taken_at: float = 0.0  # time.time() of the views


@dataclass(frozen=True)
class ScheduleRow:
    """A stored schedule and when it runs next (None: the scheduler alone knows)."""

    source: str
    schedule: ScheduledTask
    next_run: datetime | None
    note: str = ""


@dataclass(frozen=True)
class NodeScripts:
    """Which of this package's scripts one primary knows (None: could not ask)."""

    node: str
    loaded: list[bool] | None
    error: str | None = None


def added_total(view: queues.QueueView) -> int | None:
    """Every entry ever added to a stream queue: read plus unread, by its busiest group."""
    counts = [
        group.entries_read + group.lag
        for group in view.groups
        if group.entries_read is not None and group.lag is not None
    ]
    return max(counts) if counts else None


def rates(samples: Sequence[Sample]) -> list[tuple[float, float]]:
    """Messages added per second between consecutive samples, as (time, rate).

    Where Redis counts additions (a stream with a group) the rate is exact; elsewhere it is
    the growth of the length, never below zero: what consumers took meanwhile is not seen.
    """
    points = []
    for before, after in itertools.pairwise(samples):
        seconds = after.at - before.at
        if seconds <= 0:
            continue
        if before.added is not None and after.added is not None:
            grown = after.added - before.added
        else:
            grown = after.length - before.length
        points.append((after.at, max(0, grown) / seconds))
    return points


class Monitor:
    """Reads Redis for the dashboard; one per dashboard, shared by all its requests.

    ``connect`` makes the connection, on the first request (a dashboard mounted in another
    application gets no startup event of its own) and again after it failed, so a dashboard
    started while Redis is down starts working when Redis is back.
    """

    def __init__(
        self,
        connect: Callable[[], Awaitable[RedisConnection]],
        queue_names: Sequence[str] = (),
        scan_limit: int = queues.DEFAULT_SCAN_LIMIT,
        max_priority: int = queues.ALL_LEVELS,
        schedule_prefix: str = "schedule",
        schedule_serializer: TaskiqSerializer | None = None,
        min_age: float = 2.0,
        owns_connection: bool = True,
    ) -> None:
        self.connect = connect
        self.queue_names = list(queue_names)
        self.scan_limit = scan_limit
        self.max_priority = max_priority
        self.schedule_prefix = schedule_prefix
        self.schedule_serializer = schedule_serializer or PickleSerializer()
        self.min_age = min_age
        self.owns_connection = owns_connection
        self.history: dict[str, deque[Sample]] = {}
        self.last = Overview()
        self.conn: RedisConnection | None = None
        self.connect_lock = asyncio.Lock()
        self.snapshot_lock = asyncio.Lock()
        self.fresh_until = 0.0
        self.details: OrderedDict[str, tuple[float, QueueDetail]] = OrderedDict()

    async def connection(self) -> RedisConnection:
        """The connection, made on first use (see the class)."""
        async with self.connect_lock:
            if self.conn is None:
                self.conn = await self.connect()
            return self.conn

    async def close(self) -> None:
        """Close the connection this monitor made (not one it was handed)."""
        conn, self.conn = self.conn, None
        if conn is not None and self.owns_connection:
            await conn.close()

    def invalidate(self) -> None:
        """The next overview and queue pages read Redis again (after an action changed what
        they show)."""
        self.fresh_until = 0.0
        self.details.clear()

    async def overview(self) -> Overview:
        """Every queue: the last snapshot if it is younger than ``min_age``, else a new one.

        When Redis cannot be read the last views are kept and ``error`` says why; the next call
        tries again, so the page recovers by itself when Redis is back.
        """
        async with self.snapshot_lock:
            if time.monotonic() < self.fresh_until:
                return self.last
            try:
                overview = await self.read_overview()
            except READ_ERRORS as error:
                logger.debug("Reading the queues failed: %s", describe_error(error))
                self.last = Overview(
                    self.last.views,
                    self.last.problems,
                    self.last.scan_complete,
                    describe_error(error),
                    self.last.taken_at,
                )
            else:
                self.last = overview
                self.record(overview)
            self.fresh_until = time.monotonic() + self.min_age
            return self.last

    async def read_overview(self) -> Overview:
        """What ``taskiq-redis queues`` prints, as data (the same calls, the same rules)."""
        conn = await self.connection()
        found = await queues.survey(
            conn, list(self.queue_names), self.scan_limit, self.max_priority
        )
        problems = found.problems
        if found.complete is False:
            problems.insert(
                0,
                "the scan stopped at the scan limit on some primary; the list may miss "
                "queues (name them, or raise --scan-limit)",
            )
        return Overview(found.views, problems, found.complete, None, time.time())

    def record(self, overview: Overview) -> None:
        """Add a sample per queue; forget samples older than the charts reach."""
        now = time.time()
        seen = set()
        for view in overview.views:
            seen.add(view.name)
            samples = self.history.setdefault(view.name, deque(maxlen=HISTORY_SAMPLES))
            samples.append(Sample(now, view.length or 0, added_total(view)))
            while samples and samples[0].at < now - HISTORY_SECONDS:
                samples.popleft()
        for name in list(self.history):
            if name not in seen:
                del self.history[name]

    async def queue(self, name: str) -> QueueDetail:
        """One queue's figures, its pending and waiting entries at every level, delayed
        messages and dead letters; shared, like the overview, for ``min_age`` seconds by every
        page and refresh of that queue (a failed read is not kept)."""
        kept = self.details.get(name)
        if kept is not None and time.monotonic() < kept[0]:
            return kept[1]
        conn = await self.connection()
        view = await queues.inspect(conn, name, max_priority=self.max_priority)
        pending, waiting = await detail.entries(conn, view)
        delayed = await detail.delayed(conn, name)
        letters = await dead_letters(conn, name, PAGE_ENTRIES) if view.dead_letters else []
        found = QueueDetail(view, pending, waiting, delayed, letters)
        self.details[name] = (time.monotonic() + self.min_age, found)
        self.details.move_to_end(name)
        while len(self.details) > KEPT_DETAILS:
            self.details.popitem(last=False)
        return found

    async def schedules(self) -> list[ScheduleRow]:
        """Every schedule the list-based and key-based sources hold under the prefix.

        Read-only: the sources' own ``get_schedules()`` also writes (it takes over what
        taskiq-redis 1.2 wrote, prunes, and the list source hands out only what is due), so
        the dashboard reads their indexes with the same keys and decoding instead.
        """
        conn = await self.connection()
        base = keys.schedule_base(self.schedule_prefix, conn.is_cluster)
        listed = await self.index(conn, keys.beside(base, list_schedule_source.INDEX_SUFFIX))
        list_ids = [list_schedule_source.split_member(member.encode())[1] for member in listed]
        key_ids = await self.index(conn, keys.schedule_index_key(base))
        rows: list[ScheduleRow] = []
        for source, ids, key_of in (
            ("list", list_ids, lambda i: keys.schedule_data_key(base, i)),
            ("key", key_ids, lambda i: keys.schedule_key(base, i)),
        ):
            found, _ = await schedule_source.read_schedules(
                conn,
                self.schedule_serializer,
                ids,
                key_of,
                schedule_source.MIN_READ_BATCH,
            )
            for schedule_id, schedule in found.items():
                if schedule.schedule_id != schedule_id:
                    continue  # another source's data under the same prefix
                rows.append(ScheduleRow(source, schedule, *next_run(schedule)))
        return rows

    async def index(self, conn: RedisConnection, key: str) -> list[str]:
        """Every member of a schedule index, page by page (as the sources read them)."""
        members: list[str] = []
        start: str | bytes = "-"
        batch = schedule_source.MIN_READ_BATCH
        while True:
            page = await conn.execute("ZRANGE", key, start, "+", "BYLEX", "LIMIT", 0, batch)
            members += [queues.as_text(member) for member in page]
            if len(page) < batch:
                return members
            start = b"(" + page[-1]

    async def scripts(self) -> list[NodeScripts]:
        """Which scripts each primary knows: SCRIPT EXISTS per node, as ``scripts check``."""
        conn = await self.connection()
        known = list(scripts.all_scripts().values())
        if not conn.is_cluster:
            return [NodeScripts(await self.node_name(conn), await scripts.loaded(conn, known))]
        client: Any = conn.client
        await client.initialize()
        found = []
        for node in client.get_primaries():
            try:
                answer = await client.execute_command(
                    "SCRIPT EXISTS", *(script.sha1 for script in known), target_nodes=node
                )
            except READ_ERRORS as error:
                found.append(NodeScripts(node.name, None, describe_error(error)))
                continue
            if isinstance(answer, dict):
                answer = next(iter(answer.values()))
            found.append(NodeScripts(node.name, [bool(flag) for flag in answer]))
        return sorted(found, key=lambda node: node.node)

    async def node_name(self, conn: RedisConnection) -> str:
        """host:port of the one primary of a single node or sentinel connection."""
        if conn.sentinel is not None and conn.master_name is not None:
            host, port = await conn.sentinel.discover_master(conn.master_name)
            return f"{host}:{port} (primary of {conn.master_name})"
        kwargs = conn.pool.connection_kwargs if conn.pool is not None else {}
        if "path" in kwargs:
            return str(kwargs["path"])
        return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"


def next_run(schedule: ScheduledTask) -> tuple[datetime | None, str]:
    """When a schedule runs next, and a note where that cannot be told."""
    if schedule.time is not None:
        at = schedule.time
        return (at if at.tzinfo else at.replace(tzinfo=timezone.utc)), ""
    if schedule.cron is not None:
        try:
            return next_cron(schedule.cron, schedule.cron_offset), ""
        except (ValueError, ZoneInfoNotFoundError) as error:
            return None, f"cannot read the cron: {error}"
    return None, "interval: the scheduler counts from its own start"


def next_cron(cron: str, offset: str | timedelta | None) -> datetime | None:
    """The next minute from now (UTC) that ``cron`` matches, as taskiq's scheduler reads it
    (``cron_offset``: a time zone name, or a delta added to UTC); None beyond
    :data:`CRON_HORIZON`."""
    import pycron  # type: ignore[import-untyped]  # taskiq's dependency: its scheduler's matcher

    start = datetime.now(timezone.utc).replace(second=0, microsecond=0) + timedelta(minutes=1)
    for minutes in range(int(CRON_HORIZON.total_seconds() // 60)):
        at = start + timedelta(minutes=minutes)
        local = at
        if isinstance(offset, timedelta):
            local = at + offset
        elif offset:
            local = at.astimezone(ZoneInfo(offset))
        if pycron.is_now(cron, local):
            return at
    return None
