"""The stream brokers on every topology, seen through what a taskiq user and an operator see."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from functools import partial
from typing import Any

import pytest
from redis.asyncio import RedisCluster
from taskiq import AckableMessage, AsyncBroker, TaskiqMessage
from taskiq.kicker import AsyncKicker

import taskiq_redis
from taskiq_redis import (
    RedisStreamBroker,
    RedisStreamClusterBroker,
    RedisStreamSentinelBroker,
    keys,
    priorities,
)
from taskiq_redis.brokers.stream import BaseStreamBroker
from tests.servers import AsyncRedisClient, RedisServers, Topology
from tests.worker_process import WorkerProcess, worker_config

# A hang guard only: a broken broker fails the test instead of blocking the suite.
PATIENCE = 20.0
# Short enough that reclaims happen within a test, long enough for a loaded machine.
IDLE_MS = 400
TASK_STARTED = "stream test task started"


def broker_class(topology: Topology) -> type[BaseStreamBroker]:
    return topology.pick(  # type: ignore[return-value]  # mypy joins them to their metaclass
        single=RedisStreamBroker,
        cluster=RedisStreamClusterBroker,
        sentinel=RedisStreamSentinelBroker,
    )


@pytest.fixture
def make_broker(topology: Topology, unique: str) -> Callable[..., BaseStreamBroker]:
    """Build the public broker class of this topology, on a queue of this test's own."""

    def make(**options: Any) -> BaseStreamBroker:
        options.setdefault("queue_name", f"queue-{unique}")
        options.setdefault("idle_timeout", IDLE_MS)
        return broker_class(topology)(**topology.kwargs(), **options)

    return make


@pytest.fixture
async def broker(make_broker: Callable[..., BaseStreamBroker]) -> AsyncIterator[BaseStreamBroker]:
    started = make_broker()
    await started.startup()
    yield started
    await started.shutdown()


async def kick(broker: AsyncBroker, *args: Any, **labels: Any) -> str:
    """Send a task message the way ``task.kiq()`` does; its task id."""
    kicker: AsyncKicker[Any, Any] = AsyncKicker("stream_test.task", broker, labels)
    return (await kicker.kiq(*args)).task_id


def parsed(broker: AsyncBroker, message: AckableMessage) -> TaskiqMessage:
    return broker.formatter.loads(message.data)


async def receive(
    stream: AsyncGenerator[AckableMessage, None], count: int, ack: bool = True
) -> list[AckableMessage]:
    """The next ``count`` messages of a listener that stays open, acknowledged unless told."""

    async def take() -> list[AckableMessage]:
        got = []
        for _ in range(count):
            message = await anext(stream)
            if ack:
                await message.ack()  # type: ignore[misc]
            got.append(message)
        return got

    return await asyncio.wait_for(take(), PATIENCE)


async def eventually(check: Callable[[], Any], what: str) -> None:
    """Wait until ``check()`` (awaited) is true; fail with ``what`` after PATIENCE."""
    deadline = time.monotonic() + PATIENCE
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"never happened: {what}")
        await asyncio.sleep(0.02)


async def pending(raw: AsyncRedisClient, stream: str, group: str = "taskiq") -> int:
    summary = await raw.execute_command("XPENDING", stream, group)
    return int(summary["pending"] if isinstance(summary, dict) else summary[0])


async def length(raw: AsyncRedisClient, stream: str) -> int:
    return int(await raw.execute_command("XLEN", stream))


async def no_pending(raw: AsyncRedisClient, stream: str) -> bool:
    return await pending(raw, stream) == 0


async def has_length(raw: AsyncRedisClient, stream: str, wanted: int) -> bool:
    return await length(raw, stream) == wanted


async def settled(raw: AsyncRedisClient, stream: str) -> bool:
    """Every entry of the stream acknowledged and deleted (acks are sent after ``ack()``)."""
    return await pending(raw, stream) == 0 and await length(raw, stream) == 0


async def test_round_trip_keeps_the_message_and_empties_the_stream(
    broker: BaseStreamBroker, raw_redis: AsyncRedisClient, topology: Topology
) -> None:
    ids = [await kick(broker, i, "é\x00") for i in range(3)]
    stream = broker.listen()
    messages = await receive(stream, 3)
    await stream.aclose()
    assert [parsed(broker, m).task_id for m in messages] == ids
    assert [parsed(broker, m).args for m in messages] == [[i, "é\x00"] for i in range(3)]
    # Acked by the only group: deleted.
    await eventually(lambda: settled(raw_redis, broker.queue_name), "every entry acknowledged")
    public = topology.pick(single="connection_pool", cluster="redis", sentinel="sentinel")
    assert getattr(broker, public) is not None


async def test_queue_name_label_and_additional_streams(
    make_broker: Callable[..., BaseStreamBroker], raw_redis: AsyncRedisClient, unique: str
) -> None:
    # On a cluster these two streams are in different slots, so they are read separately.
    other = f"other-{unique}"
    broker = make_broker(additional_streams={other: ">"})
    await broker.startup()
    try:
        first = await kick(broker, "to the queue")
        second = await kick(broker, "to the other stream", queue_name=other)
        assert await length(raw_redis, other) == 1
        stream = broker.listen()
        messages = await receive(stream, 2)
        await stream.aclose()
        assert {parsed(broker, m).task_id for m in messages} == {first, second}
        for name in (broker.queue_name, other):  # each ack went to its own stream
            await eventually(partial(settled, raw_redis, name), f"{name} acknowledged")
    finally:
        await broker.shutdown()


async def test_additional_stream_value_is_where_its_group_starts(
    make_broker: Callable[..., BaseStreamBroker], raw_redis: AsyncRedisClient, unique: str
) -> None:
    old = f"old-{unique}"
    await raw_redis.execute_command("XADD", old, "*", "data", b"added before the group")
    kicker = make_broker(queue_name=old)
    old_id = await kick(kicker, "kicked before any worker")
    await kicker.shutdown()
    broker = make_broker(additional_streams={old: "0"})
    await broker.startup()
    try:
        stream = broker.listen()
        first, second = await receive(stream, 2)
        await stream.aclose()
        assert first.data == b"added before the group"  # handed over as it is, not parsed
        assert parsed(broker, second).task_id == old_id
        await eventually(lambda: has_length(raw_redis, old, 0), "both entries acknowledged")
    finally:
        await broker.shutdown()


async def test_maxlen_trims_the_stream(
    make_broker: Callable[..., BaseStreamBroker], raw_redis: AsyncRedisClient
) -> None:
    broker = make_broker(maxlen=3, approximate=False)
    await broker.startup()
    try:
        for i in range(10):
            await kick(broker, i)
        assert await length(raw_redis, broker.queue_name) == 3
    finally:
        await broker.shutdown()


async def test_entries_stay_until_every_group_acknowledged_them(
    make_broker: Callable[..., BaseStreamBroker], raw_redis: AsyncRedisClient
) -> None:
    first = make_broker(consumer_group_name="first")
    second = make_broker(consumer_group_name="second")
    await first.startup()
    await second.startup()
    try:
        await kick(first, 1)
        await kick(first, 2)
        stream = first.listen()
        await receive(stream, 2)
        await stream.aclose()
        assert await length(raw_redis, first.queue_name) == 2  # "second" has not read them

        stream = second.listen()
        one, two = await receive(stream, 2, ack=False)
        await one.ack()  # type: ignore[misc]
        await eventually(lambda: has_length(raw_redis, first.queue_name, 1), "one entry deleted")
        # The entry left is the one "second" still holds, not any other.
        left = await raw_redis.execute_command("XRANGE", first.queue_name, "-", "+")
        assert [fields[b"data"] for _, fields in left] == [two.data]
        assert await pending(raw_redis, first.queue_name, "second") == 1
        await two.ack()  # type: ignore[misc]
        await stream.aclose()
        await eventually(lambda: has_length(raw_redis, first.queue_name, 0), "both deleted")
    finally:
        await first.shutdown()
        await second.shutdown()


async def test_messages_a_stopping_worker_read_go_to_others_at_once(
    make_broker: Callable[..., BaseStreamBroker], raw_redis: AsyncRedisClient
) -> None:
    # A long idle_timeout: only the release on shutdown can bring them back in time.
    leaving = make_broker(idle_timeout=600_000)
    staying = make_broker(idle_timeout=600_000)
    await leaving.startup()
    await staying.startup()
    try:
        ids = [await kick(leaving, i) for i in range(4)]
        stream = leaving.listen()
        await receive(stream, 1, ack=False)  # one handed, three read with it
        await stream.aclose()
        await leaving.shutdown()

        stream = staying.listen()
        messages = await receive(stream, 4)
        await stream.aclose()
        assert sorted(parsed(staying, m).task_id for m in messages) == sorted(ids)
        await eventually(lambda: no_pending(raw_redis, staying.queue_name), "all acknowledged")
    finally:
        await staying.shutdown()


def worker_broker() -> AsyncBroker:
    """The broker of a real ``taskiq worker`` process, built from the test's config."""
    config = worker_config()
    broker: AsyncBroker = getattr(taskiq_redis, config["cls"])(**config["kwargs"])

    @broker.task(task_name="stream_test.task")
    async def task(seconds: float = 0) -> None:
        broker_logger.warning(TASK_STARTED)
        await asyncio.sleep(seconds)

    return broker


broker_logger = logging.getLogger("tests.stream")


def worker(topology: Topology, queue: str, **options: Any) -> WorkerProcess:
    kwargs = {**topology.kwargs(), "queue_name": queue, **options}
    config = {"cls": broker_class(topology).__name__, "kwargs": kwargs}
    return WorkerProcess(f"{__name__}:worker_broker", config=config)


def test_idle_worker_exits_soon_after_sigterm(topology: Topology, unique: str) -> None:
    with worker(topology, f"queue-{unique}") as process:
        process.wait_ready()
        seconds = process.stop(signal.SIGTERM)
    assert seconds < 5, process.output()


async def test_killed_worker_messages_are_finished_by_another(
    broker: BaseStreamBroker, raw_redis: AsyncRedisClient, topology: Topology
) -> None:
    with worker(topology, broker.queue_name, idle_timeout=IDLE_MS) as process:
        process.wait_ready()
        ids = [await kick(broker, 600) for _ in range(3)]  # tasks far longer than the test
        await asyncio.to_thread(process.wait_for_line, TASK_STARTED, 3)
        process.kill()  # SIGKILL, holding three messages
    assert await pending(raw_redis, broker.queue_name) == 3
    stream = broker.listen()
    messages = await receive(stream, 3)
    await stream.aclose()
    assert sorted(parsed(broker, m).task_id for m in messages) == sorted(ids)
    await eventually(lambda: settled(raw_redis, broker.queue_name), "every entry acknowledged")


async def test_task_longer_than_idle_timeout_runs_once(
    make_broker: Callable[..., BaseStreamBroker],
) -> None:
    idle_ms = 1000  # renewed every third of it: a loaded machine's pauses stay well inside
    brokers = [make_broker(idle_timeout=idle_ms), make_broker(idle_timeout=idle_ms)]
    deliveries: list[str] = []
    acked = asyncio.Event()

    async def consume(broker: BaseStreamBroker) -> None:
        async for message in broker.listen():
            deliveries.append(broker.consumer_name)
            await asyncio.sleep(idle_ms * 2.2 / 1000)  # the task outlives idle_timeout
            await message.ack()  # type: ignore[misc]
            acked.set()

    for broker in brokers:
        await broker.startup()
    consumers = [asyncio.ensure_future(consume(broker)) for broker in brokers]
    try:
        await kick(brokers[0], "long")
        await asyncio.wait_for(acked.wait(), PATIENCE)
        await asyncio.sleep(idle_ms / 1000)  # room for a wrong second delivery
    finally:
        for task in consumers:
            task.cancel()
        await asyncio.wait(consumers)
        for broker in brokers:
            await broker.shutdown()
    assert len(deliveries) == 1


async def test_only_what_the_transport_cannot_deliver_goes_to_the_dead_letter_stream(
    make_broker: Callable[..., BaseStreamBroker], raw_redis: AsyncRedisClient
) -> None:
    broker = make_broker(max_deliveries=1)
    await broker.startup()
    queue = broker.queue_name
    try:
        # A consumer that takes a message and dies: its message comes back a second time.
        overdelivered = await kick(broker, "dies once")
        await raw_redis.execute_command(
            "XREADGROUP", "GROUP", "taskiq", "dead", "STREAMS", queue, ">"
        )
        await raw_redis.execute_command("XADD", queue, "*", "other", "no data field")
        await raw_redis.execute_command("XADD", queue, "*", "data", b"\xff not taskiq")
        good = await kick(broker, "fine")
        stream = broker.listen()
        garbage, message = await receive(stream, 2)
        assert garbage.data == b"\xff not taskiq"  # parsing it is the receiver's job
        assert parsed(broker, message).task_id == good
        dead_key = keys.dead_letter_key(queue)

        async def two_dead() -> bool:
            return await length(raw_redis, dead_key) == 2

        # The reclaimed one comes back after idle_timeout, while the worker waits for more.
        waiting = asyncio.ensure_future(receive(stream, 1))
        await eventually(two_dead, "two entries in the dead-letter stream")
        later = await kick(broker, "after the bad ones")
        [message] = await waiting
        await stream.aclose()
        assert parsed(broker, message).task_id == later
        dead = [
            {k.decode(): v for k, v in fields.items()}
            for _, fields in await raw_redis.execute_command("XRANGE", dead_key, "-", "+")
        ]
        reasons = sorted(entry["reason"].decode() for entry in dead)
        assert any("no data field" in reason for reason in reasons)
        assert any("max_deliveries is 1" in reason for reason in reasons)
        for entry in dead:
            assert entry["stream"] == queue.encode()
        [overdone] = [entry for entry in dead if b"max_deliveries" in entry["reason"]]
        assert broker.formatter.loads(overdone["data"]).task_id == overdelivered
        assert overdone["deliveries"] == b"2"
        await eventually(lambda: no_pending(raw_redis, queue), "every entry acknowledged")
    finally:
        await broker.shutdown()


async def test_lost_consumer_group_is_created_again(
    broker: BaseStreamBroker, raw_redis: AsyncRedisClient
) -> None:
    stream = broker.listen()
    await kick(broker, 1)
    await receive(stream, 1)
    await raw_redis.execute_command("DEL", broker.queue_name)  # as a restart without data would
    waiting = asyncio.ensure_future(receive(stream, 1))
    kicked = None

    async def group_exists() -> bool:
        nonlocal kicked
        try:
            groups = await raw_redis.execute_command("XINFO", "GROUPS", broker.queue_name)
        except Exception:  # no stream yet
            return False
        if groups and kicked is None:
            kicked = await kick(broker, 2)
        return bool(groups)

    await eventually(group_exists, "the consumer group is back")
    [message] = await waiting
    await stream.aclose()
    assert parsed(broker, message).task_id == kicked


async def test_script_flush_while_in_use(
    broker: BaseStreamBroker, raw_redis: AsyncRedisClient
) -> None:
    stream = broker.listen()
    await kick(broker, 1)
    await receive(stream, 1)
    await kick(broker, 2)
    [held] = await receive(stream, 1, ack=False)
    await flush_scripts(raw_redis)
    await held.ack()  # type: ignore[misc]
    await kick(broker, 3)
    await receive(stream, 1)
    await stream.aclose()
    await eventually(lambda: settled(raw_redis, broker.queue_name), "every entry acknowledged")


async def test_an_ack_does_not_wait_for_a_paused_server_and_is_made_after(
    broker: BaseStreamBroker, raw_redis: AsyncRedisClient
) -> None:
    """``ack()`` queues the acknowledgement: a task ends without waiting for a slow server, and
    the ack is made once the server answers; the entry is neither lost nor delivered again."""
    stream = broker.listen()
    await kick(broker, 1)
    [held] = await receive(stream, 1, ack=False)
    await pause_server_of(raw_redis, broker.queue_name, 3000)
    await asyncio.wait_for(held.ack(), PATIENCE)  # type: ignore[arg-type]
    # Reads are not paused: the entry is still pending, so ack() returned before the server
    # could make the ack, i.e. without waiting for it (the pause is far longer than a stall).
    assert await pending(raw_redis, broker.queue_name) == 1, "ack() waited for the paused server"
    await eventually(lambda: settled(raw_redis, broker.queue_name), "the ack made")
    await kick(broker, 2)
    [after] = await receive(stream, 1)
    await stream.aclose()
    assert parsed(broker, after).args == [2]  # the acknowledged entry did not come back


async def test_a_clean_stop_sends_the_queued_acks_first(
    make_broker: Callable[..., BaseStreamBroker], raw_redis: AsyncRedisClient
) -> None:
    """A stop makes the acks still queued before it releases what it holds: an acknowledged
    task released first could be reclaimed by another consumer and run a second time."""
    broker = make_broker(idle_timeout=600_000)  # only a release lets another consumer take them
    queue = broker.queue_name
    await broker.startup()
    try:
        await kick(broker, 1)
        await kick(broker, 2)
        stream = broker.listen()
        first, second = await receive(stream, 2, ack=False)
        await stream.aclose()
        await pause_server_of(raw_redis, queue, 1500)  # writes and scripts wait, in order
        await first.ack()  # type: ignore[misc]
        await asyncio.sleep(0.1)  # its ack call is out, waiting in the paused server
        await second.ack()  # type: ignore[misc]  # queued behind it: one ack call at a time
        stopping = asyncio.ensure_future(broker.shutdown())
        await asyncio.sleep(0.2)  # whatever the stop sends at once is out by now
        # Another consumer's reclaim, exactly as it asks: it runs after what is already out.
        reclaim = asyncio.ensure_future(
            raw_redis.xautoclaim(queue, "taskiq", "another-consumer", 600_000, "0-0")
        )
        await asyncio.wait_for(stopping, PATIENCE)
        _, taken, *_ = await asyncio.wait_for(reclaim, PATIENCE)
    finally:
        await broker.shutdown()
    assert taken == [], f"another consumer took acknowledged entries: {taken}"
    assert await settled(raw_redis, queue)


async def pause_server_of(raw: AsyncRedisClient, key: str, ms: int) -> None:
    """CLIENT PAUSE WRITE on the server that holds ``key``: writes and scripts wait, reads don't."""
    pause = ("CLIENT", "PAUSE", ms, "WRITE")
    if isinstance(raw, RedisCluster):
        await raw.exists(key)  # the client learns the slot table on its first command
        node = raw.get_node_from_key(key)
        await raw.execute_command(*pause, target_nodes=node)
    else:
        await raw.execute_command(*pause)  # type: ignore[no-untyped-call]


async def flush_scripts(raw: AsyncRedisClient) -> None:
    if isinstance(raw, RedisCluster):
        await raw.execute_command("SCRIPT FLUSH", target_nodes=RedisCluster.PRIMARIES)
    else:
        await raw.execute_command("SCRIPT FLUSH")  # type: ignore[no-untyped-call]


@pytest.mark.parametrize("topology", ["single"], indirect=True)
async def test_listening_survives_a_server_restart(
    broker: BaseStreamBroker,
    make_broker: Callable[..., BaseStreamBroker],
    raw_redis: AsyncRedisClient,
    redis_servers: RedisServers,
) -> None:
    ids = [await kick(broker, i) for i in range(3)]
    stream = broker.listen()
    received = await receive(stream, 1)
    waiting = asyncio.ensure_future(receive(stream, 5))
    await redis_servers.arestart_standalone(downtime=1)
    # A new producer: the old one's pooled connection died with the server.
    producer = make_broker()
    try:
        ids += [await kick(producer, i) for i in range(3)]
    finally:
        await producer.shutdown()
    received += await waiting
    await stream.aclose()
    assert sorted(parsed(broker, m).task_id for m in received) == sorted(ids)
    await eventually(lambda: no_pending(raw_redis, broker.queue_name), "every entry acknowledged")


async def test_short_socket_timeout_does_not_break_idle_reads(
    make_broker: Callable[..., BaseStreamBroker], caplog: pytest.LogCaptureFixture
) -> None:
    # Blocking reads stay shorter than the socket timeout, so an idle queue is no error.
    broker = make_broker(idle_timeout=600_000, socket_timeout=0.3)
    await broker.startup()
    try:
        stream = broker.listen()
        waiting = asyncio.ensure_future(receive(stream, 1))
        await asyncio.sleep(1.2)
        sent = await kick(broker, "after an idle second")
        [message] = await waiting
        await stream.aclose()
        assert parsed(broker, message).task_id == sent
        assert "failed" not in caplog.text
    finally:
        await broker.shutdown()


def test_options_are_checked_and_kept(
    make_broker: Callable[..., BaseStreamBroker], topology: Topology
) -> None:
    broker = make_broker(
        consumer_name="me", xread_count=7, unacknowledged_lock_timeout=3.0, max_deliveries=2
    )
    assert (broker.consumer_name, broker.count, broker.max_deliveries) == ("me", 7, 2)
    assert (broker.consumer_group_name, broker.consumer_id) == ("taskiq", "$")
    assert broker.block == topology.pick(single=2000, cluster=10000, sentinel=10000)  # as in 1.2
    assert broker.unacknowledged_lock_timeout == 3.0
    for bad in ({"idle_timeout": 0}, {"xread_count": 0}, {"max_deliveries": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            make_broker(**bad)
    with pytest.raises(TypeError, match="unacknowledged_batch_size"):
        make_broker(unacknowledged_batch_size="100")


def test_single_node_class_keeps_the_positional_signature_of_1_2() -> None:
    broker = RedisStreamBroker(
        "redis://127.0.0.1:1", "queue", 5, "group", "consumer", "0", False, 100, 10, False, 900
    )
    assert (broker.queue_name, broker.consumer_group_name, broker.consumer_name) == (
        "queue",
        "group",
        "consumer",
    )
    assert (broker.consumer_id, broker.mkstream, broker.block, broker.maxlen) == (
        "0",
        False,
        100,
        10,
    )
    assert (broker.approximate, broker.idle_timeout) == (False, 900)
    assert broker.connection_pool.max_connections == 5


async def test_a_redis_error_is_logged_with_its_message_and_listening_goes_on(
    make_broker: Callable[..., BaseStreamBroker],
    raw_redis: AsyncRedisClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = make_broker()
    queue = broker.queue_name
    await raw_redis.set(queue, "not a stream")
    await broker.startup()  # cannot create the group: logged, not raised
    try:
        stream = broker.listen()
        waiting = asyncio.ensure_future(receive(stream, 1))

        async def logged() -> bool:
            return f"Reading streams ('{queue}',) failed; retrying" in caplog.text

        await eventually(logged, "the read error is logged")
        await raw_redis.delete(queue)
        kicked = await kick(broker, "once the key is a stream")
        [message] = await waiting
        await stream.aclose()
        assert parsed(broker, message).task_id == kicked
        wrongtype = "WRONGTYPE Operation against a key holding the wrong kind of value"
        # With priority levels the first read is the stream_read script, which names itself.
        assert re.search(
            f"failed; retrying: ResponseError: (script stream_read: )?{wrongtype}", caplog.text
        )
        assert "server:ResponseError" not in caplog.text
    finally:
        await broker.shutdown()


async def test_reads_of_a_busy_queue_hand_over_the_same(
    make_broker: Callable[..., BaseStreamBroker], raw_redis: AsyncRedisClient
) -> None:
    # A full read makes the next one the stream_read script: the same entries must come out.
    broker = make_broker(xread_count=2)
    await broker.startup()
    queue = broker.queue_name
    try:
        sent = [await kick(broker, i) for i in range(3)]
        await raw_redis.execute_command("XADD", queue, "*", "other", "no data field")
        await raw_redis.execute_command("XADD", queue, "*", "data", b"plain", "more", "x")
        sent.append(await kick(broker, 3))
        stream = broker.listen()
        messages = await receive(stream, 5)
        await stream.aclose()
        datas = [m.data for m in messages]
        assert datas[3] == b"plain"  # the entry without data is not handed over
        assert [parsed(broker, m).task_id for i, m in enumerate(messages) if i != 3] == sent
        dead = await raw_redis.execute_command("XRANGE", keys.dead_letter_key(queue), "-", "+")
        assert [fields[b"other"] for _, fields in dead] == [b"no data field"]
        await eventually(lambda: settled(raw_redis, queue), "every entry acknowledged")
    finally:
        await broker.shutdown()


async def test_a_worker_that_is_not_asked_for_more_leaves_new_messages_to_others(
    make_broker: Callable[..., BaseStreamBroker],
) -> None:
    """A listener reads ahead only in a backlog: one whose taskiq holds what it was handed
    (and asks for nothing more) takes no new message from the other workers."""
    full, idle = make_broker(xread_count=4), make_broker(xread_count=4)
    await full.startup()
    await idle.startup()
    full_stream, idle_stream = full.listen(), idle.listen()
    try:
        first = await kick(full, "first")
        [handed] = await receive(full_stream, 1, ack=False)  # a short read: no backlog
        assert parsed(full, handed).task_id == first
        await asyncio.sleep(0.2)
        later = [await kick(full, i) for i in range(3)]
        await asyncio.sleep(0.5)  # time enough for a read ahead, were one under way
        assert [parsed(idle, m).task_id for m in await receive(idle_stream, 3)] == later
    finally:
        await full_stream.aclose()
        await idle_stream.aclose()
        await full.shutdown()
        await idle.shutdown()


async def test_a_draining_listener_holds_at_most_a_quarter_more_than_xread_count(
    make_broker: Callable[..., BaseStreamBroker], raw_redis: AsyncRedisClient
) -> None:
    """Reads ahead, also those started early to look at the levels above, ask only for what
    keeps the entries read and not yet handed over within 1.25 times ``xread_count``."""
    broker = make_broker(xread_count=20)
    await broker.startup()
    queue = broker.queue_name
    stream = broker.listen()
    try:
        await asyncio.gather(*(kick(broker, i) for i in range(150)))
        held = []
        for number in range(100):
            held += await receive(stream, 1, ack=False)  # still pending: counted as handed
            # Taken quickly (a backlog drains), yet slowly enough that the entries held are due
            # for a look at the levels above every few messages.
            await asyncio.sleep(priorities.RECHECK_SECONDS / 3)
            read_not_handed = await pending(raw_redis, queue) - len(held)
            assert read_not_handed <= 25, (number, read_not_handed)
    finally:
        await stream.aclose()
        await broker.shutdown()


@pytest.mark.parametrize("topology", ["single"], indirect=True)
async def test_a_read_on_a_frozen_server_is_given_up_and_sent_again(
    make_broker: Callable[..., BaseStreamBroker],
    redis_servers: RedisServers,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A read that gets no answer at all (no socket timeout, as redis-py 7 has by default, and
    a server that neither answers nor closes) is given up, so the worker goes on afterwards."""
    broker = make_broker(socket_timeout=None)
    await broker.startup()
    stream = broker.listen()
    try:
        waiting = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.5)  # the blocking read is out
        server = redis_servers._standalone_process().proc
        assert server is not None
        pid = server.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(broker.read_patience + 1.5)
        finally:
            os.kill(pid, signal.SIGCONT)
        task_id = await kick(broker, 1)
        message = await asyncio.wait_for(waiting, PATIENCE)
        assert parsed(broker, message).task_id == task_id
        assert "got no answer" in caplog.text
    finally:
        await stream.aclose()
        await broker.shutdown()
