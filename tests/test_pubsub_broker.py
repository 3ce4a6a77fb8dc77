"""The pub/sub brokers on every topology, seen through what a taskiq user calls."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio.cluster
from redis.asyncio import RedisCluster
from redis.exceptions import ConnectionError

from taskiq_redis import PubSubBroker, PubSubClusterBroker, PubSubSentinelBroker
from taskiq_redis.brokers.pubsub import BasePubSubBroker
from tests.servers import AsyncRedisClient, RedisServers, Topology
from tests.test_list_queue_broker import PATIENCE, eventually, idle_worker_exit_seconds, message


def broker_class(topology: Topology) -> type[BasePubSubBroker]:
    return topology.pick(
        single=PubSubBroker, cluster=PubSubClusterBroker, sentinel=PubSubSentinelBroker
    )  # type: ignore[return-value]  # mypy joins the three classes to their metaclass


@pytest.fixture(autouse=True)
def cluster_pubsub_needs_redis_py_8(request: pytest.FixtureRequest) -> None:
    """redis-py 7 has no asyncio cluster pub/sub; test_dropin checks the broker says so."""
    too_old = not hasattr(redis.asyncio.cluster, "ClusterPubSub")
    too_old = too_old and "topology" in request.fixturenames
    if too_old and request.getfixturevalue("topology").name == "cluster":
        pytest.skip("PubSubClusterBroker needs redis-py 8")


@pytest.fixture
async def make_broker(
    topology: Topology, unique: str
) -> AsyncIterator[Callable[..., BasePubSubBroker]]:
    """Build started brokers of this topology on this test's channel; shut them down after."""
    made: list[BasePubSubBroker] = []

    def make(**options: Any) -> BasePubSubBroker:
        options.setdefault("queue_name", f"channel-{unique}")
        broker = broker_class(topology)(**topology.kwargs(), **options)
        made.append(broker)
        return broker

    yield make
    for broker in made:
        await broker.shutdown()


class Listener:
    """A broker's ``listen()`` running in the background, as a worker runs it."""

    def __init__(self, broker: BasePubSubBroker) -> None:
        self.channel = broker.queue_name
        self.received: asyncio.Queue[bytes] = asyncio.Queue()
        self._task = asyncio.ensure_future(self._run(broker))

    async def _run(self, broker: BasePubSubBroker) -> None:
        async with contextlib.aclosing(broker.listen()) as stream:
            async for data in stream:
                self.received.put_nowait(data)

    async def take(self, count: int) -> list[bytes]:
        """The next ``count`` messages received."""

        async def take() -> list[bytes]:
            return [await self.received.get() for _ in range(count)]

        return await asyncio.wait_for(take(), PATIENCE)

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@pytest.fixture
async def listen(
    raw_redis: AsyncRedisClient, topology: Topology
) -> AsyncIterator[Callable[..., Awaitable[list[Listener]]]]:
    """Start listening with each broker given; returns once all of them are subscribed."""
    started: list[Listener] = []

    async def start(*brokers: BasePubSubBroker) -> list[Listener]:
        listeners = [Listener(broker) for broker in brokers]
        started.extend(listeners)
        channel = brokers[0].queue_name
        count = sum(listener.channel == channel for listener in started)
        await subscribed(raw_redis, topology, channel, count)
        return listeners

    yield start
    for listener in started:
        await listener.stop()


async def subscribed(raw: AsyncRedisClient, topology: Topology, channel: str, count: int) -> None:
    """Wait until ``count`` sessions listen to ``channel``.

    On a cluster it is a shard channel, counted by the node that owns its slot.
    """

    async def enough() -> bool:
        with contextlib.suppress(ConnectionError):  # the server may be coming back
            return await count_subscribers() >= count
        return False

    async def count_subscribers() -> int:
        if isinstance(raw, RedisCluster):
            node = (await raw.initialize()).get_node_from_key(channel)
            reply = await raw.execute_command("PUBSUB SHARDNUMSUB", channel, target_nodes=node)
        else:
            reply = await raw.execute_command("PUBSUB NUMSUB", channel)  # type: ignore[no-untyped-call]
        return int(reply[0][1])

    await eventually(enough, f"{count} subscribers on {channel}")


Listen = Callable[..., Awaitable[list[Listener]]]


async def test_every_listener_gets_every_message_intact(
    make_broker: Callable[..., BasePubSubBroker], listen: Listen, topology: Topology
) -> None:
    publisher = make_broker()
    await publisher.startup()
    public = topology.pick(single="connection_pool", cluster="redis", sentinel="sentinel")
    assert getattr(publisher, public) is not None
    listeners = await listen(make_broker(), make_broker())
    sent = [bytes(range(256)) + b"\x00 end", b"second"]
    for data in sent:
        await publisher.kick(message(data))
    # Only published messages come out: subscribe confirmations are not among them.
    for listener in listeners:
        assert await listener.take(2) == sent


async def test_queue_name_label_publishes_to_that_channel(
    make_broker: Callable[..., BasePubSubBroker], listen: Listen, unique: str
) -> None:
    publisher = make_broker()
    [listener] = await listen(make_broker(queue_name=f"other-{unique}"))
    await publisher.kick(message(b"elsewhere", queue_name=f"other-{unique}"))
    assert await listener.take(1) == [b"elsewhere"]


async def test_a_message_published_while_nobody_listens_is_gone(
    make_broker: Callable[..., BasePubSubBroker], listen: Listen
) -> None:
    publisher = make_broker()
    await publisher.kick(message(b"nobody hears this"))
    [listener] = await listen(make_broker())
    await publisher.kick(message(b"heard"))
    assert await listener.take(1) == [b"heard"]


@pytest.mark.parametrize("topology", ["single"], indirect=True)
async def test_listening_survives_a_server_restart(
    make_broker: Callable[..., BasePubSubBroker],
    listen: Listen,
    raw_redis: AsyncRedisClient,
    topology: Topology,
    redis_servers: RedisServers,
) -> None:
    publisher = make_broker()
    [listener] = await listen(make_broker())
    await publisher.kick(message(b"before"))
    assert await listener.take(1) == [b"before"]
    await redis_servers.arestart_standalone(downtime=1)
    # Pub/sub keeps nothing: only a message sent once the listener is back can arrive.
    await subscribed(raw_redis, topology, publisher.queue_name, 1)
    # A new producer: the old one's idle pooled connection died with the server, and
    # redis-py's default is not to retry the command that finds that out.
    await make_broker().kick(message(b"after"))
    assert await listener.take(1) == [b"after"]


def test_idle_worker_exits_soon_after_sigterm(topology: Topology, unique: str) -> None:
    assert idle_worker_exit_seconds(broker_class(topology), topology, f"channel-{unique}") < 5
