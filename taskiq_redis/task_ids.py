"""What the list and stream brokers do with a task by its id: unique kicks, and cancelling.

**The task index.** A kick labelled ``unique``, or ``cancellable`` in a stream queue, goes
through ``task_add``, which records where its message went in ``{queue}:unique`` (task id ->
place), so ``cancel`` finds it at once however long the queue. A record whose message is gone
(acknowledged, dead-lettered, cancelled, purged, trimmed, popped from a list) is stale and
ignored; an index with well over twice as many records as the queue has messages is swept as
kicks come. Kicks without either label do not touch any of this.

**Unique kicks.** A message labelled ``unique`` (``kicker().with_labels(unique=True)`` or
``@broker.task(unique=True)``) is dropped when a message of the same task id is already queued,
delayed, or (stream) held by a worker and not yet acknowledged: ``task_add`` checks and enqueues
in one atomic step.

**Cancel.** ``task_cancel`` deletes a task's message if no worker has taken it yet: at once
through the index for a recorded message, else by looking, a bounded slice per script call, in
the delayed set and every priority level (a stream's after what its group was handed) for bytes
only that message holds: its task id after ``"task_id":``, as taskiq's JSON (its default
format, with or without a space after the colon) writes it. With another formatter only
recorded messages can be found. A queue that never cancels pays nothing.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from taskiq_redis import keys, scripts
from taskiq_redis.connection import RedisConnection

UNIQUE_LABEL, CANCELLABLE_LABEL = "unique", "cancellable"
ADD, CANCEL = "task_add", "task_cancel"
# Messages one cancel call looks at: about 2 ms of the server's time for a stream.
CANCEL_SLICE = 2000
_TRUE = frozenset({"1", "true", "yes", "on"})

QueueKind = Literal["stream", "list"]


def label_is_set(labels: Mapping[str, Any], name: str) -> bool:
    """Whether a yes/no label (``unique``, ``cancellable``) is set: True, or a true-ish string.

    Labels may come back from a formatter as strings, so "true", "1", "yes" count as set.
    """
    value = labels.get(name)
    if value is None or value is False:
        return False
    if value is True:
        return True
    if isinstance(value, (str, bytes)):
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        return text.strip().lower() in _TRUE
    if isinstance(value, int):
        return value != 0
    raise ValueError(f"the {name} label must be true or false, got {value!r}")


def is_unique(labels: Mapping[str, Any]) -> bool:
    """Whether the kick is idempotent: dropped while a message of its task id waits."""
    return label_is_set(labels, UNIQUE_LABEL)


def is_recorded(labels: Mapping[str, Any], kind: QueueKind) -> bool:
    """Whether the kick records its message in the task index: a unique one always, a
    cancellable one in a stream queue. A list queue is looked through twice as fast as a stream
    (a list message is one string to Lua, a stream entry three and two tables), within 100 ms
    for 100,000 messages, so a cancellable list kick stays a plain LPUSH; a bad value of the
    label is refused all the same, before anything is sent.
    """
    cancellable = label_is_set(labels, CANCELLABLE_LABEL)
    return is_unique(labels) or (cancellable and kind == "stream")


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


async def kick_recorded(
    conn: RedisConnection,
    queue: Queue,
    task_id: str,
    message: bytes,
    level: int,
    delay_ms: int | None,
    trim: tuple[Any, ...] = (),
    unique: bool = True,
) -> bool:
    """Queue (or delay) ``message`` and record it in the task index; whether it went (a unique
    kick is dropped when its task id's message is already there)."""
    head = b"%s:%d:" % (task_id.encode().hex().encode(), level)
    maxlen, mode = maxlen_args(trim)
    added = await scripts.run(
        conn,
        scripts.get(ADD),
        queue.script_keys(),
        [
            queue.kind,
            task_id,
            level,
            delay_ms or 0,
            message,
            head,
            queue.group,
            maxlen,
            mode,
            1 if unique else 0,
        ],
    )
    return bool(added)


def maxlen_args(trim: tuple[Any, ...]) -> tuple[Any, str]:
    """A stream kick's ``MAXLEN [~] n`` arguments as a script takes them: (n or '', '~' or '=')."""
    return ("", "~") if not trim else (trim[-1], "~" if "~" in trim else "=")


def quoted_ids(task_id: str) -> tuple[bytes, bytes]:
    """The task id as taskiq's JSON formatters write it, quotes included: escaped to ASCII
    (``json.dumps``, its serializer's way) and as UTF-8 (pydantic's), the same for an ASCII id."""
    return json.dumps(task_id).encode(), json.dumps(task_id, ensure_ascii=False).encode()


async def cancel(conn: RedisConnection, queue: Queue, task_id: str) -> bool:
    """Delete the task's message if it is queued or delayed; False when it is not (a worker
    took it, it is done, or it is unknown). A running task is never interrupted."""
    script = scripts.get(CANCEL)
    script_keys = queue.script_keys()
    mark = f"taskiq-redis cancel mark {uuid.uuid4().hex}"
    escaped, unescaped = quoted_ids(task_id)
    phase, position = 0, ""
    while True:
        outcome, phase, position = await scripts.run(
            conn,
            script,
            script_keys,
            [
                queue.kind,
                task_id,
                escaped,
                queue.group,
                phase,
                position,
                CANCEL_SLICE,
                mark,
                unescaped,
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
