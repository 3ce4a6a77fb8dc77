"""The app of the outage tests' real ``taskiq worker``: a broker, its result backend, one task.

The task appends its number to a file the test names, so the test counts what ran (and what
ran twice) outside Redis, whatever Redis lost. The config (see ``tests.worker_process``) names
the broker and backend classes and their arguments, and the file.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from taskiq import AsyncBroker

import taskiq_redis
from tests.worker_process import worker_config

RECORD_TASK = "outage_app.record"


def build_broker(config: dict[str, Any]) -> AsyncBroker:
    """The broker, with its result backend when the config names one."""
    broker: AsyncBroker = getattr(taskiq_redis, config["broker"])(**config["broker_kwargs"])
    if config.get("backend"):
        backend = getattr(taskiq_redis, config["backend"])(**config["backend_kwargs"])
        broker = broker.with_result_backend(backend)
    return broker


config = worker_config()
broker = build_broker(config)


@broker.task(task_name=RECORD_TASK)
async def record(number: int, seconds: float = 0.0) -> int:
    """Note that task ``number`` ran, in one O_APPEND write, then return the number."""
    if seconds:
        await asyncio.sleep(seconds)
    fd = os.open(config["record"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{number}\n".encode())
    finally:
        os.close(fd)
    return number
