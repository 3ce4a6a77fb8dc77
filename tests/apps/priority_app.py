"""The app a real ``taskiq worker`` runs in the priority tests.

The config names a broker class of this package and its arguments. The one task says when it
starts, then takes as long as it is told, which is how a test sees the order tasks run in.
"""

from __future__ import annotations

import asyncio

from taskiq import AsyncBroker

import taskiq_redis
from tests.worker_process import worker_config

WORK_TASK = "priority_app.work"

_config = worker_config()
broker: AsyncBroker = getattr(taskiq_redis, _config["broker"])(**_config["broker_kwargs"])


@broker.task(task_name=WORK_TASK)
async def work(name: str, seconds: float) -> None:
    """Say that it started, then work for ``seconds``."""
    print(f"started {name}", flush=True)
    await asyncio.sleep(seconds)
