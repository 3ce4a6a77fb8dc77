"""The stream brokers inside taskiq: real ``taskiq worker`` processes and taskiq's ``Receiver``.

What these tests assert is what a user of a worker sees: which tasks ran, how often, how many at
once, and how long a message that lost its ack or its worker takes to come back.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import pytest
from redis.asyncio import RedisCluster
from taskiq import AckableMessage, AsyncBroker, BrokerMessage, Context, TaskiqDepends
from taskiq.kicker import AsyncKicker
from taskiq.receiver import Receiver

from taskiq_redis.brokers.stream import BaseStreamBroker
from tests.apps.stream_app import BAD_CLEANUP, BAD_MIDDLEWARE, RAN, SLEEP, STARTED
from tests.servers import AsyncRedisClient, Topology
from tests.test_stream_broker import PATIENCE, broker_class, length, pending
from tests.worker_process import WorkerProcess


def stream_worker(
    topology: Topology, queue: str, args: tuple[str, ...] = (), **options: Any
) -> WorkerProcess:
    """A ``taskiq worker`` running ``tests/apps/stream_app.py`` on ``queue``."""
    kwargs = {**topology.kwargs(), "queue_name": queue, **options}
    config = {"cls": broker_class(topology).__name__, "kwargs": kwargs}
    return WorkerProcess("tests.apps.stream_app:broker", config=config, args=args)


async def kiq(broker: AsyncBroker, task: str, *args: Any, **kwargs: Any) -> None:
    await AsyncKicker(task, broker, {}).kiq(*args, **kwargs)


def tags(log: WorkerProcess | str, marker: str) -> list[str]:
    """The tags of the log lines that say ``marker``, one per line."""
    text = log if isinstance(log, str) else log.output()
    return [line.split(marker, 1)[1].split()[0] for line in text.splitlines() if marker in line]


async def until(check: Callable[[], bool], what: str, patience: float = PATIENCE) -> float:
    """Wait until ``check()`` holds; the seconds it took. Fails with ``what`` after patience."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > patience:
            pytest.fail(f"never happened: {what}")
        await asyncio.sleep(0.05)
    return time.monotonic() - start


async def eventually(read: Callable[[], Awaitable[Any]], wanted: Any, what: str) -> None:
    """Wait until ``await read()`` equals ``wanted``; fails with ``what`` after patience."""
    deadline = time.monotonic() + PATIENCE
    while (got := await read()) != wanted:
        if time.monotonic() > deadline:
            pytest.fail(f"never happened: {what} (last seen: {got!r})")
        await asyncio.sleep(0.05)


@pytest.fixture
async def producer(topology: Topology, unique: str) -> Any:
    """A started broker on this test's queue: its startup creates the consumer group."""
    broker = broker_class(topology)(**topology.kwargs(), queue_name=f"queue-{unique}")
    await broker.startup()
    yield broker
    await broker.shutdown()


async def test_messages_taskiq_did_not_ack_come_back_and_the_worker_goes_on(
    topology: Topology, producer: BaseStreamBroker, raw_redis: AsyncRedisClient
) -> None:
    idle_ms = 1500
    with stream_worker(topology, producer.queue_name, idle_timeout=idle_ms) as worker:
        await asyncio.to_thread(worker.wait_ready)
        for i in range(50):  # 100: as many as the default xread_count
            await kiq(producer, BAD_MIDDLEWARE, f"m{i}")
            await kiq(producer, BAD_CLEANUP, f"c{i}")
        await until(lambda: len(tags(worker, RAN)) >= 100, "the first run of the 100 tasks")
        for i in range(5):
            await kiq(producer, SLEEP, 0, f"n{i}")
        let_go = time.monotonic()  # taking these, taskiq lets go of the last unacked one
        await until(lambda: len(tags(worker, RAN)) >= 205, "every task ran")
        came_back = time.monotonic() - let_go
        await until(lambda: "delivered again after idle_timeout" in worker.output(), "a warning")
        # While the worker runs: leaving the block kills it, and acks still queued die with it.
        await eventually(lambda: pending(raw_redis, producer.queue_name), 0, "every entry acked")
        log = worker.output()
    runs = Counter(tags(log, RAN))
    assert {tag: runs[tag] for tag in runs if tag.startswith("n")} == {f"n{i}": 1 for i in range(5)}
    assert all(runs[f"{kind}{i}"] == 2 for kind in "mc" for i in range(50)), runs
    # The README's bound: 4/3 of idle_timeout plus a second; the rest is a loaded machine.
    assert came_back < idle_ms * 4 / 3000 + 1 + 8, came_back


async def test_concurrency_is_taskiqs_max_async_tasks(
    topology: Topology, producer: BaseStreamBroker
) -> None:
    args = ("--max-async-tasks", "300")
    with stream_worker(topology, producer.queue_name, args=args) as worker:
        await asyncio.to_thread(worker.wait_ready)
        for start in range(0, 600, 100):
            await asyncio.gather(
                *(kiq(producer, SLEEP, 2, f"s{i}") for i in range(start, start + 100))
            )
        await until(lambda: len(tags(worker, RAN)) >= 600, "600 tasks ran", PATIENCE * 2)
        log = worker.output()
    at_once = [int(line.split()[-1]) for line in log.splitlines() if STARTED in line]
    assert max(at_once) >= 250, max(at_once)


async def held_by(raw: AsyncRedisClient, stream: str, consumer: str) -> int:
    """How many of ``stream``'s entries ``consumer`` holds unacknowledged."""
    entries = await raw.xpending_range(stream, "taskiq", "-", "+", 1000, consumername=consumer)
    return len(entries)


async def test_killed_workers_messages_are_taken_by_a_busy_worker(
    topology: Topology, producer: BaseStreamBroker, raw_redis: AsyncRedisClient
) -> None:
    idle_ms = 2000
    queue = producer.queue_name
    full = ("--max-async-tasks", "20")
    dying_name = f"dying-{queue}"
    # xread_count=1: a read takes one entry, so taskiq 0.12's receiver, which reads one message
    # ahead even when full, leaves the dying worker one b-task at most.
    options = {"idle_timeout": idle_ms, "xread_count": 1, "consumer_name": dying_name}
    with stream_worker(topology, queue, full, **options) as dying:
        await asyncio.to_thread(dying.wait_ready)
        for i in range(20):
            await kiq(producer, SLEEP, 600, f"d{i}")  # far longer than the test
        await until(lambda: len(tags(dying, STARTED)) == 20, "the first worker is full")
        with stream_worker(topology, queue, idle_timeout=idle_ms, xread_count=5) as busy:
            await asyncio.to_thread(busy.wait_ready)
            for i in range(4):  # busy with xread_count - 1 tasks
                await kiq(producer, SLEEP, 600, f"b{i}")
            await eventually(lambda: pending(raw_redis, queue), 24, "every message taken")
            held = await held_by(raw_redis, queue, dying_name) - 20
            assert held in (0, 1), held
            await until(lambda: len(tags(busy, STARTED)) == 4 - held, "the second worker is busy")
            dying.kill()
            everything = {f"d{i}" for i in range(20)} | {f"b{i}" for i in range(4)}
            took = await until(lambda: set(tags(busy, STARTED)) == everything, "all reclaimed")
    assert took < idle_ms / 1000 + 5, took


async def test_a_task_longer_than_idle_timeout_runs_once(
    topology: Topology, producer: BaseStreamBroker
) -> None:
    idle_ms = 1000
    queue = producer.queue_name
    with (
        stream_worker(topology, queue, idle_timeout=idle_ms) as first,
        stream_worker(topology, queue, idle_timeout=idle_ms) as second,
    ):
        await asyncio.to_thread(first.wait_ready)
        await asyncio.to_thread(second.wait_ready)
        await kiq(producer, SLEEP, 3.5, "long")
        await until(lambda: len(tags(first, RAN) + tags(second, RAN)) == 1, "the task ran")
        await asyncio.sleep(idle_ms * 1.5 / 1000)  # room for a wrong second delivery
        assert len(tags(first, STARTED) + tags(second, STARTED)) == 1


async def test_listen_yields_exactly_the_bytes_kicked(producer: BaseStreamBroker) -> None:
    payloads = [b"hello", b"", b"\x00\xff not json", "é".encode(), b"x" * 100_000]
    for i, payload in enumerate(payloads):
        await producer.kick(
            BrokerMessage(task_id=str(i), task_name="t", message=payload, labels={})
        )
    stream = producer.listen()
    got = []
    for _ in payloads:
        message = await asyncio.wait_for(anext(stream), PATIENCE)
        assert isinstance(message, AckableMessage)
        got.append(message.data)
        await message.ack()  # type: ignore[misc]
    await stream.aclose()
    assert got == payloads


@pytest.mark.parametrize("loss", ["XGROUP DESTROY", "DEL"])
async def test_nothing_added_after_the_group_was_lost_is_lost(
    producer: BaseStreamBroker, raw_redis: AsyncRedisClient, loss: str
) -> None:
    queue = producer.queue_name
    received: list[bytes] = []

    async def consume() -> None:
        async for message in producer.listen():
            received.append(message.data)
            await message.ack()  # type: ignore[misc]

    def send(data: bytes) -> Any:
        return producer.kick(BrokerMessage(task_id="", task_name="t", message=data, labels={}))

    consumer = asyncio.ensure_future(consume())
    try:
        await send(b"before")
        await until(lambda: received == [b"before"], "the first message")
        lose = (
            ("XGROUP", "DESTROY", queue, "taskiq") if loss.startswith("XGROUP") else ("DEL", queue)
        )
        await raw_redis.execute_command(*lose)
        after = [f"after {i}".encode() for i in range(20)]
        for data in after:  # at once: before the worker notices the loss
            await send(data)
        await until(lambda: set(after) <= set(received), "every message sent after the loss")
    finally:
        consumer.cancel()
        await asyncio.wait([consumer])
    await eventually(lambda: pending(raw_redis, queue), 0, "every entry acknowledged")


@pytest.mark.parametrize("topology", ["cluster"], indirect=True)
async def test_script_flush_on_every_node_while_a_worker_kicks_acks_and_renews(
    topology: Topology,
    make_stream_broker: Callable[..., BaseStreamBroker],
    raw_redis: AsyncRedisClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    idle_ms = 1000
    worker = make_stream_broker(idle_timeout=idle_ms)
    other = make_stream_broker(idle_timeout=idle_ms)  # would take the long task if renewal died
    runs: Counter[str] = Counter()

    async def task(
        tag: str, context: Annotated[Context, TaskiqDepends()], seconds: float = 0
    ) -> None:
        runs[tag] += 1
        await asyncio.sleep(seconds)
        if tag.startswith("short"):  # kicks from inside the worker, while everything goes on
            await kiq(context.broker, "flush.task", f"child {tag}")

    for broker in (worker, other):
        broker.register_task(task, task_name="flush.task")
    receivers = [Receiver(broker, max_async_tasks=100) for broker in (worker, other)]
    finish = asyncio.Event()
    listening = [asyncio.ensure_future(receiver.listen(finish)) for receiver in receivers]
    try:
        await asyncio.sleep(0.5)
        await kiq(worker, "flush.task", "long", seconds=idle_ms * 3 / 1000)
        for i in range(150):
            await kiq(worker, "flush.task", f"short {i}")
            if i % 10 == 0:
                assert isinstance(raw_redis, RedisCluster)
                await raw_redis.execute_command("SCRIPT FLUSH", target_nodes=RedisCluster.PRIMARIES)
            await asyncio.sleep(0.01)
        await until(lambda: len(runs) == 301, "every task and child ran")
        assert not any(task.done() for task in listening), "a listener ended"
    finally:
        finish.set()
        await asyncio.wait(listening, timeout=PATIENCE)
        for broker in (worker, other):
            await broker.shutdown()
    assert runs["long"] == 1
    assert set(runs.values()) == {1}
    assert await pending(raw_redis, worker.queue_name) == 0
    assert await length(raw_redis, worker.queue_name) == 0
    assert "Acknowledging" not in caplog.text
    assert "never retrieved" not in caplog.text


@pytest.fixture
def make_stream_broker(topology: Topology, unique: str) -> Callable[..., BaseStreamBroker]:
    def make(**options: Any) -> BaseStreamBroker:
        return broker_class(topology)(**topology.kwargs(), queue_name=f"queue-{unique}", **options)

    return make
