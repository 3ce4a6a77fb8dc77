"""The app a real ``taskiq worker`` runs in the unique-kick and cancel tests.

The config names a broker and a result backend class of this package and their arguments. The
task says when it starts and finishes, so a test counts runs in the log and sees whether two
overlapped, and returns its argument.
"""

from __future__ import annotations

import asyncio

from taskiq import AsyncBroker

import taskiq_redis
from tests.worker_process import worker_config

TASK = "task_ids_app.echo"

_config = worker_config()
broker: AsyncBroker = getattr(taskiq_redis, _config["broker"])(**_config["broker_kwargs"])
broker = broker.with_result_backend(
    getattr(taskiq_redis, _config["backend"])(**_config["backend_kwargs"])
)


@broker.task(task_name=TASK, unique=True)
async def echo(value: int, seconds: float = 0.0) -> int:
    """Say that it runs, wait ``seconds``, and return ``value``."""
    print(f"ran {value}", flush=True)
    await asyncio.sleep(seconds)
    print(f"finished {value}", flush=True)
    return value
