"""What the stream broker's parts pass each other: entries, deliveries, and their Redis forms.

Also :class:`Background`, the tasks the parts run their Redis work in: a stop never cancels them,
because a cancelled read could lose a reply holding messages (they would wait out
``idle_timeout``), and because Python 3.11's ``asyncio.wait_for``, which redis-py uses to send,
can swallow a cancellation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from redis.exceptions import ResponseError

from taskiq_redis.diagnostics import server_message

DATA = b"data"


@dataclass(slots=True)
class Delivery:
    """An entry this consumer holds: read, not yet acknowledged."""

    deliveries: int
    handed: float = 0.0  # when it was yielded to taskiq (monotonic); 0: only buffered here
    acking: bool = False  # its ack was called
    dropped: bool = False  # taskiq let go of it without an ack: stop renewing


class Entry(NamedTuple):
    """One read or reclaimed entry (a tuple: a frozen dataclass took 2 us per entry to build)."""

    stream: str
    entry_id: str
    deliveries: int
    data: bytes | None  # None: the entry has no data field
    fields: dict[bytes, bytes] | None = None  # all of them, where known (for a dead letter)


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def binary(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def fields_of(raw: Mapping[Any, Any] | list[Any] | None) -> dict[bytes, bytes]:
    """An entry's fields from redis-py's parsed dict or a script's flat field/value list."""
    if raw is None:
        return {}
    pairs = raw.items() if isinstance(raw, Mapping) else zip(raw[::2], raw[1::2], strict=True)
    return {binary(field): binary(value) for field, value in pairs}


def entry_of(stream: str, entry_id: Any, deliveries: int, fields: Any) -> Entry:
    """An entry from a flat field list or a parsed dict of fields."""
    every = fields_of(fields)
    return Entry(stream, text(entry_id), deliveries, every.get(DATA), every)


def by_stream(reply: Any) -> Iterable[tuple[Any, list[Any]]]:
    """XREADGROUP's (stream, entries) pairs as redis-py parses them for RESP2 or RESP3."""
    if not reply:
        return ()
    if isinstance(reply, Mapping):  # RESP3: {stream: [entries]}
        return [(stream, nested[0] if nested else []) for stream, nested in reply.items()]
    return [(stream, entries) for stream, entries in reply]


def no_group(error: BaseException) -> bool:
    """Whether the server lost the group: from a command, or from a script (``script x: ...``)."""
    if not isinstance(error, ResponseError):
        return False
    message = server_message(error)
    if message.startswith("script "):
        message = message.partition(": ")[2]
    return message.startswith("NOGROUP")


class Background:
    """Redis work in tasks of their own, which a stop waits for but never cancels."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, work: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(work)
        self.tasks.add(task)

        def settled(_: asyncio.Task[Any]) -> None:
            self.tasks.discard(task)
            if not task.cancelled():
                task.exception()  # whoever awaits it sees it; nobody else must be told

        task.add_done_callback(settled)
        return task

    async def run(self, work: Awaitable[Any]) -> Any:
        """Await ``work`` in a task of its own: a cancelled caller leaves it to finish."""
        task = self.spawn(work)
        await asyncio.wait({task})
        return task.result()
