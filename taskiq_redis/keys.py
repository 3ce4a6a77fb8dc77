"""Every Redis key name the package uses, and the hash-tag rule that keeps them cluster-safe.

A Lua script may only touch keys of one cluster slot. Keys inherited from taskiq-redis 1.2
(the queue, the result key, the schedule keys) keep their names so a running deployment can
switch packages without losing data; every key this package adds next to one of them is
derived here with :func:`beside`, which puts it in the slot of the key it serves.
"""

from __future__ import annotations

from binascii import crc_hqx
from functools import lru_cache

from redis.crc import REDIS_CLUSTER_HASH_SLOTS as SLOTS
from redis.crc import key_slot

PROGRESS_SUFFIX = "__progress"
DEAD_LETTER_SUFFIX = ":dead"
DELAYED_SUFFIX = ":delayed"
UNIQUE_SUFFIX = ":unique"
PRIORITY_SUFFIX = ":priority:"


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


def slot(key: str) -> int:
    """The cluster slot of ``key`` (as redis-py encodes a ``str`` key: UTF-8)."""
    return key_slot(key.encode())


# How many numbered candidates beside() tries for a base no hash tag can name. Each lands in one
# of 16384 slots at random, so the chance that none of them lands in the base's slot is e**-64.
_SEARCH_LIMIT = 64 * 16384


class SlotError(ValueError):
    """No key derived from a base key lands in the base key's cluster slot."""


@lru_cache(maxsize=4096)
def beside(base: str, suffix: str) -> str:
    """A key derived from ``base`` that is stored in the same cluster slot as ``base``.

    - ``base`` has a hash tag (``x{y}z``): the tag decides the slot, so the suffix is appended.
    - ``base`` has none: ``{base}suffix`` hashes ``base`` itself, the whole key Redis hashed.
    - ``base`` is hashed whole yet cannot be a tag, because it holds a ``}`` (``job}1``,
      ``a{}b``) or is empty: no hash tag can name it, so the key is ``base`` + ``suffix`` + ``~n``
      with the smallest ``n`` whose key hashes to the base's slot. Such ids are rare; the search
      costs a few ms once per process (cached), and every process finds the same ``n``.

    :raises SlotError: no candidate lands in the slot (a ``suffix`` that completes a hash tag).
    """
    if hash_tag(base) is not None:
        return f"{base}{suffix}"
    wrapped = f"{{{base}}}{suffix}"
    if hash_tag(wrapped) == base:
        return wrapped
    target = slot(base)
    stem = f"{base}{suffix}~"
    if hash_tag(stem) is not None:  # the suffix closes a tag: every candidate hashes that tag
        raise SlotError(
            f"no key derived from {base!r} with suffix {suffix!r} lands in its cluster slot"
            f" {target}: the suffix completes the hash tag {{{hash_tag(stem)}}}"
        )
    # The stem has no hash tag and digits add none, so each candidate is hashed whole; CRC16
    # continues from the stem's, as if over the whole key.
    stem_crc = crc_hqx(stem.encode(), 0)
    for number in range(_SEARCH_LIMIT):
        if crc_hqx(str(number).encode(), stem_crc) % SLOTS == target:
            return f"{stem}{number}"
    raise SlotError(  # reached with a chance of e**-64
        f"no key derived from {base!r} with suffix {suffix!r} lands in its cluster slot {target}"
    )


def base_of(key: str, suffix: str) -> str | None:
    """The base that :func:`beside` turns into ``key`` with ``suffix``, or None if there is none.

    Tools that find derived keys by SCAN (the queue view) use this to tell which key they serve.
    """
    if key.endswith(suffix):
        base = key[: -len(suffix)]
        wrapped = base[1:-1] if base.startswith("{") and base.endswith("}") else None
        candidates = [base] if wrapped is None else [wrapped, base]
    else:
        numbered = key.rpartition(f"{suffix}~")
        if not numbered[1] or not numbered[2].isdigit():
            return None
        candidates = [numbered[0]]
    return next((base for base in candidates if beside(base, suffix) == key), None)


def result_key(task_id: str, prefix: str | None) -> str:
    """Where a task's result lives: the taskiq-redis 1.2 name, ``task_id`` or ``prefix:task_id``."""
    return task_id if prefix is None else f"{prefix}:{task_id}"


def progress_key(result: str) -> str:
    """Where a task's progress lives: beside its result, so one script can delete both."""
    return beside(result, PROGRESS_SUFFIX)


def dead_letter_key(queue: str) -> str:
    """The dead-letter stream of a stream queue, in the queue's slot (``{taskiq}:dead``)."""
    return beside(queue, DEAD_LETTER_SUFFIX)


def delayed_key(queue: str) -> str:
    """The sorted set of a queue's delayed messages, in the queue's slot (``{taskiq}:delayed``)."""
    return beside(queue, DELAYED_SUFFIX)


def unique_key(queue: str) -> str:
    """Where a queue's unique kicks are indexed by task id, in its slot (``{taskiq}:unique``)."""
    return beside(queue, UNIQUE_SUFFIX)


def priority_key(queue: str, level: int) -> str:
    """Where a queue keeps priority ``level``, in the queue's slot (``{taskiq}:priority:3``).

    Level 0, no label, is the queue itself, the 1.2 name; level n > 0 is a key of the same type
    beside it, so one script can read every level.
    """
    return queue if level == 0 else beside(queue, f"{PRIORITY_SUFFIX}{level}")


# Schedule sources. ``base`` is the source's prefix as its keys start with it: the prefix itself
# on single node and sentinel (the taskiq-redis 1.2 names), wrapped in a hash tag on a cluster so
# every key of one source shares a slot and one script can touch them together.
SCHEDULE_INDEX_SUFFIX = "__index"
SCHEDULE_TIME_INDEX_SUFFIX = "__time_index"
SCHEDULE_PROBE_SUFFIX = "__probe"
TIME_BUCKET_FORMAT = "%Y-%m-%dT%H:%M"


def schedule_base(prefix: str, cluster: bool) -> str:
    """Where a schedule source's keys start: ``prefix``, or ``{prefix}`` on a cluster.

    A prefix that already has a hash tag is kept as it is: the user chose its slot. Every key
    of the source starts with the returned base, so they all share its tag's slot.

    :raises SlotError: on a cluster, a prefix that no hash tag can start with.
    """
    if not cluster or hash_tag(prefix) is not None:
        return prefix
    base = f"{{{prefix}}}"
    if hash_tag(base) is None:
        raise SlotError(
            f"schedule prefix {prefix!r} cannot be a cluster hash tag (it is empty or starts with"
            " '}'), so its keys would land in different slots; choose another prefix"
        )
    return base


def glob_escape(text: str) -> str:
    """``text`` as a literal inside a SCAN MATCH pattern."""
    return "".join(f"\\{char}" if char in "*?[]\\" else char for char in text)


def schedule_key(base: str, schedule_id: str) -> str:
    """A schedule of the key-based source (``RedisScheduleSource``): ``prefix:schedule_id``."""
    return f"{base}:{schedule_id}"


def schedule_index_key(base: str) -> str:
    """The ids of the key-based source's schedules; no schedule key can have this name."""
    return beside(base, SCHEDULE_INDEX_SUFFIX)


def schedule_probe_key(base: str) -> str:
    """A short-lived key that tells whether two sources' connections see the same database."""
    return beside(base, SCHEDULE_PROBE_SUFFIX)


def schedule_data_key(base: str, schedule_id: str) -> str:
    """A schedule of a list source: ``prefix:data:schedule_id``, as in taskiq-redis 1.2."""
    return f"{base}:data:{schedule_id}"


def schedule_cron_key(base: str) -> str:
    """The ids of a list source's cron schedules."""
    return f"{base}:cron"


def schedule_interval_key(base: str) -> str:
    """The ids of a list source's interval schedules."""
    return f"{base}:interval"


def schedule_time_prefix(base: str) -> str:
    """What every time bucket list of a list source starts with."""
    return f"{base}:time:"


def schedule_time_key(base: str, minute: str) -> str:
    """The ids of a list source's timed schedules due in one UTC minute (``TIME_BUCKET_FORMAT``)."""
    return f"{schedule_time_prefix(base)}{minute}"


def schedule_time_index_key(base: str) -> str:
    """Every timed schedule id of a list source, scored by its bucket minute (unix seconds)."""
    return beside(base, SCHEDULE_TIME_INDEX_SUFFIX)
