"""Every Redis key name the package uses, and the hash-tag rule that keeps them cluster-safe.

A Lua script may only touch keys of one cluster slot. Keys inherited from taskiq-redis 1.2
(the queue, the result key, the schedule keys) keep their names so a running deployment can
switch packages without losing data; every key this package adds next to one of them is
derived here with :func:`beside`, which puts it in the slot of the key it serves.
"""

from __future__ import annotations

PROGRESS_SUFFIX = "__progress"
DEAD_LETTER_SUFFIX = ":dead"


def hash_tag(key: str) -> str | None:
    """The part of ``key`` Redis Cluster hashes, if ``key`` has a hash tag.

    Redis hashes the text between the first ``{`` and the first ``}`` after it, but only when
    that text is not empty; otherwise the whole key is hashed.
    """
    start = key.find("{")
    if start < 0:
        return None
    end = key.find("}", start + 1)
    if end <= start + 1:
        return None
    return key[start + 1 : end]


def beside(base: str, suffix: str) -> str:
    """A key derived from ``base`` that is stored in the same cluster slot as ``base``.

    ``{base}suffix`` hashes like ``base`` when ``base`` has no hash tag of its own; a base that
    has one already decides the slot, so the suffix is simply appended.
    """
    if hash_tag(base) is not None:
        return f"{base}{suffix}"
    return f"{{{base}}}{suffix}"


def result_key(task_id: str, prefix: str | None) -> str:
    """Where a task's result lives: the taskiq-redis 1.2 name, ``task_id`` or ``prefix:task_id``."""
    return task_id if prefix is None else f"{prefix}:{task_id}"


def progress_key(result: str) -> str:
    """Where a task's progress lives: beside its result, so one script can delete both."""
    return beside(result, PROGRESS_SUFFIX)


def dead_letter_key(queue: str) -> str:
    """The dead-letter stream of a stream queue, in the queue's slot (``{taskiq}:dead``)."""
    return beside(queue, DEAD_LETTER_SUFFIX)
