"""What the list and stream brokers do with a task by its id: unique kicks, and cancelling.

**Unique kicks.** A message labelled ``unique`` (``kicker().with_labels(unique=True)`` or
``@broker.task(unique=True)``) is dropped when a message of the same task id is already queued,
delayed, or (stream) held by a worker and not yet acknowledged: ``task_unique_add`` checks and
enqueues in one atomic step, and records where the message went in ``{queue}:unique``. An id is
free again as soon as its message is gone, whatever ended it (acknowledged, dead-lettered,
cancelled, purged, trimmed, popped from a list): the record of a message that is gone is stale
and ignored. Kicks without the label do not touch any of this.

**Cancel.** ``task_cancel`` deletes a task's message if no worker has taken it yet: at once
through the unique index for a unique message, else by looking, a bounded slice per script
call, in the delayed set and every priority level for bytes only that message holds. taskiq's
JSON formatter (its default) writes ``"task_id":"<id>"`` into every message; with another
formatter only unique messages can be found. A queue that never cancels pays nothing.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from taskiq_redis import keys, scripts
from taskiq_redis.connection import RedisConnection

UNIQUE_LABEL = "unique"
ADD, CANCEL = "task_unique_add", "task_cancel"
# Messages one cancel call looks at: about 2 ms of the server's time for a stream.
CANCEL_SLICE = 2000
_TRUE = frozenset({"1", "true", "yes", "on"})

QueueKind = Literal["stream", "list"]


def is_unique(labels: Mapping[str, Any]) -> bool:
    """Whether the ``unique`` label asks for an idempotent kick (True, or a true-ish string)."""
    value = labels.get(UNIQUE_LABEL)
    if value is None or value is False:
        return False
    if value is True:
        return True
    if isinstance(value, (str, bytes)):
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        return text.strip().lower() in _TRUE
    if isinstance(value, int):
        return value != 0
    raise ValueError(f"the {UNIQUE_LABEL} label must be true or false, got {value!r}")


def level_keys(queue: str, max_priority: int) -> list[str]:
    """The queue's keys by priority level, level 0 (the queue itself) first."""
    return [keys.priority_key(queue, level) for level in range(max_priority + 1)]


@dataclass(frozen=True)
class Queue:
    """Where a queue's messages can be: its kind, its levels, and (stream) its group."""

    name: str
    kind: QueueKind
    max_priority: int
    group: str = "taskiq"

    def script_keys(self) -> list[str]:
        return [
            keys.unique_key(self.name),
            keys.delayed_key(self.name),
            *level_keys(self.name, self.max_priority),
        ]


async def kick_unique(
    conn: RedisConnection,
    queue: Queue,
    task_id: str,
    message: bytes,
    level: int,
    delay_ms: int | None,
    trim: tuple[Any, ...] = (),
) -> bool:
    """Queue (or delay) ``message`` unless its task id is already there; whether it went."""
    head = b"%s:%d:" % (task_id.encode().hex().encode(), level)
    maxlen, mode = maxlen_args(trim)
    added = await scripts.run(
        conn,
        scripts.get(ADD),
        queue.script_keys(),
        [queue.kind, task_id, level, delay_ms or 0, message, head, queue.group, maxlen, mode],
    )
    return bool(added)


def maxlen_args(trim: tuple[Any, ...]) -> tuple[Any, str]:
    """A stream kick's ``MAXLEN [~] n`` arguments as a script takes them: (n or '', '~' or '=')."""
    return ("", "~") if not trim else (trim[-1], "~" if "~" in trim else "=")


def needle(task_id: str) -> bytes:
    """The bytes that only a taskiq JSON message of ``task_id`` holds."""
    return b'"task_id":' + json.dumps(task_id).encode()


async def cancel(conn: RedisConnection, queue: Queue, task_id: str) -> bool:
    """Delete the task's message if it is queued or delayed; False when it is not (a worker
    took it, it is done, or it is unknown). A running task is never interrupted."""
    script = scripts.get(CANCEL)
    script_keys = queue.script_keys()
    mark = f"taskiq-redis cancel mark {uuid.uuid4().hex}"
    phase, position = 0, ""
    while True:
        outcome, phase, position = await scripts.run(
            conn,
            script,
            script_keys,
            [
                queue.kind,
                task_id,
                needle(task_id),
                queue.group,
                phase,
                position,
                CANCEL_SLICE,
                mark,
            ],
        )
        outcome = outcome.decode() if isinstance(outcome, bytes) else str(outcome)
        if outcome != "more":
            return outcome == "cancelled"
        position = position.decode() if isinstance(position, bytes) else str(position)


async def cancel_many(
    conn: RedisConnection, queue: Queue, task_ids: Sequence[str]
) -> dict[str, bool]:
    """:func:`cancel` for each id, in order."""
    return {task_id: await cancel(conn, queue, task_id) for task_id in task_ids}
