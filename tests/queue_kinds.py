"""What the delay and priority tests share: the two queue brokers, built for any topology,
and real taskiq messages that can be told apart once received.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from taskiq import AsyncBroker, BrokerMessage, TaskiqMessage
from taskiq.formatters.json_formatter import JSONFormatter

import taskiq_redis
from taskiq_redis.brokers.base import BaseRedisBroker
from tests.servers import Topology

KINDS = ("stream", "list")


def broker_class(kind: str, topology: Topology) -> str:
    """The public class name of the ``kind`` broker ("stream" or "list") on ``topology``."""
    if kind == "stream":
        return topology.pick(
            single="RedisStreamBroker",
            cluster="RedisStreamClusterBroker",
            sentinel="RedisStreamSentinelBroker",
        )
    return topology.pick(
        single="ListQueueBroker",
        cluster="ListQueueClusterBroker",
        sentinel="ListQueueSentinelBroker",
    )


def make_broker(kind: str, topology: Topology, queue: str, **options: Any) -> BaseRedisBroker:
    broker: BaseRedisBroker = getattr(taskiq_redis, broker_class(kind, topology))(
        **topology.kwargs(), queue_name=queue, **options
    )
    return broker


def message(
    body: str, task_name: str = "t", args: list[Any] | None = None, **labels: Any
) -> BrokerMessage:
    """A real taskiq message with id ``body``; labels given as None are left out."""
    labels = {name: value for name, value in labels.items() if value is not None}
    payload = TaskiqMessage(
        task_id=body, task_name=task_name, labels=labels, args=args or [], kwargs={}
    )
    return BrokerMessage(
        task_id=body,
        task_name=task_name,
        message=JSONFormatter().dumps(payload).message,
        labels=labels,
    )


def body_of(received: Any) -> str:
    """The id of a received message (bytes, or an AckableMessage)."""
    data = received if isinstance(received, bytes) else received.data
    task_id: str = json.loads(data)["task_id"]
    return task_id


async def acked(received: Any) -> Any:
    if not isinstance(received, bytes) and (ack := received.ack()) is not None:
        await ack
    return received


async def receive(broker: AsyncBroker, count: int, timeout: float = 15) -> AsyncIterator[Any]:
    """The next ``count`` messages of ``broker``, each acknowledged as it is yielded."""
    listener = broker.listen()
    try:
        for _ in range(count):
            yield await acked(await asyncio.wait_for(anext(listener), timeout))
    finally:
        await listener.aclose()
