"""The app a real ``taskiq worker`` runs in the operators' and delay tests.

The config names a broker class of this package and its arguments. Tasks print what they do
(with the worker's clock), which is how the tests see them run; ``SmartRetryMiddleware``
re-kicks a failed task with a ``delay`` label, which the broker must honour.
"""

from __future__ import annotations

import asyncio
import time

from taskiq import AsyncBroker, Context, SmartRetryMiddleware, TaskiqDepends

import taskiq_redis
from tests.worker_process import worker_config

RECORD_TASK = "ops_app.record"
FLAKY_TASK = "ops_app.flaky"
HOLD_TASK = "ops_app.hold"
RETRY_DELAY = 2.0

_config = worker_config()
broker: AsyncBroker = getattr(taskiq_redis, _config["broker"])(**_config["broker_kwargs"])
broker.add_middlewares(
    SmartRetryMiddleware(default_retry_count=3, default_delay=RETRY_DELAY, use_jitter=False)
)


@broker.task(task_name=RECORD_TASK)
async def record(name: str) -> None:
    """Say that it ran, and when."""
    print(f"ran {name} at {time.time():.3f}", flush=True)


@broker.task(task_name=FLAKY_TASK, retry_on_error=True)
async def flaky(name: str, context: Context = TaskiqDepends()) -> None:  # noqa: B008
    """Fail the first attempt; SmartRetryMiddleware retries it after RETRY_DELAY seconds."""
    retries = int(context.message.labels.get("_retries", 0))
    print(f"attempt {retries} of {name} at {time.time():.3f}", flush=True)
    if retries == 0:
        raise RuntimeError("first attempt fails on purpose")


@broker.task(task_name=HOLD_TASK)
async def hold(name: str) -> None:
    """Say that it started, take ``hold_seconds`` of the config (0 if unset), say that it ran."""
    print(f"started {name} at {time.time():.3f}", flush=True)
    await asyncio.sleep(float(_config.get("hold_seconds", 0)))
    print(f"ran {name} at {time.time():.3f}", flush=True)
