"""The operators' view of queues: what each holds, and which queues a database has.

Behind ``taskiq-redis queues``, and usable on its own::

    from taskiq_redis import connection, queues

    redis = connection.single_node("redis://localhost:6379")
    view = await queues.inspect(redis, "taskiq")  # length, levels, delayed, dead, groups
    above = await queues.levels_above(redis, "taskiq", max_priority=3)  # e.g. [7]

Everything here only reads. Functions take a :class:`~taskiq_redis.connection
.RedisConnection` or any broker of this package (its connection is used). What an operator
does with dead letters is in :mod:`taskiq_redis.dead_letters`, built on the key checks here.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from taskiq_redis import keys, priorities, task_ids
from taskiq_redis.brokers.base import BaseRedisBroker
from taskiq_redis.connection import RedisConnection
from taskiq_redis.exceptions import TaskIQRedisError

# Keys one SCAN call asks a server to examine while discovering queues.
SCAN_COUNT = 1000
# Keys discovery examines on each primary before it stops (see :func:`discover`).
DEFAULT_SCAN_LIMIT = 100_000
# Key suffixes that belong to a queue rather than being queues of their own.
_SATELLITES = (keys.DEAD_LETTER_SUFFIX, keys.DELAYED_SUFFIX)
_LEVEL_SUFFIX = re.compile(re.escape(keys.PRIORITY_SUFFIX) + r"([1-9]\d*)(~\d+)?$")
# Every level a producer of this package can write to: the levels a look at a queue covers.
ALL_LEVELS = priorities.MAX_PRIORITY_LIMIT


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


def connection_of(target: RedisConnection | BaseRedisBroker) -> RedisConnection:
    """The connection to use: ``target`` itself, or a broker's, so an operator's tool can hand
    over whichever it has."""
    return target.redis_connection if isinstance(target, BaseRedisBroker) else target


def as_text(value: Any) -> str:
    """A reply value as text, whether or not the connection decodes responses (bytes that are
    not UTF-8 are shown with replacement characters rather than failing a look)."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def task_of(data: bytes | None) -> tuple[str | None, str | None]:
    """(task name, task id) of a taskiq message (JSON); None for what is not one, so a look at
    a queue shows what it can of any message, malformed or from another formatter."""
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


def as_fields(raw: Any) -> dict[str, Any]:
    """An XINFO reply item or a stream entry's fields as a dict with text keys, from a flat
    list or a mapping (redis-py parses some replies, depending on the protocol)."""
    if isinstance(raw, Mapping):
        return {as_text(key): value for key, value in raw.items()}
    return {as_text(key): value for key, value in zip(raw[::2], raw[1::2], strict=True)}


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
        level: (key, as_text(kind))
        for (level, key), kind in zip(level_keys.items(), kinds, strict=True)
        if as_text(kind) != "none"
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
    conn = connection_of(target)
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
class QueueKeys:
    """What a queue's keys are: the queue's kind and the types of its other keys, read once so
    every check of a look or an action agrees on them."""

    kind: str  # the queue's (or, without a queue key, its lowest level's) Redis type
    dead: str
    delayed: str
    levels: dict[int, tuple[str, str]]

    @property
    def unknown(self) -> bool:
        """No key of the queue exists: most likely a mistyped name."""
        return self.kind == self.dead == self.delayed == "none" and not self.levels


async def key_types(conn: RedisConnection, queue: str, max_priority: int) -> QueueKeys:
    """The types of every key of ``queue``; a :class:`QueueError` for a satellite key (dead
    letters, delayed set) of the wrong type, naming the key."""
    dead_key, delayed_key = keys.dead_letter_key(queue), keys.delayed_key(queue)
    kind, dead, delayed = (
        as_text(answer)
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
    return QueueKeys(kind, dead, delayed, levels)


def check_types(queue: str, found: QueueKeys) -> None:
    """A :class:`QueueError` naming the key when the queue is not a stream or list, or when a
    priority level key is of another type than the queue: before anything reads or moves
    messages as one kind."""
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
    conn = connection_of(target)
    found = await key_types(conn, queue, max_priority)
    kind = found.kind
    delayed = int(await conn.execute("ZCARD", keys.delayed_key(queue)))
    dead_key = keys.dead_letter_key(queue)
    dead = int(await conn.execute("XLEN", dead_key)) if found.dead == "stream" else 0
    if kind not in ("stream", "list") and not strict:
        return QueueView(queue, kind, None if kind != "none" else 0, delayed, dead)
    check_types(queue, found)
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
        info = as_fields(raw_group)
        name = as_text(info["name"])
        consumers = [
            Consumer(as_text(c["name"]), int(c["pending"]), int(c["idle"]))
            for c in map(as_fields, await conn.execute("XINFO CONSUMERS", stream, name))
        ]
        groups.append(
            Group(
                name=name,
                pending=int(info["pending"]),
                lag=_count(info.get("lag")),
                last_delivered_id=as_text(info["last-delivered-id"]),
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
    conn = connection_of(target)
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
                found.update(queue_of_key(as_text(key)) for key in batch)
                examined += SCAN_COUNT
                if not cursor:
                    break
                if examined >= scan_limit:
                    complete = False
                    break
    return sorted(found), complete


@dataclass
class Survey:
    """Every queue one look shows, the ones that could not be read (each a line naming it),
    and whether discovery scanned to its end (None: the queues were named)."""

    views: list[QueueView]
    problems: list[str]
    complete: bool | None


async def survey(
    target: RedisConnection | BaseRedisBroker,
    names: list[str],
    scan_limit: int = DEFAULT_SCAN_LIMIT,
    max_priority: int = ALL_LEVELS,
    tolerated: tuple[type[Exception], ...] = (QueueError,),
) -> Survey:
    """What ``taskiq-redis queues`` and the dashboard's queues page show: the queues named, else
    those :func:`discover` finds, each inspected. A queue that fails with one of ``tolerated``
    is a problem naming it and hides no other (a discovered key of another type is shown
    without a length rather than refused)."""
    conn = connection_of(target)
    complete = None
    if not names:
        names, complete = await discover(conn, scan_limit)
    views, problems = [], []
    for name in names:
        try:
            views.append(
                await inspect(conn, name, strict=complete is None, max_priority=max_priority)
            )
        except tolerated as error:
            problems.append(f"{name}: {error}" if name not in str(error) else str(error))
    return Survey(views, problems, complete)


DEFAULT_GROUP = "taskiq"


def cancel_queue(view: QueueView, group: str = "") -> task_ids.Queue:
    """The queue as the cancel script sees it, for ``taskiq-redis cancel`` and the dashboard.

    A queue without a key (an empty list, say) can hold the task in its delayed set only; the
    levels up to the highest that exists are looked through. The group whose delivery decides
    whether a task is taken: ``group``, else the queue's one group, else the brokers' default.
    A group a stream queue does not have is a :class:`QueueError`: the script would count
    nothing as delivered, and could delete a message a worker holds.
    """
    names = [found.name for found in view.groups]
    if not group:
        group = names[0] if len(names) == 1 else DEFAULT_GROUP
    elif names and group not in names:
        raise QueueError(description=f"{view.name!r} has no consumer group {group!r}")
    kind: task_ids.QueueKind = "stream" if view.kind == "stream" else "list"
    return task_ids.Queue(view.name, kind, max([0, *view.levels]), group)
