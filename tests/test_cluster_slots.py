"""Every Lua script, called by the package's own objects on the cluster, stays in one slot.

A script whose keys span slots fails on a cluster with CROSSSLOT, so the keys each object
passes are recorded and their slots compared; the list of scripts exercised must be complete,
so a new script cannot skip this check.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Sequence
from typing import Any

import pytest
from redis.crc import key_slot
from taskiq import AsyncBroker, ScheduledTask, TaskiqResult
from taskiq.kicker import AsyncKicker

from taskiq_redis import (
    ListQueueClusterBroker,
    ListRedisClusterScheduleSource,
    RedisAsyncClusterResultBackend,
    RedisClusterScheduleSource,
    RedisStreamClusterBroker,
    dead_letters,
    keys,
    scripts,
)
from tests.servers import RedisServers

Call = tuple[str, list[str]]


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[Call]:
    """Every script call made during the test, as (script name, keys)."""
    made: list[Call] = []
    real_run = scripts.run

    async def recording_run(
        conn: Any, script: scripts.Script, keys: Sequence[Any], *rest: Any
    ) -> Any:
        made.append((script.name, [k.decode() if isinstance(k, bytes) else str(k) for k in keys]))
        return await real_run(conn, script, keys, *rest)

    monkeypatch.setattr(scripts, "run", recording_run)
    return made


async def kick(broker: AsyncBroker, **labels: Any) -> None:
    """Send a real task message, the way ``task.kiq()`` does."""
    await AsyncKicker("slots.task", broker, labels).kiq()


async def use_every_script(url: str, unique: str) -> None:
    """Drive each object through the operations that run its scripts."""
    backend: RedisAsyncClusterResultBackend[int] = RedisAsyncClusterResultBackend(
        url, keep_results=False, prefix_str=f"r{unique}"
    )
    await backend.startup()
    await backend.set_result("t", TaskiqResult(is_err=False, return_value=1, execution_time=0))
    await backend.get_result("t")
    await backend.shutdown()

    lists = ListQueueClusterBroker(url, queue_name=f"l{unique}")
    await lists.startup()
    await kick(lists)
    await kick(lists, delay=0.2)  # delay_add; listening runs delay_move
    await kick(lists, priority=5)  # list_pop reads the level keys too
    await asyncio.wait_for(anext(lists.listen()), 10)
    await lists.shutdown()

    # xread_count=1: the first read is full, so the second runs the stream_read script.
    stream = RedisStreamClusterBroker(url, queue_name=f"s{unique}", idle_timeout=300, xread_count=1)
    await stream.startup()
    await kick(stream)
    await kick(stream)
    await kick(stream, delay=0.2)
    await kick(stream, priority=5, delay=0.2)  # stream_read over the level streams
    await kick(stream, priority=3)  # stream_add: the level's first message makes its stream
    await kick(stream, priority=2, unique=True)  # task_add
    assert not await stream.cancel("not-there")  # task_cancel, looking everywhere
    listener = stream.listen()
    for _ in range(4):
        first = await asyncio.wait_for(anext(listener), 10)
        await first.ack()  # type: ignore[misc]
    received = await asyncio.wait_for(anext(listener), 10)
    await asyncio.sleep(1.5)  # held past idle_timeout/3 (renew) and a reclaim period
    await received.ack()  # type: ignore[misc]
    await listener.aclose()
    dead = keys.dead_letter_key(stream.queue_name)
    for number in range(2):
        await stream._conn.execute("XADD", dead, "*", "data", f"d{number}")
    assert await dead_letters.requeue_dead_letters(stream, stream.queue_name, limit=1) == (1, 0)
    assert await dead_letters.purge_dead_letters(stream, stream.queue_name) == 1
    await stream.shutdown()

    source = ListRedisClusterScheduleSource(url, prefix=f"p{unique}")
    await source.startup()
    timed = ScheduledTask(
        task_name="t",
        labels={},
        args=[],
        kwargs={},
        schedule_id="one",
        time=datetime.datetime.now(datetime.timezone.utc),
    )
    await source.add_schedule(timed)
    await source.get_schedules()
    await source.delete_schedule("one")
    await source.shutdown()

    keyed = RedisClusterScheduleSource(url, prefix=f"k{unique}")
    await keyed.startup()
    await keyed.add_schedule(timed)
    await keyed.shutdown()


async def test_every_script_keeps_its_keys_in_one_slot(
    redis_servers: RedisServers, unique: str, calls: list[Call]
) -> None:
    await use_every_script(redis_servers.cluster_url, unique)
    assert {name for name, _ in calls} == set(scripts.all_scripts())
    for name, call_keys in calls:
        slots = {key_slot(key.encode()) for key in call_keys}
        assert len(slots) == 1, f"{name} was called with keys in several slots: {call_keys}"
