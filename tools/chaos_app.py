"""The taskiq app of the fault soak (``tools/chaos.py``): its workers and its producer import it.

Configured from the environment, so the soak's workers and its producer build the same broker:

- ``CHAOS_REDIS_URL``: the Redis server (default ``redis://127.0.0.1:6379``);
- ``CHAOS_QUEUE``: the stream broker's queue name (default ``chaos``);
- ``CHAOS_RUN``: the run id, which names the keys the task writes (default ``local``).

One task, ``record(n)``: sleeps 0-50 ms, then adds ``n`` to the set ``chaos:{run}:done`` and
counts the run in the hash ``chaos:{run}:runs`` (field ``n``), both in one MULTI/EXEC with a
client of its own (one per process, created on first use), and returns ``n``.

The task's own writes are not what the soak tests, so they ride out the faults the soak injects
(connections killed, the server restarting or paused): a connection error is retried for up to
``WRITE_PATIENCE_SECONDS`` and logged as a warning without a traceback. Only a write that stays
impossible that long makes the task fail (and taskiq log a traceback). The retries are the
task's own (redis-py's are off), and the MULTI/EXEC also sets a key unique to this run of the
task: a retry first looks for it, so a write that was applied but whose reply was lost is not
applied twice, and ``chaos:{run}:runs`` counts runs of the task, not attempts to write.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
import uuid

from redis import asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker

URL = os.environ.get("CHAOS_REDIS_URL", "redis://127.0.0.1:6379")
QUEUE = os.environ.get("CHAOS_QUEUE", "chaos")
RUN = os.environ.get("CHAOS_RUN", "local")
DONE_KEY = f"chaos:{RUN}:done"
RUNS_KEY = f"chaos:{RUN}:runs"
# A killed worker's messages are claimed by another consumer after this many ms.
IDLE_TIMEOUT_MS = 3000
# How long the task keeps retrying its own writes while Redis is unreachable.
WRITE_PATIENCE_SECONDS = 30.0
# How long the key that marks one run's write as applied is kept.
TOKEN_SECONDS = 3600
TASK_NAME = "chaos:record"

logger = logging.getLogger("chaos.app")

broker: RedisStreamBroker = RedisStreamBroker(
    URL, queue_name=QUEUE, idle_timeout=IDLE_TIMEOUT_MS
).with_result_backend(RedisAsyncResultBackend[int](URL))

_client: aioredis.Redis | None = None


def _redis() -> aioredis.Redis:
    """The task's own client, created on first use (one per process)."""
    global _client
    if _client is None:
        _client = aioredis.Redis.from_url(URL, retry=Retry(NoBackoff(), 0))
    return _client


@broker.task(task_name=TASK_NAME)
async def record(n: int) -> int:
    """Mark ``n`` done and count this run of it."""
    await asyncio.sleep(random.uniform(0, 0.05))
    token = f"chaos:{RUN}:write:{uuid.uuid4().hex}"
    deadline = time.monotonic() + WRITE_PATIENCE_SECONDS
    attempt = 0
    while True:
        attempt += 1
        try:
            if attempt > 1 and await _redis().exists(token):
                return n  # the last attempt was applied; only its reply was lost
            async with _redis().pipeline(transaction=True) as pipe:
                pipe.sadd(DONE_KEY, n)
                pipe.hincrby(RUNS_KEY, str(n), 1)
                pipe.set(token, 1, ex=TOKEN_SECONDS)
                await pipe.execute()
        except (redis_errors.ConnectionError, redis_errors.TimeoutError) as exc:
            if time.monotonic() >= deadline:
                raise
            logger.warning(
                "record(%d): write attempt %d failed, retrying: %s: %s",
                n,
                attempt,
                type(exc).__name__,
                exc,
            )
            await asyncio.sleep(0.2)
        else:
            return n
