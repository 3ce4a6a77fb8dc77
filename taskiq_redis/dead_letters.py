"""What an operator does with dead letters: list them, move them back to their queue, delete them.

Behind ``taskiq-redis dead-letters`` and the dashboard's buttons, and usable on its own::

    from taskiq_redis import connection, dead_letters

    redis = connection.single_node("redis://localhost:6379")
    oldest = await dead_letters.dead_letters(redis, "taskiq", count=10)
    moved, skipped = await dead_letters.requeue_dead_letters(redis, "taskiq")

Listing only reads; requeue and purge move or delete entries in bounded batches, each one
atomic (a script call, or one XDEL). Every function first checks, as
:func:`taskiq_redis.queues.inspect` does, that the queue exists and its keys have the right
types. Functions take a :class:`~taskiq_redis.connection.RedisConnection` or any broker of this
package (its connection is used).
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import asdict, dataclass
from typing import Any

from taskiq_redis import keys, priorities, queues, scripts
from taskiq_redis.brokers.base import BaseRedisBroker
from taskiq_redis.connection import RedisConnection

REQUEUE, PURGE = "dead_letter_requeue", "dead_letter_purge"
# Entries one dead-letter script call examines; each call is atomic and this bounds its time.
DEAD_LETTER_BATCH = 500
_ENTRY_ID = re.compile(r"\d+-\d+")


@dataclass(frozen=True)
class DeadLetter:
    """A dead-letter entry: the original message and why it was set aside.

    ``task_name`` and ``task_id`` are read from ``data`` when it is a taskiq message (JSON);
    ``age_ms`` is how long ago it was set aside (its entry id is the server's time then), by
    the clock of the machine that asked. None: not known.
    """

    id: str
    data: bytes | None
    reason: str
    stream: str
    original_id: str
    deliveries: int | None
    group: str
    task_name: str | None = None
    task_id: str | None = None
    age_ms: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain data for ``--json``; the data as text where it is UTF-8, else its length."""
        view = asdict(self)
        try:
            view["data"] = None if self.data is None else self.data.decode()
        except UnicodeDecodeError:
            view["data"] = f"<{len(self.data or b'')} bytes, not UTF-8>"
        return view


def check_entry_id(text: str) -> str:
    """Refuse a dead-letter entry id that is not of the form ``<milliseconds>-<sequence>``."""
    if not _ENTRY_ID.fullmatch(text):
        raise ValueError(f"expected a dead-letter entry id like 1712345678901-0, got {text!r}")
    return text


async def _dead_key(conn: RedisConnection, queue: str) -> str:
    """The dead-letter stream of ``queue``, once ``queue`` is known to be a queue.

    A :class:`~taskiq_redis.queues.QueueError` when no key of the queue exists (a mistyped
    name: there is nothing to list, requeue or purge), when the queue key is not a stream or
    list, or when a key of the queue has the wrong type; the message names the key.
    """
    found = await queues.key_types(conn, queue, queues.ALL_LEVELS)
    if found.unknown:
        raise queues.QueueError(
            description=f"no queue {queue!r}: none of its keys exists ({queue!r}, "
            f"{keys.dead_letter_key(queue)!r}, {keys.delayed_key(queue)!r}, "
            f"{keys.priority_key(queue, 1)!r}...)"
        )
    queues.check_types(queue, found)
    return keys.dead_letter_key(queue)


async def dead_letters(
    target: RedisConnection | BaseRedisBroker, queue: str, count: int = 100
) -> list[DeadLetter]:
    """The oldest ``count`` dead letters of ``queue`` (a
    :class:`~taskiq_redis.queues.QueueError` if it is not a queue)."""
    conn = queues.connection_of(target)
    dead_key = await _dead_key(conn, queue)
    entries = await conn.execute("XRANGE", dead_key, "-", "+", "COUNT", count)
    now_ms = int(time.time() * 1000)
    letters = []
    for entry_id, raw in entries:
        fields = queues.as_fields(raw)
        deliveries = fields.get("deliveries")
        data = fields.get("data")
        task_name, task_id = queues.task_of(data)
        letter_id = queues.as_text(entry_id)
        letters.append(
            DeadLetter(
                id=letter_id,
                data=data,
                reason=queues.as_text(fields.get("reason", "")),
                stream=queues.as_text(fields.get("stream", "")),
                original_id=queues.as_text(fields.get("id", "")),
                deliveries=int(deliveries) if deliveries is not None else None,
                group=queues.as_text(fields.get("group", "")),
                task_name=task_name,
                task_id=task_id,
                age_ms=max(0, now_ms - int(letter_id.partition("-")[0])),
            )
        )
    return letters


def _requeue_keys(queue: str, dead_key: str) -> list[str]:
    """The script's keys: the dead letters, then every level of the queue, 0 first."""
    return [dead_key, *priorities.Levels(queue, queues.ALL_LEVELS).by_level]


async def requeue_dead_letters(
    target: RedisConnection | BaseRedisBroker,
    queue: str,
    limit: int | None = None,
    max_priority: int = queues.ALL_LEVELS,
) -> tuple[int, int]:
    """Move dead letters back to ``queue``, oldest first, at most ``limit`` (None: all).

    Each batch is one atomic script call: an entry is either still a dead letter or back in
    the queue (at the priority level it came from, or at ``max_priority`` when it came from
    above it), never both or neither. Returns (requeued, skipped); skipped entries have no
    ``data`` field, so there is nothing to run, and they stay.
    """
    conn = queues.connection_of(target)
    script = scripts.get(REQUEUE)
    script_keys = _requeue_keys(queue, await _dead_key(conn, queue))
    top = priorities.check_max_priority(max_priority)
    requeued = skipped = 0
    start = "-"
    while limit is None or requeued + skipped < limit:
        batch = (
            DEAD_LETTER_BATCH
            if limit is None
            else min(DEAD_LETTER_BATCH, limit - requeued - skipped)
        )
        moved, kept, last, _ = await scripts.run(conn, script, script_keys, [start, batch, top])
        requeued += int(moved)
        skipped += int(kept)
        if int(moved) + int(kept) < batch:
            break
        start = queues.as_text(last)
    return requeued, skipped


async def requeue_dead_letter_ids(
    target: RedisConnection | BaseRedisBroker,
    queue: str,
    ids: list[str],
    max_priority: int = queues.ALL_LEVELS,
) -> tuple[int, int, list[str]]:
    """Move the dead letters with these entry ids back to ``queue``, as
    :func:`requeue_dead_letters` does. Returns (requeued, skipped, the ids that are not dead
    letters of ``queue``)."""
    conn = queues.connection_of(target)
    wanted = [check_entry_id(entry_id) for entry_id in dict.fromkeys(ids)]
    script = scripts.get(REQUEUE)
    script_keys = _requeue_keys(queue, await _dead_key(conn, queue))
    top = priorities.check_max_priority(max_priority)
    requeued = skipped = 0
    missing: list[str] = []
    for first in range(0, len(wanted), DEAD_LETTER_BATCH):
        batch = wanted[first : first + DEAD_LETTER_BATCH]
        moved, kept, _, absent = await scripts.run(
            conn, script, script_keys, ["-", len(batch), top, *batch]
        )
        requeued += int(moved)
        skipped += int(kept)
        missing += [queues.as_text(entry_id) for entry_id in absent]
    return requeued, skipped, missing


async def purge_dead_letters(
    target: RedisConnection | BaseRedisBroker, queue: str, limit: int | None = None
) -> int:
    """Delete the dead letters ``queue`` has now (not those that arrive meanwhile), oldest
    first, at most ``limit`` (None: all); how many."""
    conn = queues.connection_of(target)
    dead_key = await _dead_key(conn, queue)
    newest = await conn.execute("XREVRANGE", dead_key, "+", "-", "COUNT", 1)
    if not newest:
        return 0
    last_id = queues.as_text(newest[0][0])
    script = scripts.get(PURGE)
    deleted = 0
    while limit is None or deleted < limit:
        batch = DEAD_LETTER_BATCH if limit is None else min(DEAD_LETTER_BATCH, limit - deleted)
        removed = int(await scripts.run(conn, script, [dead_key], [last_id, batch]))
        deleted += removed
        if removed < batch:
            break
    return deleted


async def purge_dead_letter_ids(
    target: RedisConnection | BaseRedisBroker, queue: str, ids: list[str]
) -> tuple[int, list[str]]:
    """Delete the dead letters with these entry ids. Returns (deleted, the ids that are not
    dead letters of ``queue``)."""
    conn = queues.connection_of(target)
    wanted = [check_entry_id(entry_id) for entry_id in dict.fromkeys(ids)]
    dead_key = await _dead_key(conn, queue)
    found = await asyncio.gather(
        *(conn.execute("XRANGE", dead_key, entry_id, entry_id) for entry_id in wanted)
    )
    present = [entry_id for entry_id, entries in zip(wanted, found, strict=True) if entries]
    missing = [entry_id for entry_id in wanted if entry_id not in present]
    deleted = 0
    for first in range(0, len(present), DEAD_LETTER_BATCH):
        deleted += int(
            await conn.execute("XDEL", dead_key, *present[first : first + DEAD_LETTER_BATCH])
        )
    return deleted, missing
