"""Delayed messages: a sorted set beside each queue, and the mover that feeds the queue from it.

taskiq's ``delay`` label (seconds; ``SmartRetryMiddleware`` sets it on every retry) parks a
message in ``{queue}:delayed`` (same cluster slot as the queue) scored by its due time, taken
from the Redis server's clock inside ``delay_add`` so producers and workers never disagree about
time. Every listening worker runs a :class:`Mover`: the ``delay_move`` script moves what is due
to the queue (XADD for a stream, LPUSH for a list) and deletes it from the set in one atomic
step, so any number of workers racing never move a message twice, and a worker killed at any
point loses nothing: the set lives in Redis and is persisted with it.

A member is ``<16 hex digits>:<priority level>:<message>``: the random id keeps two identical
messages from collapsing into one member, and the level says which of the queue's priority keys
the message goes to when it is due.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from redis.exceptions import RedisError
from taskiq import BrokerMessage

from taskiq_redis import keys, scripts
from taskiq_redis.connection import RedisConnection
from taskiq_redis.diagnostics import describe

logger = logging.getLogger("taskiq.redis_broker")

DELAY_LABEL = "delay"
ADD, MOVE = "delay_add", "delay_move"
# The most messages one mover call moves; a full batch is followed at once by the next.
MOVE_BATCH = 100
# The longest a mover sleeps between two calls. A message delayed by another process is seen at
# most this late; one whose due time the last call reported is moved on time.
POLL_SECONDS = 0.5
# The longest a mover waits after a failure before trying again.
RETRY_SECONDS = 2.0

QueueKind = Literal["stream", "list"]


def delay_ms(labels: Mapping[str, Any]) -> int | None:
    """The ``delay`` label in whole milliseconds, or None when the message is due now.

    The label may be an int, a float or a string of one (taskiq sends labels as strings over
    some formatters). A delay of 0 or less means "send at once". Anything else is refused with
    an error naming the label, before the message is sent, so no message is parked forever.
    """
    value = labels.get(DELAY_LABEL)
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"the delay label must be a number of seconds, got {value!r}")
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"the delay label must be a number of seconds, got {value!r}") from None
    if not math.isfinite(seconds):
        raise ValueError(f"the delay label must be a finite number of seconds, got {value!r}")
    milliseconds = math.ceil(seconds * 1000)
    return milliseconds if milliseconds > 0 else None


def member(message: bytes, level: int = 0) -> bytes:
    """The delayed set's member for ``message``, to go to priority ``level`` when due."""
    return b"%s:%d:%s" % (secrets.token_hex(8).encode(), level, message)


async def add(
    conn: RedisConnection, queue: str, message: bytes, milliseconds: int, level: int = 0
) -> int:
    """Park ``message`` for ``milliseconds``; returns its due time (server clock, ms)."""
    due: int = await scripts.run(
        conn, scripts.get(ADD), [keys.delayed_key(queue)], [milliseconds, member(message, level)]
    )
    return due


async def defer(conn: RedisConnection, queue: str, message: BrokerMessage, level: int = 0) -> bool:
    """Park ``message`` if its ``delay`` label asks for a wait; False: it is to be sent now."""
    milliseconds = delay_ms(message.labels)
    if milliseconds is None:
        return False
    await add(conn, queue, message.message, milliseconds, level)
    return True


async def move_due(
    conn: RedisConnection,
    queue: str,
    kind: QueueKind,
    levels: Sequence[str] = (),
    trim: tuple[int, bool] | None = None,
    batch: int = MOVE_BATCH,
) -> tuple[int, int | None]:
    """Move one batch of what is due to the queue.

    ``levels`` are the queue's keys by priority level (level 0 first; default: the queue alone);
    ``trim`` is a stream's (MAXLEN, approximate). Returns how many were moved and the
    milliseconds until the next one is due (None: nothing is left).
    """
    maxlen, approximate = trim or (0, True)
    moved, wait = await scripts.run(
        conn,
        scripts.get(MOVE),
        [keys.delayed_key(queue), keys.unique_key(queue), *(levels or [queue])],
        [kind, batch, maxlen, int(approximate)],
    )
    return int(moved), None if int(wait) < 0 else int(wait)


class Mover:
    """Keeps moving due messages of some queues while a worker listens.

    One task per worker; it sleeps until the next known due time, or :data:`POLL_SECONDS` at
    most, so a message delayed elsewhere starts within about that of its due time on an idle
    worker. A failing Redis is logged and retried; the mover never ends the worker.
    """

    def __init__(
        self,
        conn: RedisConnection,
        queues: Mapping[str, Sequence[str]],
        kind: QueueKind,
        trim: tuple[int, bool] | None = None,
    ) -> None:
        self._conn = conn
        self._queues = {queue: list(levels) for queue, levels in queues.items()}
        self._kind: QueueKind = kind
        self._trim = trim
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    def start(self) -> None:
        """Start moving in the background, once; later calls do nothing."""
        if self._task is None:
            self._stopping.clear()
            self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        """Stop after the call in flight (so its reply is not cut off), waiting a few seconds."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping.set()
        done, _ = await asyncio.wait({task}, timeout=RETRY_SECONDS + 3)
        if not done:
            task.cancel()

    async def run_once(self) -> float:
        """Move everything due now; seconds until the next due message (at most the poll)."""
        pause = POLL_SECONDS
        for queue, levels in self._queues.items():
            total = 0
            while True:
                moved, wait = await move_due(self._conn, queue, self._kind, levels, self._trim)
                total += moved
                if moved < MOVE_BATCH:
                    break
            if total:
                logger.debug("Moved %d due delayed messages to %r", total, queue)
            if wait is not None:
                pause = min(pause, wait / 1000)
        return pause

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                pause = await self.run_once()
            except (RedisError, OSError) as exc:
                logger.warning("Moving due delayed messages failed; retrying: %s", describe(exc))
                pause = RETRY_SECONDS
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), pause)
