"""The app a real ``taskiq worker`` runs in the scheduler test: a broker, a backend, one task.

The test names the broker and backend classes of its topology and their arguments in the
worker config (see ``tests.worker_process``).
"""

from __future__ import annotations

from typing import Any

from taskiq import AsyncBroker

import taskiq_redis
from tests.worker_process import worker_config

ADD_TASK = "schedule_app.add"


def build_broker(config: dict[str, Any]) -> AsyncBroker:
    """The broker, with its result backend, that ``config`` describes."""
    backend = getattr(taskiq_redis, config["backend"])(**config["backend_kwargs"])
    broker: AsyncBroker = getattr(taskiq_redis, config["broker"])(**config["broker_kwargs"])
    return broker.with_result_backend(backend)


broker = build_broker(worker_config())


@broker.task(task_name=ADD_TASK)
async def add(a: int, b: int) -> int:
    """What the scheduled task does; its result is how the test sees that it ran."""
    return a + b
