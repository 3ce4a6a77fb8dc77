"""Issue 24, item 5: a broker refuses, or warns of, what it would otherwise silently drop.

- The pub/sub broker refuses a ``delay`` or ``priority`` label in ``kick`` (nothing is sent).
- A broker refuses, when it is built, an option of another broker type (``max_deliveries`` on
  the list broker), which would otherwise fail every connection it opens.
- A list worker warns, once per level, of messages at levels above its ``max_priority``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from typing import Any, Literal

import pytest
import redis.asyncio.cluster

import taskiq_redis
from taskiq_redis import connection, keys, queues
from taskiq_redis.brokers import base, levels_watch
from taskiq_redis.brokers.pubsub import BasePubSubBroker
from tests.queue_kinds import make_broker
from tests.servers import Topology
from tests.test_list_queue_broker import PATIENCE, eventually, message
from tests.test_pubsub_broker import Listener, subscribed

STREAM_ONLY = ["max_deliveries", "idle_timeout", "xread_count", "consumer_group_name", "maxlen"]


def pubsub_class(topology: Topology) -> Any:
    return getattr(
        taskiq_redis,
        topology.pick(
            single="PubSubBroker", cluster="PubSubClusterBroker", sentinel="PubSubSentinelBroker"
        ),
    )


def list_class(topology: Topology) -> Any:
    return getattr(
        taskiq_redis,
        topology.pick(
            single="ListQueueBroker",
            cluster="ListQueueClusterBroker",
            sentinel="ListQueueSentinelBroker",
        ),
    )


@pytest.mark.parametrize(
    ("labels", "named"),
    [
        ({"delay": 5}, "delay=5"),
        ({"delay": "0.5"}, "delay='0.5'"),
        ({"priority": 7}, "priority=7"),
        ({"priority": "0"}, "priority='0'"),
    ],
)
async def test_pubsub_kick_refuses_delay_and_priority(
    topology: Topology, raw_redis: Any, unique: str, labels: dict[str, Any], named: str
) -> None:
    if topology.name == "cluster" and not hasattr(redis.asyncio.cluster, "ClusterPubSub"):
        pytest.skip("PubSubClusterBroker needs redis-py 8")
    channel = f"channel-{unique}"
    publisher: BasePubSubBroker = pubsub_class(topology)(**topology.kwargs(), queue_name=channel)
    worker: BasePubSubBroker = pubsub_class(topology)(**topology.kwargs(), queue_name=channel)
    await publisher.startup()
    listener = Listener(worker)
    try:
        await subscribed(raw_redis, topology, channel, 1)
        with pytest.raises(ValueError, match="the pub/sub broker cannot") as refused:
            await publisher.kick(message(b"refused", **labels))
        assert named in str(refused.value)
        assert "\n" not in str(refused.value)
        await publisher.kick(message(b"plain"))
        await publisher.kick(message(b"due now", delay=0))  # a delay of 0 asks for no wait
        assert await listener.take(2) == [b"plain", b"due now"]
        await asyncio.sleep(0.3)
        assert listener.received.empty()
    finally:
        await listener.stop()
        await publisher.shutdown()
        await worker.shutdown()


@pytest.mark.parametrize("option", [*STREAM_ONLY, "batch_size", "max_priority"])
@pytest.mark.parametrize("kind", ["list", "pubsub"])
async def test_an_option_of_another_broker_type_is_refused_when_built(
    topology: Topology, unique: str, kind: str, option: str
) -> None:
    cls = list_class(topology) if kind == "list" else pubsub_class(topology)
    if kind == "list" and option in ("batch_size", "max_priority"):
        # The list broker's own options: taken, and the broker starts and stops.
        broker = cls(**topology.kwargs(), queue_name=f"q{unique}", **{option: 3})
        await broker.startup()
        await broker.shutdown()
        return
    with pytest.raises(TypeError) as refused:
        cls(**topology.kwargs(), queue_name=f"q{unique}", **{option: 3})
    assert f"{cls.__name__} does not take the option {option!r}" in str(refused.value)


def own_options(cls: type) -> set[str]:
    """The options of a broker class beyond those every broker type takes."""
    common = {
        "self",
        "url",
        "sentinels",
        "master_name",
        "min_other_sentinels",
        "sentinel_kwargs",
        "queue_name",
        "max_connection_pool_size",
        "result_backend",
        "task_id_generator",
        "connection_kwargs",
    }
    return set(inspect.signature(cls).parameters) - common


@pytest.mark.parametrize(
    ("kind", "classes"),
    [
        ("stream", ["RedisStreamBroker", "RedisStreamClusterBroker", "RedisStreamSentinelBroker"]),
        ("list queue", ["ListQueueBroker", "ListQueueClusterBroker", "ListQueueSentinelBroker"]),
    ],
)
def test_the_refused_options_are_those_of_the_broker_classes(kind: str, classes: list[str]) -> None:
    """A new option of a broker type must be refused by the others too."""
    for name in classes:
        assert own_options(getattr(taskiq_redis, name)) == base.BROKER_OPTIONS[kind], name


@pytest.mark.parametrize("kind", ["list", "stream"])
async def test_a_worker_warns_once_of_levels_above_its_max_priority(
    topology: Topology,
    unique: str,
    kind: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    queue = f"levels{unique}"
    monkeypatch.setattr(levels_watch, "CHECK_SECONDS", 0.2)
    producer = make_broker(kind, topology, queue)  # max_priority 9
    worker = make_broker(kind, topology, queue, max_priority=3)
    await producer.startup()
    await worker.startup()
    await producer.kick(message(b"never read", priority=7))
    await producer.kick(message(b"read", priority=2))
    listener = worker.listen()

    def warnings(level: int) -> list[str]:
        return [
            record.getMessage()
            for record in caplog.records
            if record.levelno == logging.WARNING and f"priority level {level}," in record.message
        ]

    async def warned(level: int) -> bool:
        return bool(warnings(level))

    try:
        with caplog.at_level(logging.WARNING, "taskiq.redis_broker"):
            received = await asyncio.wait_for(anext(listener), PATIENCE)
            assert getattr(received, "data", received) == b"read"
            await eventually(lambda: warned(7), "a warning about level 7")
            await producer.kick(message(b"also never read", priority=8))
            await eventually(lambda: warned(8), "a warning about level 8")
            await asyncio.sleep(0.6)  # three more looks: no warning is repeated
        [about_7] = warnings(7)
        assert f"Queue {queue!r} holds messages at priority level 7" in about_7
        assert "above this worker's max_priority 3" in about_7
        assert len(warnings(8)) == 1
    finally:
        with contextlib.suppress(Exception):
            await listener.aclose()
        await worker.shutdown()
        await producer.shutdown()


async def test_a_list_worker_reading_every_level_says_nothing(
    topology: Topology, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    queue = f"quiet{unique}"
    broker = list_class(topology)(**topology.kwargs(), queue_name=queue)
    await broker.startup()
    await broker.kick(message(b"m", priority=9))
    listener = broker.listen()
    try:
        with caplog.at_level(logging.WARNING, "taskiq.redis_broker"):
            assert await asyncio.wait_for(anext(listener), PATIENCE) == b"m"
            await asyncio.sleep(0.3)
        assert "above this worker's max_priority" not in caplog.text
    finally:
        await listener.aclose()
        await broker.shutdown()


@pytest.mark.parametrize("kind", ["list", "stream"])
async def test_levels_above_finds_the_levels_that_hold_messages(
    topology: Topology, raw_redis: Any, unique: str, kind: Literal["list", "stream"]
) -> None:
    """The check a worker of either queue kind can run (the stream broker's too)."""
    queue = f"above{unique}"
    factory = topology.pick(single="single_node", cluster="cluster", sentinel="sentinel")
    conn = getattr(connection, factory)(**topology.kwargs())
    try:
        assert await queues.levels_above(conn, queue, 3, kind) == []
        for level in (2, 15, 40):
            if kind == "list":
                await raw_redis.lpush(keys.priority_key(queue, level), "m")
            else:
                await raw_redis.xadd(keys.priority_key(queue, level), {"data": "m"})
        if kind == "stream":  # an empty level stream, as a producer's startup creates it
            await raw_redis.xgroup_create(keys.priority_key(queue, 20), "g", mkstream=True)
        assert await queues.levels_above(conn, queue, 3, kind) == [15, 40]
        assert await queues.levels_above(conn, queue, 15, kind) == [40]
        assert await queues.levels_above(conn, queue, 99, kind) == []
    finally:
        await conn.close()


async def test_a_list_option_given_to_a_stream_broker_is_refused_when_built(
    topology: Topology, unique: str
) -> None:
    cls: Any = type(make_broker("stream", topology, f"q{unique}"))
    with pytest.raises(TypeError) as refused:
        cls(**topology.kwargs(), queue_name=f"q{unique}", batch_size=5)
    assert f"{cls.__name__} does not take the option 'batch_size'" in str(refused.value)
