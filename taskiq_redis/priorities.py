"""Priority levels of a queue: which key each level uses, and the order readers take them in.

taskiq's ``priority`` label (higher runs sooner) picks a level from 0 to ``max_priority`` (9 by
default); a message without the label is at level 0, the lowest. Level 0 is the queue key itself
and every other level a key of the same kind beside it, in the queue's cluster slot (see
:func:`taskiq_redis.keys.priority_key`), so one script can look at every level, and a deployment
that never sets the label has exactly the keys taskiq-redis 1.2 had.

Readers (the list broker's pop script, the stream broker's read script) look at the levels highest
first and take only from the first one that holds messages: a level is read only while every
higher level is empty, and within a level messages come oldest first. Under a constant load of
high-priority messages, lower levels wait for as long as that load lasts.

A listener hands taskiq one message at a time but reads a batch; the rest of the batch waits in
the listener until taskiq has room. So that such a batch cannot hold a newer message of a higher
level back while taskiq is busy, a listener asks Redis for the levels above a held message before
handing it over once that message has waited longer than :data:`RECHECK_SECONDS`. A listener whose
batches are taken as fast as they come never pays for that question.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from taskiq_redis import keys

PRIORITY_LABEL = "priority"
DEFAULT_MAX_PRIORITY = 9
# The highest ``max_priority`` accepted, so a read never names more than 100 keys.
MAX_PRIORITY_LIMIT = 99
# How long a read message may wait in a listener before the levels above it are checked again.
RECHECK_SECONDS = 0.01

_WHOLE = re.compile(r"\s*[+-]?\d+\s*")


def check_max_priority(max_priority: int) -> int:
    """Refuse a ``max_priority`` option that is not a whole number from 0 to the limit."""
    if isinstance(max_priority, bool) or not isinstance(max_priority, int):
        raise TypeError(f"max_priority must be a whole number, got {max_priority!r}")
    if not 0 <= max_priority <= MAX_PRIORITY_LIMIT:
        raise ValueError(f"max_priority must be from 0 to {MAX_PRIORITY_LIMIT}, got {max_priority}")
    return max_priority


def _whole(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, (str, bytes)):
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        return int(text) if _WHOLE.fullmatch(text) else None
    return None


def level_of(labels: Mapping[str, Any], max_priority: int) -> int:
    """The level a message's ``priority`` label asks for; 0 without the label.

    taskiq may hand labels over as strings, so a string of a whole number counts. Anything else,
    or a level outside 0..``max_priority``, is refused before the message is sent, with an error
    naming the label: sending it at some other level would break the order the producer asked for.
    """
    value = labels.get(PRIORITY_LABEL)
    if value is None:
        return 0
    level = _whole(value)
    if level is None or not 0 <= level <= max_priority:
        raise ValueError(
            f"the {PRIORITY_LABEL} label must be a whole number from 0 to {max_priority}, "
            f"got {value!r}"
        )
    return level


class Levels:
    """The keys of one queue's priority levels, in the orders readers and the mover need."""

    __slots__ = ("_level_by_key", "by_level", "max_priority", "queue")

    def __init__(self, queue: str, max_priority: int = DEFAULT_MAX_PRIORITY) -> None:
        self.queue = queue
        self.max_priority = max_priority
        # Level 0 first: the order the delayed messages' mover takes them in.
        self.by_level = tuple(keys.priority_key(queue, n) for n in range(max_priority + 1))
        self._level_by_key: dict[str | bytes, int] = {}
        for level, key in enumerate(self.by_level):
            self._level_by_key[key] = self._level_by_key[key.encode()] = level

    def key(self, level: int) -> str:
        """The key of ``level``."""
        return self.by_level[level]

    def read_order(self, above: int = -1) -> tuple[str, ...]:
        """The keys of the levels higher than ``above``, highest first: the order of a read."""
        return self.by_level[above + 1 :][::-1]

    def level(self, key: str | bytes) -> int:
        """Which level ``key`` (as named, or as Redis answered it) belongs to."""
        return self._level_by_key[key]
