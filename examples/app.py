"""The package's documented example: a stream broker with a Redis result backend."""

import os

from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker

REDIS_URL = os.environ.get("REDIS_URL", "redis://localhost:6379")

result_backend: RedisAsyncResultBackend[object] = RedisAsyncResultBackend(redis_url=REDIS_URL)
broker = RedisStreamBroker(url=REDIS_URL).with_result_backend(result_backend)


@broker.task
async def add(a: int, b: int) -> int:
    """A task small enough that the run shows the queue, not the work."""
    return a + b
