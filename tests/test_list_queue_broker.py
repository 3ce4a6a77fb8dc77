"""The list queue brokers on every topology, seen through what a taskiq user calls."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import pytest
from redis.asyncio import RedisCluster
from taskiq import AsyncBroker, BrokerMessage

import taskiq_redis
from taskiq_redis import ListQueueBroker, ListQueueClusterBroker, ListQueueSentinelBroker
from taskiq_redis.brokers.base import BaseRedisBroker
from taskiq_redis.brokers.list_queue import BaseListQueueBroker
from tests.servers import AsyncRedisClient, RedisServers, Topology
from tests.worker_process import WorkerProcess, worker_config

# A hang guard only: a broken broker fails the test instead of blocking the suite.
PATIENCE = 20.0


def message(data: bytes, **labels: Any) -> BrokerMessage:
    return BrokerMessage(task_id="id", task_name="task", message=data, labels=labels)


async def receive(stream: AsyncGenerator[bytes, None], count: int) -> list[bytes]:
    """The next ``count`` messages of a listener that stays open."""

    async def take() -> list[bytes]:
        return [await anext(stream) for _ in range(count)]

    return await asyncio.wait_for(take(), PATIENCE)


async def eventually(check: Callable[[], Any], what: str) -> None:
    """Wait until ``check()`` (awaited) is true; fail with ``what`` after PATIENCE."""
    deadline = asyncio.get_running_loop().time() + PATIENCE
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"never happened: {what}")
        await asyncio.sleep(0.01)


def worker_broker() -> AsyncBroker:
    """The broker of a real ``taskiq worker`` process, built from the test's config."""
    config = worker_config()
    broker: AsyncBroker = getattr(taskiq_redis, config["cls"])(**config["kwargs"])
    return broker


def idle_worker_exit_seconds(cls: type[BaseRedisBroker], topology: Topology, queue: str) -> float:
    """Seconds a real, idle ``taskiq worker`` of ``cls`` takes to exit after SIGTERM."""
    config = {"cls": cls.__name__, "kwargs": {**topology.kwargs(), "queue_name": queue}}
    with WorkerProcess(f"{__name__}:worker_broker", config=config) as worker:
        worker.wait_ready()
        return worker.stop(signal.SIGTERM)


def broker_class(topology: Topology) -> type[BaseListQueueBroker]:
    return topology.pick(
        single=ListQueueBroker, cluster=ListQueueClusterBroker, sentinel=ListQueueSentinelBroker
    )  # type: ignore[return-value]  # mypy joins the three classes to their metaclass


@pytest.fixture
def make_broker(topology: Topology, unique: str) -> Callable[..., BaseListQueueBroker]:
    """Build the public broker class of this topology, on a queue of this test's own."""

    def make(**options: Any) -> BaseListQueueBroker:
        options.setdefault("queue_name", f"queue-{unique}")
        return broker_class(topology)(**topology.kwargs(), **options)

    return make


@pytest.fixture
async def broker(
    make_broker: Callable[..., BaseListQueueBroker],
) -> AsyncIterator[BaseListQueueBroker]:
    started = make_broker()
    await started.startup()
    yield started
    await started.shutdown()


async def kick_all(broker: BaseRedisBroker, datas: list[bytes]) -> None:
    for data in datas:
        await broker.kick(message(data))


async def queue_length(raw: AsyncRedisClient, queue: str) -> int:
    length: int = await raw.execute_command("LLEN", queue)
    return length


async def test_message_bytes_arrive_intact(broker: BaseListQueueBroker, topology: Topology) -> None:
    data = bytes(range(256)) + b"\x00\xff end"
    await broker.kick(message(data))
    stream = broker.listen()
    assert await receive(stream, 1) == [data]
    await stream.aclose()
    public = topology.pick(single="connection_pool", cluster="redis", sentinel="sentinel")
    assert getattr(broker, public) is not None
    assert broker.queue_name.startswith("queue-")


async def test_queue_name_label_sends_to_that_queue(
    broker: BaseListQueueBroker,
    make_broker: Callable[..., BaseListQueueBroker],
    raw_redis: AsyncRedisClient,
    unique: str,
) -> None:
    other = make_broker(queue_name=f"other-{unique}")
    await other.startup()
    try:
        await broker.kick(message(b"for the other queue", queue_name=other.queue_name))
        stream = other.listen()
        assert await receive(stream, 1) == [b"for the other queue"]
        await stream.aclose()
        assert await queue_length(raw_redis, broker.queue_name) == 0
    finally:
        await other.shutdown()


async def test_first_in_first_out_in_batches(
    broker: BaseListQueueBroker, raw_redis: AsyncRedisClient
) -> None:
    count = 2 * broker.batch_size + 5
    sent = [f"message {i}".encode() for i in range(count)]
    await kick_all(broker, sent)
    stream = broker.listen()
    first = await receive(stream, 1)
    # One script call took the oldest batch_size messages at once.
    assert await queue_length(raw_redis, broker.queue_name) == count - broker.batch_size
    assert first + await receive(stream, count - 1) == sent
    await stream.aclose()


async def test_batch_size_one_pops_one_at_a_time(
    make_broker: Callable[..., BaseListQueueBroker], raw_redis: AsyncRedisClient
) -> None:
    broker = make_broker(batch_size=1)
    await broker.startup()
    try:
        await kick_all(broker, [b"a", b"b", b"c"])
        stream = broker.listen()
        assert await receive(stream, 1) == [b"a"]
        assert await queue_length(raw_redis, broker.queue_name) == 2
        assert await receive(stream, 2) == [b"b", b"c"]
        await stream.aclose()
    finally:
        await broker.shutdown()


@pytest.mark.parametrize("size", [0, 1001, 2.5, True])
def test_bad_batch_size_is_refused_by_name(
    make_broker: Callable[..., BaseListQueueBroker], size: Any
) -> None:
    with pytest.raises((TypeError, ValueError), match="batch_size"):
        make_broker(batch_size=size)


async def test_popped_messages_go_back_in_order_on_stop(
    broker: BaseListQueueBroker, make_broker: Callable[..., BaseListQueueBroker]
) -> None:
    sent = [f"message {i}".encode() for i in range(5)]
    await kick_all(broker, sent)
    stream = broker.listen()
    assert await receive(stream, 1) == sent[:1]
    await stream.aclose()  # the four others were popped with the first one
    await broker.kick(message(b"kicked later"))

    second = make_broker()
    await second.startup()
    try:
        stream = second.listen()
        assert await receive(stream, 5) == [*sent[1:], b"kicked later"]
        await stream.aclose()
    finally:
        await second.shutdown()


@pytest.fixture
async def backlog(
    make_broker: Callable[..., BaseListQueueBroker],
) -> AsyncIterator[tuple[BaseListQueueBroker, list[bytes]]]:
    """A broker with batch_size 8 and the 20 messages queued for it."""
    broker = make_broker(batch_size=8)
    await broker.startup()
    sent = [f"low {i}".encode() for i in range(20)]
    await kick_all(broker, sent)
    yield broker, sent
    await broker.shutdown()


async def test_a_backlog_is_popped_ahead_within_batch_size_and_put_back_whole_on_stop(
    backlog: tuple[BaseListQueueBroker, list[bytes]], raw_redis: AsyncRedisClient
) -> None:
    """In a backlog the next pop starts before the popped messages run out, topping them up to
    batch_size at most (what a killed worker can lose); a stop puts back what it took too."""
    broker, sent = backlog
    stream = broker.listen()
    # The seventh is taken with 2 held: a pop ahead asks for 6, the batch_size top-up.
    handed = await receive(stream, 7)
    await asyncio.sleep(0.2)
    in_worker = len(sent) - len(handed) - await queue_length(raw_redis, broker.queue_name)
    assert in_worker == 7  # 1 held + 6 popped ahead, below batch_size
    await stream.aclose()  # the pop ahead answered, and is not handed over yet
    assert handed == sent[:7]
    assert await queue_length(raw_redis, broker.queue_name) == 13
    again = broker.listen()
    assert await receive(again, 13) == sent[7:]
    await again.aclose()


async def test_a_higher_level_found_by_a_pop_ahead_goes_before_the_held_messages(
    backlog: tuple[BaseListQueueBroker, list[bytes]],
) -> None:
    broker, _ = backlog
    stream = broker.listen()
    try:
        handed = await receive(stream, 5)
        await broker.kick(message(b"high", priority=9))
        handed += await receive(stream, 2)  # the seventh starts the pop ahead: it finds high
        await asyncio.sleep(0.2)
        handed += await receive(stream, 2)
    finally:
        await stream.aclose()
    assert b"high" in handed, handed
    assert handed.index(b"high") < handed.index(b"low 7"), handed


async def blocked_in_brpop(raw: AsyncRedisClient, queue: str) -> bool:
    """Whether a client of the server that holds ``queue`` waits in BRPOP."""
    if isinstance(raw, RedisCluster):
        node = (await raw.initialize()).get_node_from_key(queue)
        clients = await raw.execute_command("CLIENT LIST", target_nodes=node)
    else:
        clients = await raw.execute_command("CLIENT LIST")  # type: ignore[no-untyped-call]
    return any(client.get("cmd") == "brpop" for client in clients)


async def test_stop_during_a_pop_in_flight_puts_its_message_back(
    broker: BaseListQueueBroker,
    raw_redis: AsyncRedisClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    stream = broker.listen()
    waiting = asyncio.ensure_future(anext(stream))
    await eventually(lambda: blocked_in_brpop(raw_redis, broker.queue_name), "BRPOP blocks")
    waiting.cancel()  # the worker stops while BRPOP still waits ...
    await asyncio.sleep(0.05)
    await broker.kick(message(b"arrives during the stop"))  # ... and this one is popped
    with (
        caplog.at_level(logging.INFO, "taskiq.redis_broker"),
        pytest.raises(asyncio.CancelledError),
    ):
        await waiting
    assert await raw_redis.execute_command("LRANGE", broker.queue_name, 0, -1) == [
        b"arrives during the stop"
    ]
    assert "Put 1 popped messages back" in caplog.text


async def test_script_flush_while_listening_loses_nothing(
    broker: BaseListQueueBroker, raw_redis: AsyncRedisClient
) -> None:
    sent = [f"message {i}".encode() for i in range(30)]
    await kick_all(broker, sent[:10])
    stream = broker.listen()
    received = await receive(stream, 10)
    await raw_redis.execute_command("SCRIPT FLUSH")
    await kick_all(broker, sent[10:])
    received += await receive(stream, 20)
    await stream.aclose()
    assert received == sent


@pytest.mark.parametrize("topology", ["single"], indirect=True)
async def test_listening_survives_a_server_restart(
    broker: BaseListQueueBroker,
    make_broker: Callable[..., BaseListQueueBroker],
    redis_servers: RedisServers,
) -> None:
    stream = broker.listen()
    await kick_all(broker, [b"before 1", b"before 2"])
    assert await receive(stream, 1) == [b"before 1"]
    waiting = asyncio.ensure_future(receive(stream, 4))
    await redis_servers.arestart_standalone(downtime=1)
    # A new producer: the old one's idle pooled connection died with the server, and
    # redis-py's default is not to retry the command that finds that out.
    producer = make_broker()
    try:
        await kick_all(producer, [b"after 1", b"after 2", b"after 3"])
    finally:
        await producer.shutdown()
    assert await waiting == [b"before 2", b"after 1", b"after 2", b"after 3"]
    await stream.aclose()


def test_idle_worker_exits_soon_after_sigterm(topology: Topology, unique: str) -> None:
    assert idle_worker_exit_seconds(broker_class(topology), topology, f"queue-{unique}") < 5
