"""What a stream worker leaves behind: waiters of dead-lettered tasks told, consumers not piling up.

- A task whose message is dead-lettered gets an error result (``TaskDeadLetteredError`` naming
  the task, its deliveries and the reason), so ``wait_result()`` returns at once.
- A worker that stops cleanly, holding nothing, removes its consumer from the group; consumers
  that hold nothing and have been idle far longer than ``idle_timeout`` are removed by another
  worker's reclaim pass; a consumer that holds entries is never removed (its entries would be
  lost to every reclaim).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from taskiq import TaskiqResult

import taskiq_redis
from taskiq_redis.brokers.stream import claims
from tests.queue_kinds import acked, make_broker, message
from tests.servers import Topology

PATIENCE = 20.0


def backend_for(topology: Topology) -> Any:
    if topology.name == "single":
        return taskiq_redis.RedisAsyncResultBackend(topology.url)
    if topology.name == "cluster":
        return taskiq_redis.RedisAsyncClusterResultBackend(topology.url)
    return taskiq_redis.RedisAsyncSentinelResultBackend(**topology.kwargs())


async def consumers(raw_redis: Any, queue: str) -> dict[str, int]:
    """The group's consumers and how many entries each holds."""
    found = await raw_redis.xinfo_consumers(queue, "taskiq")
    return {
        (entry["name"].decode() if isinstance(entry["name"], bytes) else entry["name"]): int(
            entry["pending"]
        )
        for entry in found
    }


async def test_a_dead_lettered_task_gets_an_error_result_so_its_waiter_returns(
    topology: Topology, raw_redis: Any, unique: str
) -> None:
    queue = f"dead{unique}"
    backend = backend_for(topology)
    broker = make_broker("stream", topology, queue, max_deliveries=1, idle_timeout=300)
    broker = broker.with_result_backend(backend)

    @broker.task(task_name=f"never-{unique}")  # type: ignore[untyped-decorator,unused-ignore]
    async def never() -> None:
        return None

    await broker.startup()
    try:
        task = await never.kiq()
        # A consumer that dies holding it: the next delivery is its second, over max_deliveries.
        await raw_redis.xreadgroup("taskiq", "dies", {queue: ">"}, count=1)
        listener = broker.listen()
        taking = asyncio.ensure_future(anext(listener))
        try:
            result: TaskiqResult[Any] = await task.wait_result(timeout=PATIENCE)
        finally:
            taking.cancel()
            await asyncio.gather(taking, return_exceptions=True)
            await listener.aclose()
        assert result.is_err
        assert task.task_id in str(result.error)
        assert "dead-lettered after 2 deliveries" in str(result.error)
        assert "max_deliveries is 1" in str(result.error)
        assert await raw_redis.xlen(taskiq_redis.keys.dead_letter_key(queue)) == 1
    finally:
        await broker.shutdown()


async def test_a_worker_that_stops_cleanly_holding_nothing_leaves_the_group(
    topology: Topology, raw_redis: Any, unique: str
) -> None:
    queue = f"leave{unique}"
    staying = make_broker("stream", topology, queue)
    leaving: Any = make_broker("stream", topology, queue)
    await staying.startup()
    await leaving.startup()
    listener = leaving.listen()
    try:
        await staying.kick(message("one"))
        await acked(await asyncio.wait_for(anext(listener), PATIENCE))
        deadline = time.monotonic() + PATIENCE
        while (await consumers(raw_redis, queue)).get(leaving.consumer_name, 1):  # ack sent
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    finally:
        await listener.aclose()
        await leaving.shutdown()
    assert leaving.consumer_name not in await consumers(raw_redis, queue)
    await staying.shutdown()


async def test_idle_consumers_holding_nothing_are_removed_and_holders_are_kept(
    topology: Topology, raw_redis: Any, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two dead consumers: one held its entry until it was acknowledged (holds nothing), one
    still holds an entry. A worker's reclaim pass removes the first, never the second."""
    # Removal after 0.5 s idle here (by default 3 x idle_timeout, at least 10 s); idle_timeout
    # long enough that the holder's entry is not reclaimed meanwhile.
    monkeypatch.setattr(claims, "PRUNE_IDLE_FACTOR", 0)
    monkeypatch.setattr(claims, "PRUNE_IDLE_FLOOR", 0.5)
    queue = f"prune{unique}"
    worker = make_broker("stream", topology, queue, idle_timeout=100_000)
    await worker.startup()
    await worker.kick(message("a"))
    await worker.kick(message("b"))
    [[_, [(first_id, _)]]] = await raw_redis.xreadgroup("taskiq", "emptied", {queue: ">"}, count=1)
    await raw_redis.xack(queue, "taskiq", first_id)
    await raw_redis.xreadgroup("taskiq", "holder", {queue: ">"}, count=1)
    await asyncio.sleep(0.8)  # both idle past the bound
    assert await consumers(raw_redis, queue) == {"emptied": 0, "holder": 1}
    listener = worker.listen()
    taking = asyncio.ensure_future(anext(listener))  # its first fetch runs the reclaim pass
    try:
        deadline = time.monotonic() + PATIENCE
        while "emptied" in await consumers(raw_redis, queue):
            assert time.monotonic() < deadline, await consumers(raw_redis, queue)
            await asyncio.sleep(0.05)
        assert (await consumers(raw_redis, queue)).get("holder") == 1
    finally:
        taking.cancel()
        await asyncio.gather(taking, return_exceptions=True)
        await listener.aclose()
        await worker.shutdown()
