"""The list schedule sources on every topology, as a taskiq user and the scheduler see them."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import datetime, timedelta, timezone
from functools import partial
from typing import Any

import pytest
import redis.asyncio
from taskiq import ScheduledTask, TaskiqScheduler
from taskiq.cli.scheduler.run import SchedulerLoop
from taskiq.serializers import JSONSerializer

from taskiq_redis import (
    ListQueueBroker,
    ListQueueClusterBroker,
    ListQueueSentinelBroker,
    ListRedisClusterScheduleSource,
    ListRedisScheduleSource,
    ListRedisSentinelScheduleSource,
    RedisAsyncClusterResultBackend,
    RedisAsyncResultBackend,
    RedisAsyncSentinelResultBackend,
    RedisClusterScheduleSource,
    RedisScheduleSource,
    RedisSentinelScheduleSource,
)
from taskiq_redis.list_schedule_source import BaseListRedisScheduleSource
from taskiq_redis.schedule_source import BaseRedisScheduleSource
from tests.command_counts import commands_during
from tests.servers import AsyncRedisClient, RedisServers, Topology, start_servers
from tests.test_schedule_source import (
    base_of,
    by_id,
    cron,
    ids,
    interval,
    keys_with,
    legacy_bytes,
    timed,
)
from tests.worker_process import WorkerProcess

Source = BaseListRedisScheduleSource

# A hang guard only: a broken scheduler fails the test instead of blocking the suite.
PATIENCE = 20.0


@pytest.fixture
def make_source(topology: Topology, unique: str) -> Callable[..., Source]:
    def make(**options: Any) -> Source:
        options.setdefault("prefix", f"list{unique}")
        cls = topology.pick(
            single=ListRedisScheduleSource,
            cluster=ListRedisClusterScheduleSource,
            sentinel=ListRedisSentinelScheduleSource,
        )
        source: Source = cls(**topology.kwargs(), **options)
        return source

    return make


@pytest.fixture
async def source(make_source: Callable[..., Source]) -> AsyncIterator[Source]:
    started = make_source()
    await started.startup()
    yield started
    await started.shutdown()


async def clear_of_minute_end() -> None:
    """Wait out the last seconds of a minute, so "this minute" stays this minute in a test."""
    second = datetime.now(timezone.utc).second
    if second >= 57:
        await asyncio.sleep(61 - second)


def bucket(schedule: ScheduledTask) -> str:
    """The taskiq-redis 1.2 name part of a timed schedule's bucket list."""
    assert schedule.time is not None
    return schedule.time.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M")


async def write_like_1_2(raw: AsyncRedisClient, prefix: str, schedule: ScheduledTask) -> None:
    """Store ``schedule`` exactly as taskiq-redis 1.2's ListRedisScheduleSource.add_schedule."""
    await raw.set(f"{prefix}:data:{schedule.schedule_id}", legacy_bytes(schedule))
    if schedule.cron is not None:
        await raw.rpush(f"{prefix}:cron", schedule.schedule_id)
    elif schedule.time is not None:
        await raw.rpush(f"{prefix}:time:{bucket(schedule)}", schedule.schedule_id)
    else:
        await raw.rpush(f"{prefix}:interval", schedule.schedule_id)


async def write_many_like_1_2(
    raw: AsyncRedisClient, base: str, schedules: list[ScheduledTask]
) -> None:
    """Many schedules in 1.2's layout, a few thousand commands per round trip."""
    for start in range(0, len(schedules), 5000):
        part = schedules[start : start + 5000]
        await raw.mset({f"{base}:data:{s.schedule_id}": legacy_bytes(s) for s in part})
        crons = [s.schedule_id for s in part if s.cron is not None]
        if crons:
            await raw.rpush(f"{base}:cron", *crons)


async def test_cron_interval_and_timed_schedules_round_trip(
    source: Source, raw_redis: AsyncRedisClient, unique: str
) -> None:
    await clear_of_minute_end()
    added = [
        cron("c", cron_offset="Europe/Paris"),
        interval("i"),
        timed("t"),
        timed("n", naive=True),
    ]
    for schedule in added:
        await source.add_schedule(schedule)
    assert by_id(await source.get_schedules()) == by_id(added)

    for schedule in added:
        await source.delete_schedule(schedule.schedule_id)
    assert await source.get_schedules() == []
    assert await keys_with(raw_redis, unique) == [], "delete leaves no key or index entry behind"


async def test_timed_schedules_are_due_from_their_minute_on(source: Source) -> None:
    """Past minutes stay due on every call until sent; future ones wait for their minute."""
    await clear_of_minute_end()
    for schedule in [
        timed("last_week", minutes_from_now=-7 * 24 * 60),
        timed("past", minutes_from_now=-2),
        timed("now"),
        timed("future", minutes_from_now=3),
        timed("next_year", minutes_from_now=365 * 24 * 60),
    ]:
        await source.add_schedule(schedule)
    for _ in range(2):
        assert ids(await source.get_schedules()) == ["last_week", "now", "past"]


async def test_post_send_deletes_timed_schedules_only(
    source: Source, raw_redis: AsyncRedisClient, unique: str
) -> None:
    once, repeated, every = timed("once", minutes_from_now=-1), cron("repeated"), interval("every")
    for schedule in (once, repeated, every):
        await source.add_schedule(schedule)
    for schedule in await source.get_schedules():
        await source.post_send(schedule)
    assert ids(await source.get_schedules()) == ["every", "repeated"]
    assert not [key for key in await keys_with(raw_redis, unique) if ":time:" in key]


async def test_adding_an_existing_id_moves_the_schedule(
    source: Source, raw_redis: AsyncRedisClient, unique: str
) -> None:
    """Re-adding replaces the old entry wherever it was: no duplicate, no stale bucket."""
    await clear_of_minute_end()
    later = timed("x", minutes_from_now=30)
    await source.add_schedule(later)
    await source.add_schedule(timed("x", minutes_from_now=-5))
    assert ids(await source.get_schedules()) == ["x"]
    await source.add_schedule(cron("x"))
    await source.add_schedule(cron("x", cron="7 * * * *"))
    assert [(s.schedule_id, s.cron) for s in await source.get_schedules()] == [("x", "7 * * * *")]
    assert not [key for key in await keys_with(raw_redis, unique) if ":time:" in key]


async def test_every_schedule_is_read_across_batches(
    topology: Topology, make_source: Callable[..., Source], raw_redis: AsyncRedisClient, unique: str
) -> None:
    """More schedules than one command reads: all come back once, whatever buffer_size is."""
    base = base_of(topology, f"list{unique}")
    many = [f"c{number:04}" for number in range(2100)]
    await raw_redis.mset({f"{base}:data:{i}": legacy_bytes(cron(i)) for i in many})
    await raw_redis.rpush(f"{base}:cron", *many)
    try:
        for options in ({}, {"buffer_size": 5000}):
            source = make_source(**options)
            try:
                await source.add_schedule(interval("i"))
                await source.add_schedule(timed("t", minutes_from_now=-1))
                assert ids(await source.get_schedules()) == [*many, "i", "t"]
            finally:
                await source.shutdown()
    finally:  # every later startup scans the keyspace once: do not leave 2100 keys to it
        await raw_redis.unlink(*await keys_with(raw_redis, unique))


async def test_skip_past_schedules_hands_out_this_minute_only_and_deletes_nothing(
    make_source: Callable[..., Source], raw_redis: AsyncRedisClient, unique: str
) -> None:
    """1.2.4's rule: with skip_past_schedules, every call returns this minute's timed schedules."""
    await clear_of_minute_end()
    source = make_source(skip_past_schedules=True)
    try:
        for schedule in [
            timed("missed", minutes_from_now=-3),
            timed("now"),
            timed("later", minutes_from_now=3),
            cron("c"),
            interval("i"),
        ]:
            await source.add_schedule(schedule)
        assert ids(await source.get_schedules()) == ["c", "i", "now"]
        assert ids(await source.get_schedules()) == ["c", "i", "now"], "this minute stays due"
        remaining = await keys_with(raw_redis, unique)
    finally:
        await source.shutdown()
    for schedule_id in ("missed", "now", "later"):
        assert [key for key in remaining if key.endswith(f":data:{schedule_id}")], schedule_id


@pytest.mark.parametrize("skip_past_schedules", [False, True], ids=["default", "skip_past"])
async def test_a_clock_stepping_back_loses_nothing(
    make_source: Callable[..., Source], monkeypatch: pytest.MonkeyPatch, skip_past_schedules: bool
) -> None:
    """Minutes handed out depend on the clock; what is stored never does."""
    from taskiq_redis import list_schedule_source

    start = datetime.now(timezone.utc).replace(second=30, microsecond=0)
    clock = [start]
    monkeypatch.setattr(list_schedule_source, "now", lambda: clock[0])
    at_start = timed("at_start", minutes_from_now=0).model_copy(update={"time": start})
    later = at_start.model_copy(
        update={"schedule_id": "later", "time": start + timedelta(minutes=5)}
    )
    source = make_source(skip_past_schedules=skip_past_schedules)
    try:
        await source.add_schedule(at_start)
        await source.add_schedule(later)
        assert ids(await source.get_schedules()) == ["at_start"]
        clock[0] = start + timedelta(minutes=10)  # NTP jumps ahead ...
        assert ids(await source.get_schedules()) == (
            [] if skip_past_schedules else ["at_start", "later"]
        )
        clock[0] = start  # ... and back
        assert ids(await source.get_schedules()) == ["at_start"]
        clock[0] = start + timedelta(minutes=5)
        assert "later" in ids(await source.get_schedules())
    finally:
        await source.shutdown()


async def test_post_send_leaves_a_schedule_that_was_moved_meanwhile(source: Source) -> None:
    """The scheduler sent the 12:00 run while someone moved the schedule to 13:00: 13:00 stays."""
    sent = timed("x", minutes_from_now=-1)
    await source.add_schedule(sent)
    assert ids(await source.get_schedules()) == ["x"]
    await source.add_schedule(timed("x", minutes_from_now=-30))
    await source.post_send(sent)
    assert ids(await source.get_schedules()) == ["x"]
    await source.post_send((await source.get_schedules())[0])
    assert await source.get_schedules() == []


@pytest.mark.parametrize("topology", ["single", "sentinel"], indirect=True)
async def test_schedules_stored_by_1_2_are_taken_over(
    make_source: Callable[..., Source], raw_redis: AsyncRedisClient, unique: str
) -> None:
    """1.2's lists are read at startup; their ids move into the index, the data stays put."""
    await clear_of_minute_end()
    prefix = f"list{unique}"
    old = [
        cron("c"),
        interval("i"),
        timed("past", minutes_from_now=-10),
        timed("now"),
        timed("future", minutes_from_now=10),
    ]
    for schedule in old:
        await write_like_1_2(raw_redis, prefix, schedule)
    source = make_source()
    try:
        await source.startup()
        assert by_id(await source.get_schedules()) == by_id(old[:4])
        await source.delete_schedule("past")
        await source.delete_schedule("future")
        assert ids(await source.get_schedules()) == ["c", "i", "now"]
    finally:
        await source.shutdown()
    assert await raw_redis.exists(f"{prefix}:data:past", f"{prefix}:data:future") == 0
    assert await raw_redis.get(f"{prefix}:data:c") == legacy_bytes(cron("c")), "1.2's data key"
    assert not [key for key in await keys_with(raw_redis, unique) if ":time:" in key]


@pytest.mark.parametrize("topology", ["single", "sentinel"], indirect=True)
async def test_a_1_2_process_still_running_beside_it(
    source: Source, raw_redis: AsyncRedisClient, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A 1.2 writer's adds are taken over at the next call (with a warning); its deletes hold."""
    await clear_of_minute_end()
    prefix = f"list{unique}"
    await source.add_schedule(cron("ours"))
    assert ids(await source.get_schedules()) == ["ours"]
    for schedule in (cron("c12"), interval("i12"), timed("t12"), timed("f12", minutes_from_now=5)):
        await write_like_1_2(raw_redis, prefix, schedule)
    with caplog.at_level(logging.WARNING, "taskiq.redis_schedule_source"):
        assert ids(await source.get_schedules()) == ["c12", "i12", "ours", "t12"]
    assert "taskiq-redis 1.2 added schedules" in caplog.text
    assert "c12" in caplog.text
    # 1.2's delete_schedule: GETDEL of the data, then LREM from its list.
    for schedule_id in ("ours", "c12", "t12"):
        await raw_redis.getdel(f"{prefix}:data:{schedule_id}")
    await raw_redis.lrem(f"{prefix}:cron", 0, "ours")
    assert ids(await source.get_schedules()) == ["i12"]
    assert ids(await source.get_schedules()) == ["i12"]

    # 1.2 moves one of ours to a later minute, pushing it to a bucket no call looks at.
    await source.add_schedule(timed("moved", minutes_from_now=-30))
    await write_like_1_2(raw_redis, prefix, timed("moved", minutes_from_now=30))
    assert ids(await source.get_schedules()) == ["i12"], "its data says later"
    assert ids(await source.get_schedules()) == ["i12"]
    index = f"{{{prefix}}}__schedules"
    assert [
        m
        for m in await raw_redis.zrange(index, 0, -1)
        if isinstance(m, bytes) and m.endswith(b"moved")
    ] == [f"t{bucket(timed('x', minutes_from_now=30))}moved".encode()], (
        "indexed where its data says"
    )


async def test_cluster_prefix_gets_a_hash_tag(
    topology: Topology, make_source: Callable[..., Source], raw_redis: AsyncRedisClient, unique: str
) -> None:
    for prefix, base in [
        (f"list{unique}", base_of(topology, f"list{unique}")),
        (f"{{tag{unique}}}:s", f"{{tag{unique}}}:s"),
    ]:
        source = make_source(prefix=prefix)
        try:
            await source.add_schedule(cron("c"))
            assert await raw_redis.exists(f"{base}:data:c") == 1
            index = f"{base}__schedules" if "{" in base else f"{{{base}}}__schedules"
            assert await raw_redis.zrange(index, 0, -1) == [b"cc"]
            await source.delete_schedule("c")
        finally:
            await source.shutdown()


async def test_no_schedule_is_missed_while_others_are_written(
    topology: Topology, make_source: Callable[..., Source], raw_redis: AsyncRedisClient, unique: str
) -> None:
    """3000 crons; another process re-adds, deletes and re-adds others: 100 calls, 0 misses."""
    base = base_of(topology, f"list{unique}")
    # Interleaved, in list and in name order: what the writer moves sits among what must stay.
    steady = [f"{number:04}s" for number in range(1500)]
    churned = [f"{number:04}x" for number in range(1500)]
    mixed = [schedule_id for pair in zip(steady, churned, strict=True) for schedule_id in pair]
    await write_many_like_1_2(raw_redis, base, [cron(i) for i in mixed])
    source, writer = make_source(), make_source()
    await source.startup()
    stop = asyncio.Event()
    written = [0]

    async def churn(number: int) -> None:
        while not stop.is_set():
            schedule_id = churned[number % len(churned)]
            if number % 2:
                await writer.add_schedule(cron(schedule_id, cron=f"{number % 60} * * * *"))
            else:
                await writer.delete_schedule(schedule_id)
                await writer.add_schedule(cron(schedule_id))
            number += 2
            written[0] += 1

    writers = [asyncio.create_task(churn(start)) for start in range(2)]
    try:
        misses, overlapped = 0, 0
        for _ in range(100):
            before = written[0]
            got = {schedule.schedule_id for schedule in await source.get_schedules()}
            overlapped += written[0] > before
            misses += len(set(steady) - got)
            assert len(got) <= len(steady) + len(churned)
        assert misses == 0
        assert overlapped >= 90, "the other writer wrote during (nearly) every call"
    finally:
        stop.set()
        await asyncio.gather(*writers)
        await source.shutdown()
        await writer.shutdown()
        await raw_redis.unlink(*await keys_with(raw_redis, unique))


async def test_corrupt_schedule_is_logged_and_skipped(
    topology: Topology,
    source: Source,
    raw_redis: AsyncRedisClient,
    caplog: pytest.LogCaptureFixture,
    unique: str,
) -> None:
    base = base_of(topology, f"list{unique}")
    for schedule in (cron("good"), cron("garbage"), cron("not_a_schedule"), timed("t")):
        await source.add_schedule(schedule)
    await raw_redis.set(f"{base}:data:garbage", b"\x80not a pickle")
    await raw_redis.set(f"{base}:data:not_a_schedule", legacy_bytes(cron("x"))[:-3])
    with caplog.at_level(logging.WARNING, "taskiq.redis_schedule_source"):
        assert ids(await source.get_schedules()) == ["good", "t"]
    assert "Schedule garbage cannot be read" in caplog.text
    assert "Schedule not_a_schedule cannot be read" in caplog.text


async def test_id_left_in_a_list_without_its_data_is_dropped(
    topology: Topology, source: Source, raw_redis: AsyncRedisClient, unique: str
) -> None:
    """1.2 deletes the data first and the list entry after; a crash in between leaves this."""
    base = base_of(topology, f"list{unique}")
    await source.add_schedule(cron("c"))
    await source.add_schedule(timed("t", minutes_from_now=-1))
    await raw_redis.delete(f"{base}:data:c", f"{base}:data:t")
    assert await source.get_schedules() == []
    assert await keys_with(raw_redis, unique) == []


@pytest.mark.parametrize("same_prefix", [True, False], ids=["same_prefix", "other_prefix"])
@pytest.mark.parametrize("delete", [True, False], ids=["move", "copy"])
async def test_migration_from_the_key_based_source(
    topology: Topology,
    make_source: Callable[..., Source],
    raw_redis: AsyncRedisClient,
    unique: str,
    same_prefix: bool,
    delete: bool,
) -> None:
    """Schedules move over at startup (one script per schedule when the slot is shared)."""
    prefix = f"list{unique}"
    old_prefix = prefix if same_prefix else f"old{unique}"
    cls = topology.pick(
        single=RedisScheduleSource,
        cluster=RedisClusterScheduleSource,
        sentinel=RedisSentinelScheduleSource,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old: BaseRedisScheduleSource = cls(**topology.kwargs(), prefix=old_prefix)
    schedules = [cron("c"), interval("i"), timed("t", minutes_from_now=-1)]
    for schedule in schedules:
        await old.add_schedule(schedule)

    source = make_source().with_migrate_from(old, delete_schedules=delete)
    try:
        await source.startup()
        assert by_id(await source.get_schedules()) == by_id(schedules)
    finally:
        await source.shutdown()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        again: BaseRedisScheduleSource = cls(**topology.kwargs(), prefix=old_prefix)
    try:
        left = await again.get_schedules()
    finally:
        await again.shutdown()
    assert ids(left) == ([] if delete else ids(schedules))
    old_keys = [f"{base_of(topology, old_prefix)}:{schedule.schedule_id}" for schedule in schedules]
    assert await raw_redis.exists(*old_keys) == (0 if delete else len(old_keys))


async def test_bad_arguments_are_refused(
    make_source: Callable[..., Source], source: Source
) -> None:
    with pytest.raises(ValueError, match="buffer_size must be a whole number"):
        make_source(buffer_size="50")
    with pytest.raises(ValueError, match="prefix must be a non-empty string"):
        make_source(prefix=None)
    with pytest.raises(TypeError, match="expected a taskiq ScheduledTask"):
        await source.add_schedule("* * * * *")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="schedule_id must be a string"):
        await source.delete_schedule(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="can only migrate from a ScheduleSource"):
        source.with_migrate_from("redis://")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cannot migrate from itself"):
        source.with_migrate_from(source)


async def test_other_serializer(make_source: Callable[..., Source]) -> None:
    source = make_source(serializer=JSONSerializer())
    try:
        await source.add_schedule(cron("c"))
        assert ids(await source.get_schedules()) == ["c"]
    finally:
        await source.shutdown()


async def test_scheduler_sends_a_timed_task_to_a_real_worker(
    topology: Topology, make_source: Callable[..., Source], unique: str
) -> None:
    """TaskiqScheduler -> list queue broker -> ``taskiq worker`` process -> result backend."""
    broker_cls = topology.pick(
        single=ListQueueBroker, cluster=ListQueueClusterBroker, sentinel=ListQueueSentinelBroker
    )
    backend_cls = topology.pick(
        single=RedisAsyncResultBackend,
        cluster=RedisAsyncClusterResultBackend,
        sentinel=RedisAsyncSentinelResultBackend,
    )
    broker_kwargs = {**topology.kwargs(), "queue_name": f"queue{unique}"}
    config = {
        "broker": broker_cls.__name__,
        "broker_kwargs": broker_kwargs,
        "backend": backend_cls.__name__,
        "backend_kwargs": topology.kwargs("redis_url"),
    }
    backend: Any = backend_cls(**topology.kwargs("redis_url"))
    source = make_source()
    scheduler = TaskiqScheduler(broker_cls(**broker_kwargs), [source])
    await source.startup()
    await scheduler.startup()
    await source.add_schedule(
        ScheduledTask(
            task_name="schedule_app.add",
            labels={},
            args=[2, 3],
            kwargs={},
            task_id=unique,
            time=datetime.now(timezone.utc) - timedelta(seconds=1),
        )
    )
    loop = asyncio.create_task(SchedulerLoop(scheduler).run(update_interval=timedelta(seconds=1)))
    try:
        with WorkerProcess("tests.apps.schedule_app:broker", config=config) as worker:
            deadline = asyncio.get_running_loop().time() + PATIENCE
            while not await backend.is_result_ready(unique):
                assert asyncio.get_running_loop().time() < deadline, worker.output()
                await asyncio.sleep(0.05)
        assert (await backend.get_result(unique)).return_value == 5
        while await source.get_schedules():
            assert asyncio.get_running_loop().time() < deadline, "post_send kept the schedule"
            await asyncio.sleep(0.05)
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
        await scheduler.shutdown()
        await source.shutdown()
        await backend.shutdown()


@pytest.fixture(scope="module")
def private_server() -> Iterator[RedisServers]:
    """A standalone server of this module's own, so INFO commandstats counts only our calls."""
    servers = start_servers(which=["single"])
    try:
        yield servers
    finally:
        servers.stop()


async def commands_of(
    raw: AsyncRedisClient, source: Source
) -> tuple[dict[str, int], list[ScheduledTask]]:
    """What ``source.get_schedules()`` returns and the commands Redis ran for it."""
    return await commands_during(raw, source.get_schedules())


async def add_crons(source: Source, numbers: range) -> None:
    """Many add_schedule calls, a few hundred in flight at a time."""
    for start in range(numbers.start, numbers.stop, 250):
        part = range(start, min(start + 250, numbers.stop))
        await asyncio.gather(*(source.add_schedule(cron(f"c{number}")) for number in part))


async def test_get_schedules_costs_three_commands_in_a_busy_database(
    private_server: RedisServers,
) -> None:
    """1000 cron schedules among 20,000 other keys: 3 commands (taskiq-redis 1.2.4: ~2060)."""
    raw = redis.asyncio.Redis.from_url(private_server.standalone_url)
    await raw.config_set("appendfsync", "no")  # this server is ours; thousands of writes follow
    source = ListRedisScheduleSource(private_server.standalone_url, prefix="cost")
    try:
        for part in range(0, 20_000, 5000):
            await raw.mset({f"unrelated:{n}": "x" for n in range(part, part + 5000)})
        await source.startup()
        await add_crons(source, range(1000))
        await source.get_schedules()  # connections open, scripts loaded

        spent, schedules = await commands_of(raw, source)
        assert sum(spent.values()) <= 3, spent
        assert "cmdstat_scan" not in spent
        assert len(schedules) == 1000

        # A timed schedule of a past minute is found on every call, still without SCAN.
        await source.add_schedule(timed("missed", minutes_from_now=-30))
        for _ in range(2):
            spent, schedules = await commands_of(raw, source)
            assert "missed" in ids(schedules)
            assert "cmdstat_scan" not in spent
            assert sum(spent.values()) <= 5, spent

        # 2500 schedules take two pages by default, one with a buffer_size above them.
        await add_crons(source, range(1000, 2500))
        spent, schedules = await commands_of(raw, source)
        assert (spent["cmdstat_zrange"], len(schedules)) == (2, 2501)
        wide = ListRedisScheduleSource(
            private_server.standalone_url, prefix="cost", buffer_size=3000
        )
        try:
            await wide.get_schedules()
            spent, schedules = await commands_of(raw, wide)
        finally:
            await wide.shutdown()
        assert (spent["cmdstat_zrange"], spent["cmdstat_mget"], len(schedules)) == (1, 1, 2501)
    finally:
        await source.shutdown()
        await raw.aclose()


MONITOR_ARG = re.compile(rb'"((?:[^"\\]|\\.)*)"')


async def commands_run_by(url: str, action: Callable[[], Awaitable[object]]) -> list[list[bytes]]:
    """Every command the server ran for ``action`` (script internals included), from MONITOR."""
    client = redis.asyncio.Redis.from_url(url)
    marker = uuid.uuid4().hex
    seen: list[list[bytes]] = []
    try:
        async with client.monitor() as monitor:
            assert monitor.connection is not None
            await action()
            await client.echo(marker)
            while True:
                line = await monitor.connection.read_response()
                args = MONITOR_ARG.findall(line)
                if args[:2] == [b"ECHO", marker.encode()]:
                    return seen
                seen.append(args)
    finally:
        await client.aclose()


def shape(commands: list[list[bytes]]) -> list[tuple[str, int]]:
    """Each command's name and argument count: what it touches, whatever the ids are."""
    return [(args[0].decode().upper(), len(args) - 1) for args in commands]


async def read_into(source: ListRedisScheduleSource, got: list[ScheduledTask]) -> None:
    got.extend(await source.get_schedules())


# The most schedules one read command asks for: max(buffer_size, 2000), buffer_size 50.
PAGE = 2000


def page_sizes(commands: list[list[bytes]], name: str) -> list[int]:
    """How many members each ZRANGE ... LIMIT asked for, or how many keys each MGET read."""
    sizes = []
    for args in commands:
        if args[0].upper() != name.encode():
            continue
        upper = [arg.upper() for arg in args]
        if name == "MGET":
            sizes.append(len(args) - 1)
        elif b"LIMIT" in upper:
            sizes.append(int(args[upper.index(b"LIMIT") + 2]))
        else:
            sizes.append(10**9)  # no LIMIT: unbounded
    return sizes


async def fill_like_1_2(raw: redis.asyncio.Redis, prefix: str, count: int) -> None:
    """``count`` cron schedules in 1.2's layout, 5000 per round trip."""
    for start in range(0, count, 5000):
        part = [f"bulk{number}" for number in range(start, min(start + 5000, count))]
        pipe = raw.pipeline(transaction=False)
        pipe.mset({f"{prefix}:data:{i}": legacy_bytes(cron(i)) for i in part})
        pipe.rpush(f"{prefix}:cron", *part)
        await pipe.execute()


async def test_a_write_touches_the_same_at_100k_schedules_as_at_10(
    private_server: RedisServers,
) -> None:
    """Add, replace, move, delete, post_send: the same commands on the same few elements.

    Also: reading 100k schedules returns every one of them, in pages: no command reads more
    than a page (``max(buffer_size, 2000)`` members or keys). A page's Redis time is measured in
    ``make bench``, not asserted here: a loaded machine stretches any single command.
    """
    url = private_server.standalone_url
    raw = redis.asyncio.Redis.from_url(url)
    await raw.config_set("appendfsync", "no")
    shapes: dict[int, list[list[tuple[str, int]]]] = {}
    try:
        for size in (10, 100_000):
            prefix = f"w{size}"
            await fill_like_1_2(raw, prefix, size)
            source = ListRedisScheduleSource(url, prefix=prefix)
            try:
                await source.startup()  # takes 1.2's list over, 1000 ids per call
                sent = timed("t", minutes_from_now=-1)
                writes = [
                    partial(source.add_schedule, cron("x")),
                    partial(source.add_schedule, cron("x", cron="5 * * * *")),
                    partial(source.add_schedule, sent),
                    partial(source.post_send, sent),
                    partial(source.add_schedule, interval("x")),
                    partial(source.delete_schedule, "x"),
                    partial(source.delete_schedule, "bulk3"),
                ]
                shapes[size] = [shape(await commands_run_by(url, write)) for write in writes]
                if size > 10:
                    got: list[ScheduledTask] = []
                    reads = await commands_run_by(url, partial(read_into, source, got))
                    assert len(got) == size - 1
                    assert {schedule.schedule_id for schedule in got} >= {"bulk0", "bulk99999"}
                    assert page_sizes(reads, "ZRANGE")
                    assert page_sizes(reads, "MGET")
                    too_big = [
                        (name, count)
                        for name in ("ZRANGE", "MGET")
                        for count in page_sizes(reads, name)
                        if count > PAGE
                    ]
                    assert not too_big, too_big
            finally:
                await source.shutdown()
        assert shapes[10] == shapes[100_000]
        for commands in shapes[10]:
            names = {name for name, _ in commands}
            assert not names & {"LREM", "LRANGE", "LPOS", "SCAN", "ZRANGE", "HGETALL"}, commands
            # Beside the EVALSHA: HGET, ZREM, ZADD, HSET, HDEL, SET, DEL, each of one element.
            assert all(count <= 3 for name, count in commands if name != "EVALSHA"), commands
    finally:
        await raw.flushall()
        await raw.aclose()
