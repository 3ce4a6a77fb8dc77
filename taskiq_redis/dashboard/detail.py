"""What the page of one queue reads besides its figures: entries, by priority level.

A queue keeps each priority level above 0 in a key of its own (``{queue}:priority:N``, made by
its first message). The levels read here are those :func:`taskiq_redis.queues.inspect` found
holding messages (it asks with one EXISTS over every level key, never KEYS or SCAN), plus level
0, the queue itself; within a level, at most :data:`WAITING_ENTRIES` waiting messages and
:data:`PAGE_ENTRIES` pending entries are read, so a queue of millions costs the page a few short
commands per level.

The waiting messages are those no worker has taken yet, in the order workers take them: for a
stream, the entries after its group's last delivered id (what ``task_cancel`` also counts as
not taken); for a list, the tail, where workers pop. Each of them can be cancelled by its task
id, as ``taskiq-redis cancel`` does (:func:`taskiq_redis.queues.cancel_queue`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ResponseError

from taskiq_redis import keys, queues
from taskiq_redis.connection import RedisConnection
from taskiq_redis.dead_letters import DeadLetter

# Entries the queue page lists per kind (pending per level, delayed, dead letters): enough to
# act on, bounded so a queue of millions costs a page no more than a few short commands.
PAGE_ENTRIES = 100
# Waiting (not yet taken) messages listed per level and group: the next ones to run.
WAITING_ENTRIES = 50


@dataclass(frozen=True)
class PendingEntry:
    """A stream entry a consumer took and has not acknowledged, at priority ``level``."""

    id: str
    level: int
    group: str
    consumer: str
    idle_ms: int
    deliveries: int
    task_name: str | None
    task_id: str | None


@dataclass(frozen=True)
class WaitingEntry:
    """A message no worker has taken yet; ``id`` is its stream entry id (None in a list)."""

    id: str | None
    task_name: str | None
    task_id: str | None


@dataclass(frozen=True)
class Waiting:
    """The next messages of one level for one group (None: a list, or a stream level no
    worker has read yet), and how many wait there in all (None: Redis cannot tell)."""

    level: int
    group: str | None
    total: int | None
    entries: list[WaitingEntry]


@dataclass(frozen=True)
class DelayedEntry:
    """A message parked in the delayed set until ``due_ms`` (server clock, unix ms)."""

    due_ms: int
    level: int | None
    task_name: str | None
    task_id: str | None


@dataclass
class QueueDetail:
    """The queue page: the queue's figures and the first entries of each kind."""

    view: queues.QueueView
    pending: list[PendingEntry]
    waiting: list[Waiting]
    delayed: list[DelayedEntry]
    dead_letters: list[DeadLetter]


@dataclass(frozen=True)
class GroupAt:
    """A consumer group as one level's stream knows it (each level stream has its own)."""

    name: str
    last_delivered_id: str
    lag: int | None


def data_of(fields: Any) -> bytes | None:
    """The ``data`` field of a stream entry as redis-py parses XRANGE (a dict of bytes)."""
    return fields.get(b"data") if isinstance(fields, dict) else None


def levels_of(view: queues.QueueView) -> list[int]:
    """The levels to read, highest first (the order workers take them), level 0 last."""
    return [*sorted((level for level in view.levels if level > 0), reverse=True), 0]


def level_length(view: queues.QueueView, level: int) -> int:
    """Messages at ``level``: its own count, or for level 0 what the others leave."""
    if level:
        return view.levels.get(level, 0)
    return (view.length or 0) - sum(view.levels.values())


async def entries(
    conn: RedisConnection, view: queues.QueueView
) -> tuple[list[PendingEntry], list[Waiting]]:
    """The pending entries and the waiting messages of every level of the queue."""
    if view.kind == "list":
        return [], await asyncio.gather(
            *(list_waiting(conn, view, level) for level in levels_of(view))
        )
    if view.kind != "stream":
        return [], []
    levels = levels_of(view)
    groups = await asyncio.gather(
        *(groups_at(conn, keys.priority_key(view.name, level)) for level in levels)
    )
    pending: list[PendingEntry] = []
    waiting: list[Waiting] = []
    for level, found in zip(levels, groups, strict=True):
        key = keys.priority_key(view.name, level)
        pending += await stream_pending(conn, key, level, found)
        waiting += await stream_waiting(conn, view, key, level, found)
    return pending, waiting


async def groups_at(conn: RedisConnection, key: str) -> list[GroupAt]:
    """The groups of one level's stream; none when the stream does not exist."""
    try:
        rows = await conn.execute("XINFO GROUPS", key)
    except ResponseError:  # no such key: nothing was ever added at this level
        return []
    found = [queues.as_fields(row) for row in rows]
    return [
        GroupAt(
            queues.as_text(row["name"]),
            queues.as_text(row["last-delivered-id"]),
            None if row.get("lag") is None else int(row["lag"]),
        )
        for row in found
    ]


async def stream_pending(
    conn: RedisConnection, key: str, level: int, groups: list[GroupAt]
) -> list[PendingEntry]:
    """The oldest pending entries of each group on one level's stream, with the task each
    entry carries (one XRANGE per entry, sent together)."""
    found: list[PendingEntry] = []
    for group in groups:
        if len(found) >= PAGE_ENTRIES:
            break
        # parse_detail: redis-py's reading of the extended form's reply
        rows = await conn.execute(
            "XPENDING", key, group.name, "-", "+", PAGE_ENTRIES - len(found), parse_detail=True
        )
        bodies = await asyncio.gather(
            *(conn.execute("XRANGE", key, row["message_id"], row["message_id"]) for row in rows)
        )
        for row, body in zip(rows, bodies, strict=True):
            task_name, task_id = queues.task_of(data_of(body[0][1]) if body else None)
            found.append(
                PendingEntry(
                    id=queues.as_text(row["message_id"]),
                    level=level,
                    group=group.name,
                    consumer=queues.as_text(row["consumer"]),
                    idle_ms=int(row["time_since_delivered"]),
                    deliveries=int(row["times_delivered"]),
                    task_name=task_name,
                    task_id=task_id,
                )
            )
    return found


async def stream_waiting(
    conn: RedisConnection, view: queues.QueueView, key: str, level: int, groups: list[GroupAt]
) -> list[Waiting]:
    """The next entries each group of one level's stream will be given: those after its last
    delivered id. A level without a group (no worker has read it yet) waits from its start."""
    if not groups:
        starts: list[tuple[str | None, str, int | None]] = [(None, "-", level_length(view, level))]
    else:
        starts = [(g.name, "(" + g.last_delivered_id, g.lag) for g in groups]
    rows = await asyncio.gather(
        *(
            conn.execute("XRANGE", key, start, "+", "COUNT", WAITING_ENTRIES)
            for _, start, _ in starts
        )
    )
    return [
        Waiting(
            level,
            group,
            total,
            [
                WaitingEntry(queues.as_text(entry_id), *queues.task_of(data_of(fields)))
                for entry_id, fields in found
            ],
        )
        for (group, _, total), found in zip(starts, rows, strict=True)
        if found or group is not None
    ]


async def list_waiting(conn: RedisConnection, view: queues.QueueView, level: int) -> Waiting:
    """The next messages of one level of a list queue: its tail, where workers pop."""
    newest_first = await conn.execute(
        "LRANGE", keys.priority_key(view.name, level), -WAITING_ENTRIES, -1
    )
    return Waiting(
        level,
        None,
        level_length(view, level),
        [WaitingEntry(None, *queues.task_of(message)) for message in reversed(newest_first)],
    )


async def delayed(conn: RedisConnection, name: str) -> list[DelayedEntry]:
    """The first delayed messages to come due, with their due times and tasks."""
    rows = await conn.execute("ZRANGE", keys.delayed_key(name), 0, PAGE_ENTRIES - 1, "WITHSCORES")
    if rows and not isinstance(rows[0], list | tuple):  # redis-py 7 leaves the reply flat
        rows = list(zip(rows[::2], rows[1::2], strict=True))
    found = []
    for member, score in rows:
        raw = member if isinstance(member, bytes) else str(member).encode()
        _, level, message = [*raw.split(b":", 2), b"", b""][:3]
        task_name, task_id = queues.task_of(message)
        found.append(
            DelayedEntry(
                due_ms=int(float(score)),
                level=int(level) if level.isdigit() else None,
                task_name=task_name,
                task_id=task_id,
            )
        )
    return found
