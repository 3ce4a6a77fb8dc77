"""The operators' view of queues, and what an operator does with dead letters.

Behind ``taskiq-redis queues`` and ``taskiq-redis dead-letters``, and usable on its own::

    from taskiq_redis import connection, queues

    redis = connection.single_node("redis://localhost:6379")
    view = await queues.inspect(redis, "taskiq")  # length, levels, delayed, dead, groups
    moved, skipped = await queues.requeue_dead_letters(redis, "taskiq")
    above = await queues.levels_above(redis, "taskiq", max_priority=3)  # e.g. [7]

Everything here only reads, except the dead-letter scripts, which move or delete entries in
bounded batches, each one atomic. Functions take a :class:`~taskiq_redis.connection
.RedisConnection` or any broker of this package (its connection is used).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

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
# Every level a producer of this package can write to: the levels a look at a queue covers.
ALL_LEVELS = priorities.MAX_PRIORITY_LIMIT
_ENTRY_ID = re.compile(r"\d+-\d+")


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
    after entries were deleted from the middle of the stream). ``entries_read`` is how many it
    has read since it was created (Redis 7+; None before): with ``lag`` it counts every entry
    ever added to the stream, which the dashboard turns into messages added per second without
    another command.
    """

    name: str
    pending: int
    lag: int | None
    last_delivered_id: str
    consumers: list[Consumer] = field(default_factory=list)
    entries_read: int | None = None


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


def age_text(milliseconds: int | None) -> str:
    """``3d4h``, ``2h5m``, ``4m12s``, ``7s``: the two largest units of an age; ``-`` unknown."""
    if milliseconds is None:
        return "-"
    seconds = max(0, milliseconds) // 1000
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    if minutes:
        return f"{minutes}m{seconds}s"
    return f"{seconds}s"


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


async def _level_kinds(
    conn: RedisConnection, queue: str, levels: range
) -> dict[int, tuple[str, str]]:
    """(key, Redis type) of each of ``levels`` of ``queue`` whose key exists.

    One EXISTS over every level key (they share the queue's slot) answers the usual case, a
    queue without such levels; only when some exist is each asked for its type.
    """
    level_keys = {level: keys.priority_key(queue, level) for level in levels if level > 0}
    if not level_keys or not int(await conn.execute("EXISTS", *level_keys.values())):
        return {}
    kinds = await asyncio.gather(*(conn.execute("TYPE", key) for key in level_keys.values()))
    return {
        level: (key, _text(kind))
        for (level, key), kind in zip(level_keys.items(), kinds, strict=True)
        if _text(kind) != "none"
    }


async def levels_above(
    target: RedisConnection | BaseRedisBroker,
    queue: str,
    max_priority: int,
    kind: Literal["list", "stream"] = "list",
) -> list[int]:
    """The priority levels of ``queue`` above ``max_priority`` that hold messages, lowest first.

    A worker reads levels 0 to its ``max_priority`` only, so what a producer with a higher
    ``max_priority`` sent above it waits there for ever. Levels up to
    :data:`~taskiq_redis.priorities.MAX_PRIORITY_LIMIT` are looked at (no producer writes
    higher), with a command a worker of that ``kind`` of queue may send: ``LRANGE key 0 0`` for
    a list queue (in the list broker's ACL), ``XLEN`` for a stream queue (needs ``+xlen``), one
    per level, sent together (one round trip; every level is in the queue's slot). A key of the
    other type answers WRONGTYPE, which is raised.
    """
    conn = _conn(target)
    levels = range(max_priority + 1, ALL_LEVELS + 1)
    if kind == "list":
        command: tuple[Any, ...] = ("LRANGE",)
        extra: tuple[Any, ...] = (0, 0)
    else:
        command, extra = ("XLEN",), ()
    answers = await asyncio.gather(
        *(conn.execute(*command, keys.priority_key(queue, level), *extra) for level in levels)
    )
    return [level for level, answer in zip(levels, answers, strict=True) if answer]


@dataclass(frozen=True)
class _Keys:
    """What a queue's keys are: the queue's kind and the types of its other keys."""

    kind: str  # the queue's (or, without a queue key, its lowest level's) Redis type
    dead: str
    delayed: str
    levels: dict[int, tuple[str, str]]

    @property
    def unknown(self) -> bool:
        return self.kind == self.dead == self.delayed == "none" and not self.levels


async def _keys_of(conn: RedisConnection, queue: str, max_priority: int) -> _Keys:
    """The types of every key of ``queue``; a :class:`QueueError` for a satellite key (dead
    letters, delayed set) of the wrong type, naming the key."""
    dead_key, delayed_key = keys.dead_letter_key(queue), keys.delayed_key(queue)
    kind, dead, delayed = (
        _text(answer)
        for answer in await asyncio.gather(
            *(conn.execute("TYPE", key) for key in (queue, dead_key, delayed_key))
        )
    )
    if dead not in ("stream", "none"):
        raise QueueError(
            description=f"the dead letters of {queue!r} ({dead_key!r}) are a Redis {dead}, "
            "not a stream"
        )
    if delayed not in ("zset", "none"):
        raise QueueError(
            description=f"the delayed messages of {queue!r} ({delayed_key!r}) are a Redis "
            f"{delayed}, not a sorted set"
        )
    levels = await _level_kinds(conn, queue, range(1, max_priority + 1))
    if kind == "none" and levels:
        kind = levels[min(levels)][1]
    return _Keys(kind, dead, delayed, levels)


def _check_levels(queue: str, found: _Keys) -> None:
    """A priority level key of another type than the queue is a :class:`QueueError`."""
    if found.kind not in ("stream", "list", "none"):
        raise QueueError(
            description=f"{queue!r} is a Redis {found.kind}, not a stream or list queue"
        )
    for level, (key, level_kind) in found.levels.items():
        if level_kind != found.kind:
            raise QueueError(
                description=f"priority level {level} of {queue!r} ({key!r}) is a Redis "
                f"{level_kind}, not a {found.kind} like the queue"
            )


async def inspect(
    target: RedisConnection | BaseRedisBroker,
    queue: str,
    strict: bool = True,
    max_priority: int = ALL_LEVELS,
) -> QueueView:
    """Length, delayed and dead-letter counts and, for a stream, its groups and consumers.

    The priority levels 1..``max_priority`` (by default every level a producer can use) whose
    keys exist count with the queue. A key of another type is a :class:`QueueError` naming it,
    or, for the queue key itself with ``strict=False``, a view without length (discovery finds
    such keys through their delayed or dead-letter sets).
    """
    conn = _conn(target)
    found = await _keys_of(conn, queue, max_priority)
    kind = found.kind
    delayed = int(await conn.execute("ZCARD", keys.delayed_key(queue)))
    dead_key = keys.dead_letter_key(queue)
    dead = int(await conn.execute("XLEN", dead_key)) if found.dead == "stream" else 0
    if kind not in ("stream", "list") and not strict:
        return QueueView(queue, kind, None if kind != "none" else 0, delayed, dead)
    _check_levels(queue, found)
    length_of = "XLEN" if kind == "stream" else "LLEN"
    base, *lengths = await asyncio.gather(
        *(
            conn.execute(length_of, key)
            for key in [queue, *(key for key, _ in found.levels.values())]
        )
    )
    levels = {level: int(n) for level, n in zip(found.levels, lengths, strict=True) if int(n)}
    length = int(base) + sum(levels.values())
    if kind != "stream":
        return QueueView(queue, kind, length, delayed, dead, levels=levels)
    streams = [queue] if await conn.execute("EXISTS", queue) else []
    streams += [key for key, _ in found.levels.values()]
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
                entries_read=_count(info.get("entries-read")),
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
        entries_read=None
        if total.entries_read is None or level.entries_read is None
        else total.entries_read + level.entries_read,
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


def check_entry_id(text: str) -> str:
    """Refuse a dead-letter entry id that is not of the form ``<milliseconds>-<sequence>``."""
    if not _ENTRY_ID.fullmatch(text):
        raise ValueError(f"expected a dead-letter entry id like 1712345678901-0, got {text!r}")
    return text


async def _dead_key(conn: RedisConnection, queue: str) -> str:
    """The dead-letter stream of ``queue``, once ``queue`` is known to be a queue.

    A :class:`QueueError` when no key of the queue exists (a mistyped name: there is nothing to
    list, requeue or purge), when the queue key is not a stream or list, or when a key of the
    queue has the wrong type; the message names the key.
    """
    found = await _keys_of(conn, queue, ALL_LEVELS)
    if found.unknown:
        raise QueueError(
            description=f"no queue {queue!r}: none of its keys exists ({queue!r}, "
            f"{keys.dead_letter_key(queue)!r}, {keys.delayed_key(queue)!r}, "
            f"{keys.priority_key(queue, 1)!r}...)"
        )
    _check_levels(queue, found)
    return keys.dead_letter_key(queue)


def _about_task(data: bytes | None) -> tuple[str | None, str | None]:
    """(task_name, task_id) of a taskiq message's JSON, or None for what cannot be read."""
    try:
        message = json.loads(data) if data is not None else None
    except ValueError:
        return None, None
    if not isinstance(message, dict):
        return None, None
    name, task_id = message.get("task_name"), message.get("task_id")
    return (
        name if isinstance(name, str) else None,
        task_id if isinstance(task_id, str) else None,
    )


async def dead_letters(
    target: RedisConnection | BaseRedisBroker, queue: str, count: int = 100
) -> list[DeadLetter]:
    """The oldest ``count`` dead letters of ``queue`` (a :class:`QueueError` if it is none)."""
    conn = _conn(target)
    dead_key = await _dead_key(conn, queue)
    entries = await conn.execute("XRANGE", dead_key, "-", "+", "COUNT", count)
    now_ms = int(time.time() * 1000)
    letters = []
    for entry_id, raw in entries:
        fields = _pairs(raw)
        deliveries = fields.get("deliveries")
        data = fields.get("data")
        task_name, task_id = _about_task(data)
        letter_id = _text(entry_id)
        letters.append(
            DeadLetter(
                id=letter_id,
                data=data,
                reason=_text(fields.get("reason", "")),
                stream=_text(fields.get("stream", "")),
                original_id=_text(fields.get("id", "")),
                deliveries=int(deliveries) if deliveries is not None else None,
                group=_text(fields.get("group", "")),
                task_name=task_name,
                task_id=task_id,
                age_ms=max(0, now_ms - int(letter_id.partition("-")[0])),
            )
        )
    return letters


def _requeue_keys(queue: str, dead_key: str) -> list[str]:
    """The script's keys: the dead letters, then every level of the queue, 0 first."""
    return [dead_key, *priorities.Levels(queue, ALL_LEVELS).by_level]


async def requeue_dead_letters(
    target: RedisConnection | BaseRedisBroker,
    queue: str,
    limit: int | None = None,
    max_priority: int = ALL_LEVELS,
) -> tuple[int, int]:
    """Move dead letters back to ``queue``, oldest first, at most ``limit`` (None: all).

    Each batch is one atomic script call: an entry is either still a dead letter or back in
    the queue (at the priority level it came from, or at ``max_priority`` when it came from
    above it), never both or neither. Returns (requeued, skipped); skipped entries have no
    ``data`` field, so there is nothing to run, and they stay.
    """
    conn = _conn(target)
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
        start = _text(last)
    return requeued, skipped


async def requeue_dead_letter_ids(
    target: RedisConnection | BaseRedisBroker,
    queue: str,
    ids: list[str],
    max_priority: int = ALL_LEVELS,
) -> tuple[int, int, list[str]]:
    """Move the dead letters with these entry ids back to ``queue``, as
    :func:`requeue_dead_letters` does. Returns (requeued, skipped, the ids that are not dead
    letters of ``queue``)."""
    conn = _conn(target)
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
        missing += [_text(entry_id) for entry_id in absent]
    return requeued, skipped, missing


async def purge_dead_letters(
    target: RedisConnection | BaseRedisBroker, queue: str, limit: int | None = None
) -> int:
    """Delete the dead letters ``queue`` has now (not those that arrive meanwhile), oldest
    first, at most ``limit`` (None: all); how many."""
    conn = _conn(target)
    dead_key = await _dead_key(conn, queue)
    newest = await conn.execute("XREVRANGE", dead_key, "+", "-", "COUNT", 1)
    if not newest:
        return 0
    last_id = _text(newest[0][0])
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
    conn = _conn(target)
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
