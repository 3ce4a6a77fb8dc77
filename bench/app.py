"""The taskiq app both the benchmark's worker and its client import.

Configured from the environment so one file serves every side and broker:
BENCH_REDIS_URL, BENCH_QUEUE and BENCH_BROKER (``stream`` or ``list``). Classes
are fetched with getattr because our package may not have them yet.
"""

import os
from typing import Any

from taskiq import AsyncBroker

import taskiq_redis

_BROKERS = {"stream": "RedisStreamBroker", "list": "ListQueueBroker"}

_url = os.environ["BENCH_REDIS_URL"]
_broker_class: Any = getattr(taskiq_redis, _BROKERS[os.environ.get("BENCH_BROKER", "stream")])
_backend_class: Any = getattr(taskiq_redis, "RedisAsyncResultBackend")  # noqa: B009

broker: AsyncBroker = _broker_class(_url, queue_name=os.environ.get("BENCH_QUEUE", "bench"))
broker = broker.with_result_backend(_backend_class(_url))


@broker.task(task_name="app:add")
async def add(a: int, b: int) -> int:
    """Trivial on purpose: the figure is the broker's and backend's overhead."""
    return a + b
