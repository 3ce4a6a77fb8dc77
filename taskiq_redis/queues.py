"""The operators' view of queues, and what an operator does with dead letters.

Behind ``taskiq-redis queues`` and ``taskiq-redis dead-letters``, and usable on its own::

    from taskiq_redis import connection, queues

    redis = connection.single_node("redis://localhost:6379")
    view = await queues.inspect(redis, "taskiq")  # length, levels, delayed, dead, groups
    moved, skipped = await queues.requeue_dead_letters(redis, "taskiq")

Everything here only reads, except the dead-letter scripts, which move or delete entries in
bounded batches, each one atomic. Functions take a :class:`~taskiq_redis.connection
.RedisConnection` or any broker of this package (its connection is used).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from taskiq_redis import keys, priorities, scripts
from taskiq_redis.brokers.base import BaseRedisBroker
from taskiq_redis.connection import RedisConnection
from taskiq_redis.exceptions import TaskIQRedisError

REQUEUE, PURGE = "dead_letter_requeue", "dead_letter_purge"
# Entries one dead-letter script call examines; each call is atomic and this bounds its time.
DEAD_LETTER_BATCH = 500
# Keys one SCAN call asks a server to examine while discovering queues.
SCAN_COUNT = 1000
# Keys discovery examines on each primary before it stops (see :func:`discover`).
DEFAULT_SCAN_LIMIT = 100_000
# Key suffixes that belong to a queue rather than being queues of their own.
_SATELLITES = (keys.DEAD_LETTER_SUFFIX, keys.DELAYED_SUFFIX)
_LEVEL_SUFFIX = re.compile(re.escape(keys.PRIORITY_SUFFIX) + r"([1-9]\d*)(~\d+)?$")


class QueueError(TaskIQRedisError):
    """A key named as a queue is not one (a hash, a set...), or a queue cannot be read."""

    __template__ = "{description}"
    description: str


@dataclass(frozen=True)
class Consumer:
    """One consumer of a group: what it holds unacknowledged and how long it has been idle."""

    name: str
    pending: int
    idle_ms: int


@dataclass(frozen=True)
class Group:
    """A consumer group of a stream queue.

    ``lag`` is how many entries the group has not read yet (None when Redis cannot tell, e.g.
    after entries were deleted from the middle of the stream).
    """

    name: str
    pending: int
    lag: int | None
    last_delivered_id: str
    consumers: list[Consumer] = field(default_factory=list)


@dataclass(frozen=True)
class QueueView:
    """One queue: ``kind`` is stream, list, or none (no key: empty, or never used).

    ``length`` counts every priority level; ``levels`` has the length of each level above 0
    that holds messages (a queue without priorities has none). A stream's groups and consumers add
    up their level streams. A queue found by :func:`discover` through its delayed or dead-letter
    key may have a key of another type (``kind`` names it, ``length`` is None): its delayed
    messages cannot be moved.
    """

    name: str
    kind: str
    length: int | None
    delayed: int
    dead_letters: int
    groups: list[Group] = field(default_factory=list)
    levels: dict[int, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Plain data for ``--json``."""
        return asdict(self)


@dataclass(frozen=True)
class DeadLetter:
    """A dead-letter entry: the original message and why it was set aside."""

    id: str
    data: bytes | None
    reason: str
    stream: str
    original_id: str
    deliveries: int | None
    group: str

    def as_dict(self) -> dict[str, Any]:
        """Plain data for ``--json``; the data as text where it is UTF-8, else its length."""
        view = asdict(self)
        try:
            view["data"] = None if self.data is None else self.data.decode()
        except UnicodeDecodeError:
            view["data"] = f"<{len(self.data or b'')} bytes, not UTF-8>"
        return view


def _conn(target: RedisConnection | BaseRedisBroker) -> RedisConnection:
    return target.redis_connection if isinstance(target, BaseRedisBroker) else target


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _pairs(raw: Any) -> dict[str, Any]:
    """An XINFO reply item as a dict with text keys, from a flat list or a parsed mapping."""
    if isinstance(raw, Mapping):
        return {_text(key): value for key, value in raw.items()}
    return {_text(key): value for key, value in zip(raw[::2], raw[1::2], strict=True)}


def _count(value: Any) -> int | None:
    return None if value is None else int(value)


async def inspect(
    target: RedisConnection | BaseRedisBroker,
    queue: str,
    strict: bool = True,
    max_priority: int = priorities.DEFAULT_MAX_PRIORITY,
) -> QueueView:
    """Length, delayed and dead-letter counts and, for a stream, its groups and consumers.

    The priority levels 1..``max_priority`` count with the queue (their keys are looked up).
    A key of another type is a :class:`QueueError`, or with ``strict=False`` a view without
    length (discovery finds such keys through their delayed or dead-letter sets).
    """
    conn = _conn(target)
    kind = _text(await conn.execute("TYPE", queue))
    delayed = int(await conn.execute("ZCARD", keys.delayed_key(queue)))
    dead_key = keys.dead_letter_key(queue)
    dead = (
        int(await conn.execute("XLEN", dead_key)) if await conn.execute("EXISTS", dead_key) else 0
    )
    level_keys = priorities.Levels(queue, max_priority).by_level[1:]
    level_kinds = await asyncio.gather(*(conn.execute("TYPE", key) for key in level_keys))
    found = {  # level: (key, type) of the levels above 0 that have a key
        level: (key, _text(level_kind))
        for level, (key, level_kind) in enumerate(zip(level_keys, level_kinds, strict=True), 1)
        if _text(level_kind) != "none"
    }
    if kind == "none" and found:
        kind = found[min(found)][1]
    if kind not in ("stream", "list") and not strict:
        return QueueView(queue, kind, None if kind != "none" else 0, delayed, dead)
    if kind not in ("stream", "list", "none"):
        raise QueueError(description=f"{queue!r} is a Redis {kind}, not a stream or list queue")
    for level, (key, level_kind) in found.items():
        if level_kind != kind:
            raise QueueError(
                description=f"priority level {level} of {queue!r} ({key!r}) is a Redis "
                f"{level_kind}, not a {kind} like the queue"
            )
    length_of = "XLEN" if kind == "stream" else "LLEN"
    base, *lengths = await asyncio.gather(
        *(conn.execute(length_of, key) for key in [queue, *(key for key, _ in found.values())])
    )
    levels = {level: int(n) for level, n in zip(found, lengths, strict=True) if int(n)}
    length = int(base) + sum(levels.values())
    if kind != "stream":
        return QueueView(queue, kind, length, delayed, dead, levels=levels)
    streams = [queue] if await conn.execute("EXISTS", queue) else []
    streams += [key for key, _ in found.values()]
    groups: dict[str, Group] = {}
    for stream in streams:
        for group in await _groups(conn, stream):
            groups[group.name] = _add(groups[group.name], group) if group.name in groups else group
    return QueueView(queue, kind, length, delayed, dead, list(groups.values()), levels)


async def _groups(conn: RedisConnection, stream: str) -> list[Group]:
    groups = []
    for raw_group in await conn.execute("XINFO GROUPS", stream):
        info = _pairs(raw_group)
        name = _text(info["name"])
        consumers = [
            Consumer(_text(c["name"]), int(c["pending"]), int(c["idle"]))
            for c in map(_pairs, await conn.execute("XINFO CONSUMERS", stream, name))
        ]
        groups.append(
            Group(
                name=name,
                pending=int(info["pending"]),
                lag=_count(info.get("lag")),
                last_delivered_id=_text(info["last-delivered-id"]),
                consumers=consumers,
            )
        )
    return groups


def _add(total: Group, level: Group) -> Group:
    """A group over two of a queue's level streams: counts add up, a consumer's idle time is
    its shortest; the last delivered id stays the first stream's (the queue itself)."""
    consumers = {consumer.name: consumer for consumer in total.consumers}
    for consumer in level.consumers:
        if (known := consumers.get(consumer.name)) is not None:
            consumer = Consumer(
                consumer.name,
                known.pending + consumer.pending,
                min(known.idle_ms, consumer.idle_ms),
            )
        consumers[consumer.name] = consumer
    return Group(
        name=total.name,
        pending=total.pending + level.pending,
        lag=None if total.lag is None or level.lag is None else total.lag + level.lag,
        last_delivered_id=total.last_delivered_id,
        consumers=list(consumers.values()),
    )


def queue_of_key(key: str) -> str:
    """The queue a key belongs to: the key itself, or the queue a dead, delayed or priority
    level key serves.

    ``{taskiq}:dead`` belongs to ``taskiq`` (the usual queue without a hash tag of its own); a
    queue named with a tag, e.g. ``{app}jobs``, owns ``{app}jobs:dead``; ``{taskiq}:priority:3``
    is level 3 of ``taskiq``.
    """
    if level := _LEVEL_SUFFIX.search(key):
        base = keys.base_of(key, f"{keys.PRIORITY_SUFFIX}{level.group(1)}")
        if base is not None:
            return base
    for suffix in _SATELLITES:
        base = keys.base_of(key, suffix)
        if base is not None:
            return base
    return key


async def discover(
    target: RedisConnection | BaseRedisBroker, scan_limit: int = DEFAULT_SCAN_LIMIT
) -> tuple[list[str], bool]:
    """Queue names found by SCAN on every primary: streams, lists and delayed sets.

    Each primary is scanned (SCAN ... TYPE, COUNT :data:`SCAN_COUNT`) until about
    ``scan_limit`` keys were examined per type, so a huge keyspace is never walked in full.
    Returns the sorted names and whether every scan went to its end.
    """
    conn = _conn(target)
    client: Any = conn.client
    nodes: list[Any] = [None]
    if conn.is_cluster:
        await client.initialize()  # the node list is empty until the client has connected
        nodes = client.get_primaries()
    found: set[str] = set()
    complete = True
    for node in nodes:
        options = {"target_nodes": node} if node is not None else {}
        for key_type, match in (("stream", None), ("list", None), ("zset", "*:delayed")):
            cursor, examined = 0, 0
            while True:
                cursor, batch = await client.scan(
                    cursor, match=match, count=SCAN_COUNT, _type=key_type, **options
                )
                if isinstance(cursor, dict):  # a cluster answers per node
                    cursor = next(iter(cursor.values()))
                found.update(queue_of_key(_text(key)) for key in batch)
                examined += SCAN_COUNT
                if not cursor:
                    break
                if examined >= scan_limit:
                    complete = False
                    break
    return sorted(found), complete


async def dead_letters(
    target: RedisConnection | BaseRedisBroker, queue: str, count: int = 100
) -> list[DeadLetter]:
    """The oldest ``count`` dead letters of ``queue``."""
    conn = _conn(target)
    entries = await conn.execute("XRANGE", keys.dead_letter_key(queue), "-", "+", "COUNT", count)
    letters = []
    for entry_id, raw in entries:
        fields = _pairs(raw)
        deliveries = fields.get("deliveries")
        letters.append(
            DeadLetter(
                id=_text(entry_id),
                data=fields.get("data"),
                reason=_text(fields.get("reason", "")),
                stream=_text(fields.get("stream", "")),
                original_id=_text(fields.get("id", "")),
                deliveries=int(deliveries) if deliveries is not None else None,
                group=_text(fields.get("group", "")),
            )
        )
    return letters


async def requeue_dead_letters(
    target: RedisConnection | BaseRedisBroker,
    queue: str,
    limit: int | None = None,
    max_priority: int = priorities.DEFAULT_MAX_PRIORITY,
) -> tuple[int, int]:
    """Move dead letters back to ``queue``, oldest first, at most ``limit`` (None: all).

    Each batch is one atomic script call: an entry is either still a dead letter or back in
    the queue (at the priority level it came from, up to ``max_priority``), never both or
    neither. Returns (requeued, skipped); skipped entries have no
    ``data`` field, so there is nothing to run, and they stay.
    """
    conn = _conn(target)
    script = scripts.get(REQUEUE)
    levels = priorities.Levels(queue, max_priority)
    requeued = skipped = 0
    start = "-"
    while limit is None or requeued + skipped < limit:
        batch = (
            DEAD_LETTER_BATCH
            if limit is None
            else min(DEAD_LETTER_BATCH, limit - requeued - skipped)
        )
        moved, kept, last = await scripts.run(
            conn, script, [keys.dead_letter_key(queue), *levels.by_level], [start, batch]
        )
        requeued += int(moved)
        skipped += int(kept)
        if int(moved) + int(kept) < batch:
            break
        start = _text(last)
    return requeued, skipped


async def purge_dead_letters(target: RedisConnection | BaseRedisBroker, queue: str) -> int:
    """Delete the dead letters ``queue`` has now (not those that arrive meanwhile); how many."""
    conn = _conn(target)
    dead_key = keys.dead_letter_key(queue)
    newest = await conn.execute("XREVRANGE", dead_key, "+", "-", "COUNT", 1)
    if not newest:
        return 0
    last_id = _text(newest[0][0])
    script = scripts.get(PURGE)
    deleted = 0
    while True:
        removed = int(await scripts.run(conn, script, [dead_key], [last_id, DEAD_LETTER_BATCH]))
        deleted += removed
        if removed < DEAD_LETTER_BATCH:
            return deleted
