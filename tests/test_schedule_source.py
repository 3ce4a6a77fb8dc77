"""The key-based (deprecated) schedule sources on every topology, as a taskiq user sees them."""

from __future__ import annotations

import logging
import pickle
import warnings
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from taskiq import ScheduledTask
from taskiq.serializers import JSONSerializer

from taskiq_redis import (
    RedisClusterScheduleSource,
    RedisScheduleSource,
    RedisSentinelScheduleSource,
)
from taskiq_redis.schedule_source import BaseRedisScheduleSource
from tests.servers import AsyncRedisClient, Topology


def cron(schedule_id: str, **fields: Any) -> ScheduledTask:
    return ScheduledTask(
        task_name="task", labels={}, args=[1], kwargs={}, schedule_id=schedule_id, cron="* * * * *"
    ).model_copy(update=fields)


def interval(schedule_id: str, seconds: int = 5) -> ScheduledTask:
    return ScheduledTask(
        task_name="task", labels={}, args=[], kwargs={"a": 1}, schedule_id=schedule_id,
        interval=timedelta(seconds=seconds),
    )  # fmt: skip


def timed(schedule_id: str, minutes_from_now: float = 0, naive: bool = False) -> ScheduledTask:
    time = datetime.now(timezone.utc) + timedelta(minutes=minutes_from_now)
    if naive:
        time = time.replace(tzinfo=None)
    return ScheduledTask(
        task_name="task", labels={}, args=[], kwargs={}, schedule_id=schedule_id, time=time
    )


def ids(schedules: list[ScheduledTask]) -> list[str]:
    return sorted(schedule.schedule_id for schedule in schedules)


def by_id(schedules: list[ScheduledTask]) -> dict[str, ScheduledTask]:
    return {schedule.schedule_id: schedule for schedule in schedules}


def legacy_bytes(schedule: ScheduledTask) -> bytes:
    """A schedule exactly as taskiq-redis 1.2 stores it (pickle of the JSON-mode dump)."""
    return pickle.dumps(schedule.model_dump(mode="json"))


def base_of(topology: Topology, prefix: str) -> str:
    """What a source's keys start with: the prefix, wrapped in a hash tag on a cluster."""
    return topology.pick(single=prefix, cluster=f"{{{prefix}}}", sentinel=prefix)


async def keys_with(raw: AsyncRedisClient, marker: str) -> list[str]:
    """Every key that contains ``marker``, on every node."""
    return sorted([key.decode() async for key in raw.scan_iter(match=f"*{marker}*")])


Source = BaseRedisScheduleSource


@pytest.fixture
def make_source(topology: Topology, unique: str) -> Callable[..., Source]:
    def make(**options: Any) -> Source:
        options.setdefault("prefix", f"sched{unique}")
        cls = topology.pick(
            single=RedisScheduleSource,
            cluster=RedisClusterScheduleSource,
            sentinel=RedisSentinelScheduleSource,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            source: Source = cls(**topology.kwargs(), **options)
        return source

    return make


@pytest.fixture
async def source(make_source: Callable[..., Source]) -> AsyncIterator[Source]:
    started = make_source()
    await started.startup()
    yield started
    await started.shutdown()


async def test_cron_interval_and_timed_schedules_round_trip(
    source: Source, raw_redis: AsyncRedisClient, unique: str
) -> None:
    added = [cron("c"), interval("i"), timed("t", minutes_from_now=10), timed("n", naive=True)]
    for schedule in added:
        await source.add_schedule(schedule)
    assert by_id(await source.get_schedules()) == by_id(added)

    for schedule in added:
        await source.delete_schedule(schedule.schedule_id)
    assert await source.get_schedules() == []
    assert await keys_with(raw_redis, unique) == [], "delete leaves nothing behind"


async def test_add_replaces_a_schedule_with_the_same_id(source: Source) -> None:
    await source.add_schedule(cron("x"))
    await source.add_schedule(cron("x", cron="5 * * * *"))
    assert [s.cron for s in await source.get_schedules()] == ["5 * * * *"]


async def test_post_send_deletes_timed_schedules_only(source: Source) -> None:
    once, repeated = timed("once"), cron("repeated")
    await source.add_schedule(once)
    await source.add_schedule(repeated)
    await source.post_send(once)
    await source.post_send(repeated)
    assert ids(await source.get_schedules()) == ["repeated"]


async def test_schedules_stored_by_1_2_are_read(
    topology: Topology, make_source: Callable[..., Source], raw_redis: AsyncRedisClient, unique: str
) -> None:
    """1.2 stored ``prefix:schedule_id`` keys without an index; startup indexes them once."""
    prefix = f"old{unique}"
    old = [cron("c"), timed("t")]
    for schedule in old:
        await raw_redis.set(f"{prefix}:{schedule.schedule_id}", legacy_bytes(schedule))
    source = make_source(prefix=prefix)
    try:
        await source.startup()
        assert by_id(await source.get_schedules()) == by_id(old)
        await source.delete_schedule("c")
        assert ids(await source.get_schedules()) == ["t"]
        remaining = await keys_with(raw_redis, unique)
    finally:
        await source.shutdown()
    # Single node and sentinel keep 1.2's key; a cluster moved it under {prefix}.
    assert f"{base_of(topology, prefix)}:t" in remaining
    assert f"{prefix}:c" not in remaining


async def test_get_schedules_indexes_1_2_keys_without_startup(
    make_source: Callable[..., Source], raw_redis: AsyncRedisClient, unique: str
) -> None:
    await raw_redis.set(f"lazy{unique}:c", legacy_bytes(cron("c")))
    source = make_source(prefix=f"lazy{unique}")
    try:
        assert ids(await source.get_schedules()) == ["c"]
    finally:
        await source.shutdown()


async def test_schedule_deleted_behind_the_sources_back_is_forgotten(
    topology: Topology, source: Source, raw_redis: AsyncRedisClient, unique: str
) -> None:
    """A 1.2 process deletes only the key; the index entry left behind is dropped on read."""
    await source.add_schedule(cron("gone"))
    await source.add_schedule(cron("kept"))
    await raw_redis.delete(f"{base_of(topology, source.prefix)}:gone")
    assert ids(await source.get_schedules()) == ["kept"]
    await source.delete_schedule("kept")
    assert await keys_with(raw_redis, unique) == []


async def test_corrupt_schedule_is_logged_and_skipped(
    topology: Topology,
    source: Source,
    raw_redis: AsyncRedisClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await source.add_schedule(cron("good"))
    await source.add_schedule(cron("bad"))
    await raw_redis.set(f"{base_of(topology, source.prefix)}:bad", b"not a pickle")
    with caplog.at_level(logging.WARNING, "taskiq.redis_schedule_source"):
        assert ids(await source.get_schedules()) == ["good"]
    assert "Schedule bad cannot be read" in caplog.text


@pytest.mark.parametrize("topology", ["single", "sentinel"], indirect=True)
async def test_a_string_under_the_prefix_that_is_no_schedule_of_it_is_ignored(
    make_source: Callable[..., Source], raw_redis: AsyncRedisClient, unique: str
) -> None:
    """With a shared prefix, a list source's ``prefix:data:id`` is not one of this source's.

    (On a cluster the two cannot collide: this source's keys live under ``{prefix}``.)
    """
    prefix = f"shared{unique}"
    await raw_redis.set(f"{prefix}:data:x", legacy_bytes(cron("x")))
    source = make_source(prefix=prefix)
    try:
        await source.startup()
        assert await source.get_schedules() == []
    finally:
        await source.shutdown()


async def test_other_serializer_and_many_schedules(
    make_source: Callable[..., Source], unique: str
) -> None:
    source = make_source(serializer=JSONSerializer())
    try:
        for number in range(30):
            await source.add_schedule(cron(f"c{number:02}"))
        assert ids(await source.get_schedules()) == [f"c{n:02}" for n in range(30)]
    finally:
        await source.shutdown()


@pytest.mark.parametrize("topology", ["single"], indirect=True)
def test_single_node_class_warns_like_1_2(topology: Topology) -> None:
    with pytest.warns(DeprecationWarning, match="switch to ListRedisScheduleSource"):
        RedisScheduleSource(topology.url)


def test_bad_options_are_refused(topology: Topology, make_source: Callable[..., Source]) -> None:
    with pytest.raises(ValueError, match="prefix must be a non-empty string"):
        make_source(prefix="")
    if topology.name != "cluster":  # 1.2's cluster class has no buffer_size
        with pytest.raises(ValueError, match="buffer_size must be a whole number"):
            make_source(buffer_size=0)


async def test_bad_arguments_are_refused(source: Source) -> None:
    with pytest.raises(TypeError, match="expected a taskiq ScheduledTask"):
        await source.add_schedule({"cron": "* * * * *"})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="schedule_id must be a string"):
        await source.delete_schedule(5)  # type: ignore[arg-type]


async def test_a_1_2_writer_after_startup_is_found_and_warned_about(
    topology: Topology,
    source: Source,
    raw_redis: AsyncRedisClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every LEGACY_RESCAN_SECONDS get_schedules() looks for 1.2's keys again, and warns."""
    await source.add_schedule(cron("ours"))
    assert ids(await source.get_schedules()) == ["ours"]
    await raw_redis.set(f"{source.prefix}:late", legacy_bytes(cron("late")))
    assert ids(await source.get_schedules()) == ["ours"], "not scanned on every call"

    source._next_legacy_scan = 0.0  # ten minutes later
    with caplog.at_level(logging.WARNING, "taskiq.redis_schedule_source"):
        assert ids(await source.get_schedules()) == ["late", "ours"]
    assert "were written by taskiq-redis 1.2 after this source started" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, "taskiq.redis_schedule_source"):
        assert ids(await source.get_schedules()) == ["late", "ours"]
    assert "taskiq-redis 1.2" not in caplog.text, "warned once per 1.2 write"


async def test_writes_remove_the_1_2_name_too(
    topology: Topology, make_source: Callable[..., Source], raw_redis: AsyncRedisClient, unique: str
) -> None:
    """Writers upgraded before the scheduler: a 1.2 scheduler sees a deleted schedule go.

    On a cluster 1.2's ``prefix:id`` is another key than ``{prefix}:id``: a delete (and an add,
    whose data supersedes it) removes both.
    """
    prefix = f"mixed{unique}"
    await raw_redis.set(f"{prefix}:a", legacy_bytes(cron("a")))
    await raw_redis.set(f"{prefix}:b", legacy_bytes(cron("b")))
    writer = make_source(prefix=prefix)  # an API process: never started, never scans
    try:
        await writer.delete_schedule("a")
        await writer.add_schedule(cron("b", cron="5 * * * *"))
    finally:
        await writer.shutdown()
    assert await raw_redis.exists(f"{prefix}:a") == 0
    legacy_b = await raw_redis.get(f"{prefix}:b")
    if topology.name == "cluster":
        assert legacy_b is None
    else:
        assert isinstance(legacy_b, bytes)
        assert pickle.loads(legacy_b)["cron"] == "5 * * * *"
