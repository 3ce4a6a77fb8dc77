"""Delayed messages on the stream and list brokers, on every topology, with real servers.

A ``delay`` label parks the message in ``{queue}:delayed`` until its due time by the server's
clock; the listeners' mover puts it on the queue then, exactly once.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from typing import Any

import pytest
from taskiq import AsyncBroker, BrokerMessage, TaskiqMessage

import taskiq_redis
from taskiq_redis import connection, delays, keys
from tests.queue_kinds import KINDS, body_of, broker_class, make_broker, receive
from tests.queue_kinds import message as queue_message
from tests.servers import RedisServers, Topology
from tests.worker_process import WorkerProcess

# The tasks of tests/apps/ops_app.py (it builds its broker on import, so only a worker imports it).
RECORD_TASK, FLAKY_TASK, RETRY_DELAY = "ops_app.record", "ops_app.flaky", 2.0
HOLD_TASK = "ops_app.hold"


def message(body: str, delay: Any = None) -> BrokerMessage:
    """A real taskiq message (the stream broker dead-letters anything else) with id ``body``."""
    return queue_message(body, delay=delay)


async def server_ms(raw_redis: Any) -> int:
    seconds, micros = await raw_redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


@pytest.mark.parametrize("kind", KINDS)
async def test_delayed_messages_arrive_by_due_time_and_not_before(
    kind: str, topology: Topology, raw_redis: Any, unique: str
) -> None:
    queue = f"due{kind}{unique}"
    broker = make_broker(kind, topology, queue)
    await broker.startup()
    for body, delay in [("late", 1.5), ("early", 0.5), ("now", None), ("middle", "1.0")]:
        await broker.kick(message(body, delay))
    await broker.kick(message("zero", 0))
    await broker.kick(message("negative", -3))
    parked = await raw_redis.zrange(keys.delayed_key(queue), 0, -1, withscores=True)
    due = {body_of(member.split(b":", 2)[2]): int(score) for member, score in parked}
    assert set(due) == {"late", "early", "middle"}
    arrivals = []
    try:
        async for received in receive(broker, 6):
            arrivals.append((body_of(received), await server_ms(raw_redis)))
    finally:
        await broker.shutdown()
    assert sorted(body for body, _ in arrivals[:3]) == ["negative", "now", "zero"]
    assert [body for body, _ in arrivals[3:]] == ["early", "middle", "late"]
    for body, arrived in arrivals[3:]:
        assert arrived >= due[body], f"{body} arrived {due[body] - arrived} ms early"
        # Not a latency figure (the mover wakes at least every 0.5 s; a loaded machine adds
        # its own): only a mover that stopped waking, and moved on some later event, fails.
        assert arrived - due[body] < 5000, f"{body} arrived {arrived - due[body]} ms late"
    assert await raw_redis.zcard(keys.delayed_key(queue)) == 0


@pytest.mark.parametrize("kind", KINDS)
async def test_many_workers_racing_the_mover_get_each_delayed_task_once(
    kind: str, topology: Topology, unique: str
) -> None:
    queue = f"race{kind}{unique}"
    producer = make_broker(kind, topology, queue)
    await producer.startup()
    total = 120
    for number in range(total):
        await producer.kick(message(f"m{number}", 0.5 + (number % 4) * 0.1))
    await producer.shutdown()
    workers = [make_broker(kind, topology, queue) for _ in range(5)]
    seen: Counter[str] = Counter()

    async def work(broker: AsyncBroker) -> None:
        listener = broker.listen()
        try:
            while True:
                received = await anext(listener)
                if not isinstance(received, bytes) and (acked := received.ack()) is not None:
                    await acked
                seen[body_of(received)] += 1
        finally:
            await listener.aclose()

    for broker in workers:
        await broker.startup()
    tasks = [asyncio.ensure_future(work(broker)) for broker in workers]
    try:
        for _ in range(300):
            if sum(seen.values()) >= total:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1)  # time for a duplicate to show up
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for broker in workers:
            await broker.shutdown()
    assert seen == Counter({f"m{number}": 1 for number in range(total)})


async def test_mover_calls_racing_move_each_message_exactly_once(
    topology: Topology, raw_redis: Any, unique: str
) -> None:
    """Eight connections run the mover script at once over 500 due messages."""
    queue = f"movers{unique}"
    conns = [
        connection.sentinel(topology.sentinels, topology.master_name)
        if topology.name == "sentinel"
        else (connection.cluster if topology.name == "cluster" else connection.single_node)(
            topology.url
        )
        for _ in range(8)
    ]
    for number in range(500):
        await delays.add(conns[0], queue, f"m{number}".encode(), 1)
    await asyncio.sleep(0.05)

    async def drain(conn: connection.RedisConnection) -> int:
        moved_here = 0
        while True:
            moved, _ = await delays.move_due(conn, queue, "list", batch=7)
            moved_here += moved
            if moved == 0:
                return moved_here

    try:
        counts = await asyncio.gather(*(drain(conn) for conn in conns))
    finally:
        for conn in conns:
            await conn.close()
    assert sum(counts) == 500
    moved_bodies = await raw_redis.lrange(queue, 0, -1)
    assert sorted(moved_bodies) == sorted(f"m{number}".encode() for number in range(500))


@pytest.mark.parametrize("label", ["soon", True, float("nan"), float("inf"), [1]])
async def test_a_bad_delay_label_is_refused_and_nothing_is_sent(
    label: Any, redis_servers: RedisServers, unique: str
) -> None:
    queue = f"bad{unique}"
    broker = taskiq_redis.ListQueueBroker(redis_servers.standalone_url, queue_name=queue)
    await broker.startup()
    try:
        with pytest.raises(ValueError, match="the delay label must be a"):
            await broker.kick(message("x", label))
        conn = broker._conn
        assert await conn.execute("EXISTS", queue, keys.delayed_key(queue)) == 0
    finally:
        await broker.shutdown()


def test_delay_label_values() -> None:
    assert delays.delay_ms({}) is None
    assert delays.delay_ms({"delay": 0}) is None
    assert delays.delay_ms({"delay": "-1.5"}) is None
    assert delays.delay_ms({"delay": 2}) == 2000
    assert delays.delay_ms({"delay": "0.25"}) == 250
    assert delays.delay_ms({"delay": 0.0001}) == 1


async def test_a_mover_failure_is_logged_and_loses_nothing(
    redis_servers: RedisServers, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A queue key of the wrong type makes the move fail; the message stays parked."""
    queue = f"wrong{unique}"
    conn = connection.single_node(redis_servers.standalone_url)
    try:
        await conn.execute("HSET", queue, "f", "v")
        await delays.add(conn, queue, b"kept", 1)
        await asyncio.sleep(0.05)
        mover = delays.Mover(conn, {queue: [queue]}, "list")
        mover.start()
        await asyncio.sleep(0.5)
        await mover.stop()
        assert await conn.execute("ZCARD", keys.delayed_key(queue)) == 1
        assert (
            "Moving due delayed messages failed; retrying: "
            "ResponseError: script delay_move: WRONGTYPE" in caplog.text
        )
    finally:
        await conn.close()


def worker_config(kind: str, topology: Topology, queue: str) -> dict[str, Any]:
    return {
        "broker": broker_class(kind, topology),
        "broker_kwargs": {**topology.kwargs(), "queue_name": queue},
    }


@pytest.mark.parametrize("kind", KINDS)
async def test_smart_retry_backoff_waits_in_a_real_worker(
    kind: str, topology: Topology, unique: str
) -> None:
    """SmartRetryMiddleware re-kicks a failed task with delay=2: the retry runs 2 s later."""
    queue = f"retry{kind}{unique}"
    producer = make_broker(kind, topology, queue)
    await producer.startup()
    config = worker_config(kind, topology, queue)
    with WorkerProcess("tests.apps.ops_app:broker", config=config) as worker:
        worker.wait_ready()
        await producer.kick(task_message(producer, FLAKY_TASK, unique, {"retry_on_error": True}))
        await asyncio.to_thread(worker.wait_for_line, f"attempt 1 of {unique}")
        log = worker.output()
    await producer.shutdown()
    times = {
        int(attempt): float(at)
        for attempt, at in re.findall(rf"attempt (\d) of {unique} at ([\d.]+)", log)
    }
    waited = times[1] - times[0]
    assert waited >= RETRY_DELAY - 0.05, log
    assert waited < RETRY_DELAY + 1.5, log


async def test_delayed_tasks_survive_a_killed_worker_and_a_redis_restart(
    redis_servers: RedisServers, unique: str
) -> None:
    """Delayed tasks survive a worker killed while it held some of them (moved when due, read,
    running) and others were still parked, and Redis (AOF) restarting: each runs once."""
    topology = Topology.of(redis_servers, "single")
    queue = f"restart{unique}"
    producer = make_broker("stream", topology, queue)
    await producer.startup()
    config = worker_config("stream", topology, queue)
    config["broker_kwargs"]["idle_timeout"] = 2000  # what the killed worker held comes back
    moved = [f"m{unique}n{number}" for number in range(3)]  # due before the kill
    parked = [f"p{unique}n{number}" for number in range(3)]  # due after it
    with WorkerProcess(
        "tests.apps.ops_app:broker", config={**config, "hold_seconds": 600}
    ) as worker:
        worker.wait_ready()
        for name in moved:
            await producer.kick(task_message(producer, HOLD_TASK, name, {"delay": 0.3}))
        for name in parked:
            await producer.kick(task_message(producer, HOLD_TASK, name, {"delay": 6}))
        for name in moved:
            await asyncio.to_thread(worker.wait_for_line, f"started {name} at")
        # The killed worker moved these and holds them; the others are still parked.
        raw = producer._conn
        assert await raw.execute("ZCARD", keys.delayed_key(queue)) == len(parked)
        summary = await raw.execute("XPENDING", queue, "taskiq")
        assert summary["pending"] == len(moved), summary
        worker.kill()
        first_log = worker.output()
    await producer.shutdown()
    await redis_servers.arestart_standalone()
    with WorkerProcess("tests.apps.ops_app:broker", config=config) as worker:
        worker.wait_ready()
        for name in moved + parked:
            await asyncio.to_thread(worker.wait_for_line, f"ran {name} at")
        await asyncio.sleep(1)  # room for a wrong second run
        log = worker.output()
    assert not any(f"ran {name} at" in first_log for name in moved + parked), first_log
    assert not any(f"started {name} at" in first_log for name in parked), first_log
    for name in moved + parked:
        assert log.count(f"ran {name} at") == 1, log


def task_message(
    broker: AsyncBroker, task_name: str, arg: str, labels: dict[str, Any]
) -> BrokerMessage:
    """A message for a task of tests/apps/ops_app.py, as ``task.kiq(arg)`` sends it."""
    payload = TaskiqMessage(task_id=arg, task_name=task_name, labels=labels, args=[arg], kwargs={})
    return BrokerMessage(
        task_id=arg,
        task_name=task_name,
        message=broker.formatter.dumps(payload).message,
        labels=labels,
    )
