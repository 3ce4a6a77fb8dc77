"""The app a real ``taskiq worker`` runs in the stream worker tests.

The config (see ``tests.worker_process``) names the stream broker class of the test's topology
and its arguments. Every task logs a line with the tag the test gave it, so the test counts runs
from the worker's log. Two of them lose their ack on their first delivery the ways taskiq loses
one: a middleware that raises after the task ran, and a dependency whose cleanup raises.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Annotated, Any

from taskiq import (
    AsyncBroker,
    Context,
    InMemoryBroker,
    TaskiqDepends,
    TaskiqMessage,
    TaskiqMiddleware,
    TaskiqResult,
)

import taskiq_redis
from tests.worker_process import worker_config

STARTED = "stream app started"  # + tag, + how many tasks run at this moment
RAN = "stream app ran"  # + tag
SLEEP, BAD_MIDDLEWARE, BAD_CLEANUP = "stream_app.sleep", "stream_app.middle", "stream_app.clean"

logger = logging.getLogger("tests.stream_app")
_seen: set[str] = set()  # task ids that already failed once in this process
_running = 0


def first_time(task_id: str) -> bool:
    """Whether this is the first delivery of the task to this worker."""
    first = task_id not in _seen
    _seen.add(task_id)
    return first


class RaisesOnFirstDelivery(TaskiqMiddleware):
    """Raises after the ``stream_app.middle`` task ran, the first time: taskiq skips the ack."""

    def post_execute(self, message: TaskiqMessage, result: TaskiqResult[Any]) -> None:
        if message.task_name == BAD_MIDDLEWARE and first_time(message.task_id):
            raise RuntimeError("post_execute fails")


def build_broker(config: dict[str, Any]) -> AsyncBroker:
    """The broker the config names; imported without one (by the tests, for its names), none."""
    if not config:
        return InMemoryBroker()
    broker: AsyncBroker = getattr(taskiq_redis, config["cls"])(**config["kwargs"])
    return broker.with_middlewares(RaisesOnFirstDelivery())


broker = build_broker(worker_config())


@broker.task(task_name=SLEEP)
async def sleep(seconds: float, tag: str) -> None:
    global _running
    _running += 1
    logger.warning("%s %s %d", STARTED, tag, _running)
    try:
        await asyncio.sleep(seconds)
    finally:
        _running -= 1
    logger.warning("%s %s", RAN, tag)


@broker.task(task_name=BAD_MIDDLEWARE)
async def middle(tag: str) -> None:
    logger.warning("%s %s", RAN, tag)


def cleanup_raises_once(context: Annotated[Context, TaskiqDepends()]) -> Iterator[None]:
    yield
    if first_time(context.message.task_id):
        raise RuntimeError("dependency cleanup fails")


@broker.task(task_name=BAD_CLEANUP)
async def clean(tag: str, _: Annotated[None, TaskiqDepends(cleanup_raises_once)]) -> None:
    logger.warning("%s %s", RAN, tag)
