"""Priority levels on the list and stream brokers, on every topology, with real servers.

A ``priority`` label (0 to 9 by default; none is 0) puts a message in its level's key beside the
queue; listeners take the highest level that holds messages, oldest first within a level.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib.metadata import version
from typing import Any

import pytest
from taskiq import BrokerMessage

import taskiq_redis
from taskiq_redis import dead_letters, keys, priorities, queues
from tests.queue_kinds import KINDS, acked, body_of, broker_class, make_broker, receive
from tests.queue_kinds import message as queue_message
from tests.servers import RedisServers, Topology
from tests.worker_process import WorkerProcess

TASKIQ_013 = tuple(int(part) for part in version("taskiq").split(".")[:2]) >= (0, 13)

WORK_TASK = "priority_app.work"  # tests/apps/priority_app.py


def message(
    body: str,
    priority: Any = None,
    task_name: str = "t",
    args: list[Any] | None = None,
    **labels: Any,
) -> BrokerMessage:
    """A real taskiq message with id ``body`` (the stream broker dead-letters anything else)."""
    return queue_message(body, task_name, args, priority=priority, **labels)


async def length(raw_redis: Any, kind: str, key: str) -> int:
    return int(await (raw_redis.xlen(key) if kind == "stream" else raw_redis.llen(key)))


def test_priority_label_values() -> None:
    assert priorities.level_of({}, 9) == 0
    assert priorities.level_of({"priority": None}, 9) == 0
    for value, level in [(0, 0), (9, 9), ("7", 7), (" 3 ", 3), (5.0, 5), (b"4", 4), ("+2", 2)]:
        assert priorities.level_of({"priority": value}, 9) == level, value
    assert priorities.level_of({"priority": 12}, 20) == 12
    for bad in [-1, 10, "10", "high", 2.5, "2.5", "", True, [1], float("nan")]:
        with pytest.raises(ValueError, match="the priority label must be a whole number from 0"):
            priorities.level_of({"priority": bad}, 9)
    with pytest.raises(ValueError, match="from 0 to 3, got 4"):
        priorities.level_of({"priority": 4}, 3)


def test_max_priority_option_is_checked() -> None:
    assert taskiq_redis.ListQueueBroker("redis://x", max_priority=0).max_priority == 0
    bad: Any
    for bad, error in [(-1, ValueError), (100, ValueError), (2.0, TypeError), (True, TypeError)]:
        with pytest.raises(error, match="max_priority"):
            taskiq_redis.ListQueueBroker("redis://x", max_priority=bad)


def test_level_keys_sit_beside_the_queue_in_its_slot() -> None:
    assert keys.priority_key("taskiq", 0) == "taskiq"
    assert keys.priority_key("taskiq", 3) == "{taskiq}:priority:3"
    assert keys.priority_key("{app}jobs", 9) == "{app}jobs:priority:9"
    levels = priorities.Levels("q", 2)
    assert levels.by_level == ("q", "{q}:priority:1", "{q}:priority:2")
    assert levels.read_order() == ("{q}:priority:2", "{q}:priority:1", "q")
    assert levels.read_order(above=0) == ("{q}:priority:2", "{q}:priority:1")
    assert levels.read_order(above=2) == ()
    assert levels.level(b"{q}:priority:1") == 1
    assert queues.queue_of_key("{q}:priority:7") == "q"
    assert queues.queue_of_key("{app}jobs:priority:7") == "{app}jobs"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("label", "delay"), [(10, None), (-1, None), ("urgent", None), (1.5, None), (99, 5)]
)
async def test_a_bad_priority_label_is_refused_and_nothing_is_sent(
    kind: str, label: Any, delay: Any, redis_servers: RedisServers, unique: str
) -> None:
    topology = Topology.of(redis_servers, "single")
    queue = f"bad{kind}{unique}"
    broker = make_broker(kind, topology, queue)
    await broker.startup()
    try:
        labels = {} if delay is None else {"delay": delay}
        with pytest.raises(ValueError, match=r"the priority label must be .* got "):
            await broker.kick(message("x", label, **labels))
        levels = priorities.Levels(queue).by_level
        raw = broker._conn
        # The stream levels exist from startup (empty, with their group); the lists do not.
        lengths = [await raw.execute("XLEN" if kind == "stream" else "LLEN", k) for k in levels]
        assert lengths == [0] * len(levels)
        # Where a message with a delay would wait: nothing may be parked there either.
        parked = await raw.execute("ZCARD", keys.delayed_key(queue))
        assert parked == 0, f"a refused message waits in {keys.delayed_key(queue)}"
    finally:
        await broker.shutdown()


@pytest.mark.parametrize("kind", KINDS)
async def test_levels_are_read_highest_first_and_oldest_first_within_a_level(
    kind: str, topology: Topology, raw_redis: Any, unique: str
) -> None:
    queue = f"order{kind}{unique}"
    broker = make_broker(kind, topology, queue)
    await broker.startup()
    sent = [("a", None), ("b", 3), ("c", 9), ("d", 0), ("e", "3"), ("f", 9), ("g", 1), ("h", 3)]
    for body, priority in sent:
        await broker.kick(message(body, priority))
    # Level 0 (no label, or 0) is the queue itself, as in taskiq-redis 1.2.
    assert await length(raw_redis, kind, queue) == 2
    for level, count in [(1, 1), (3, 3), (9, 2)]:
        assert await length(raw_redis, kind, keys.priority_key(queue, level)) == count
    try:
        order = [body_of(received) async for received in receive(broker, len(sent))]
    finally:
        await broker.shutdown()
    assert order == ["c", "f", "b", "e", "h", "g", "a", "d"]


@pytest.mark.parametrize("kind", KINDS)
async def test_a_high_priority_kick_behind_a_backlog_runs_next_in_a_real_worker(
    kind: str, topology: Topology, unique: str
) -> None:
    """One task at a time: the high-priority task runs as soon as the running one ends."""
    queue = f"worker{kind}{unique}"
    producer = make_broker(kind, topology, queue)
    await producer.startup()
    config = {
        "broker": broker_class(kind, topology),
        "broker_kwargs": {**topology.kwargs(), "queue_name": queue},
    }
    backlog = [f"low{number}" for number in range(6)]
    with WorkerProcess(
        "tests.apps.priority_app:broker", config=config, args=["--max-async-tasks", "1"]
    ) as worker:
        worker.wait_ready()
        for name in backlog:
            await producer.kick(message(f"{name}{unique}", None, WORK_TASK, [name, 0.7]))
        await asyncio.to_thread(worker.wait_for_line, "started low0")
        await producer.kick(message(f"high{unique}", 9, WORK_TASK, ["high", 0.1]))
        await asyncio.to_thread(worker.wait_for_line, "started low2")
        log = worker.output()
    await producer.shutdown()
    started = re.findall(r"started (\w+)", log)
    # taskiq 0.13's receiver takes a message only when it can start it; 0.12's takes one more
    # ahead while a task runs, and that one (low1) was already taskiq's when `high` came.
    taken_ahead = [] if TASKIQ_013 else ["low1"]
    expected = ["low0", *taken_ahead, "high", "low1", "low2", "low3"]
    assert started[:4] == list(dict.fromkeys(expected))[:4], log


@contextlib.asynccontextmanager
async def stream_backlog(
    topology: Topology, queue: str, lows: int
) -> AsyncIterator[tuple[Any, Callable[[], Awaitable[str]]]]:
    """A started stream broker (``xread_count=20``) with ``lows`` level-0 messages queued, and a
    function that takes, acknowledges and names the next message its listener hands over."""
    broker = make_broker("stream", topology, queue, xread_count=20)
    await broker.startup()
    for number in range(lows):
        await broker.kick(message(f"low{number}"))
    listener = broker.listen()

    async def take() -> str:
        return body_of(await acked(await anext(listener)))

    try:
        yield broker, take
    finally:
        await listener.aclose()
        await broker.shutdown()


async def test_a_higher_level_found_by_a_read_ahead_goes_before_the_held_entries(
    topology: Topology, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stream listener reads the next batch while a quarter of the last is left; when that
    read finds a higher level, its entries are handed over before the ones still held."""
    # No other look at the levels above meanwhile: on a slow machine the held entries became
    # due for one before the read ahead, which then handed `high` over a message sooner.
    monkeypatch.setattr(priorities, "RECHECK_SECONDS", 60.0)
    async with stream_backlog(topology, f"ahead{unique}", 30) as (broker, take):
        taken = [await take() for _ in range(15)]  # 5 held
        await broker.kick(message("high", 9))
        taken.append(await take())  # starts the read ahead
        await asyncio.sleep(0.2)  # it has answered, with the level above the held ones
        taken += [await take() for _ in range(2)]
    assert taken == [f"low{number}" for number in range(16)] + ["high", "low16"]


async def test_a_draining_listener_hands_a_new_higher_level_over_within_a_few_messages(
    topology: Topology, unique: str
) -> None:
    """Taken without a pause (a backlog drains), the held entries are not held against the levels
    above for long: once they have waited RECHECK_SECONDS, the read that tops them up (or a
    check) looks at those levels, and what it finds goes first."""
    async with stream_backlog(topology, f"drain{unique}", 60) as (broker, take):
        taken = [await take() for _ in range(2)]  # 18 held
        await broker.kick(message("high", 9))
        while "high" not in taken and len(taken) < 40:
            await asyncio.sleep(priorities.RECHECK_SECONDS / 2)
            taken.append(await take())
    # Held entries handed over in the order read would put it at 20 or later.
    assert "high" in taken[:12], taken


@pytest.mark.parametrize("kind", KINDS)
async def test_a_delayed_message_goes_to_its_level_when_due(
    kind: str, topology: Topology, unique: str
) -> None:
    queue = f"delayed{kind}{unique}"
    broker = make_broker(kind, topology, queue)
    await broker.startup()
    for number in range(4):
        await broker.kick(message(f"low{number}"))
    # Not due for a second: the first read is made well before (with 0.3 s, a slow CI run
    # had the mover put it on its level before the listener's first read).
    await broker.kick(message("high", 7, delay=1.0))
    listener = broker.listen()
    try:
        first = body_of(await acked(await asyncio.wait_for(anext(listener), 10)))
        await asyncio.sleep(2.0)  # the mover (0.5 s poll) has moved it by now
        rest = [body_of(await acked(await asyncio.wait_for(anext(listener), 10))) for _ in range(4)]
    finally:
        await listener.aclose()
        await broker.shutdown()
    assert [first, *rest] == ["low0", "high", "low1", "low2", "low3"]


async def test_a_stopping_list_listener_puts_each_message_back_on_its_level(
    topology: Topology, raw_redis: Any, unique: str
) -> None:
    queue = f"putback{unique}"
    broker = make_broker("list", topology, queue)
    await broker.startup()
    for body in ["low0", "low1", "low2", "low3"]:
        await broker.kick(message(body))
    listener = broker.listen()
    try:
        assert body_of(await asyncio.wait_for(anext(listener), 10)) == "low0"  # 4 popped
        for body in ["high0", "high1"]:
            await broker.kick(message(body, 5))
        await asyncio.sleep(2 * priorities.RECHECK_SECONDS)
        assert body_of(await asyncio.wait_for(anext(listener), 10)) == "high0"
        await listener.aclose()  # holds high1, low1, low2, low3
        high_level = await raw_redis.lrange(keys.priority_key(queue, 5), 0, -1)
        assert high_level == [message("high1", 5).message]
        assert await raw_redis.lrange(queue, 0, -1) == [
            message(body).message for body in ["low3", "low2", "low1"]
        ]
        again = [body_of(received) async for received in receive(broker, 4)]
    finally:
        await listener.aclose()
        await broker.shutdown()
    assert again == ["high1", "low1", "low2", "low3"]


@pytest.mark.parametrize("kind", KINDS)
async def test_the_operators_view_counts_every_level(
    kind: str, topology: Topology, unique: str
) -> None:
    queue = f"view{kind}{unique}"
    broker = make_broker(kind, topology, queue)
    await broker.startup()
    try:
        for body, priority in [("a", None), ("b", 2), ("c", 2), ("d", 8), ("e", None)]:
            await broker.kick(message(body, priority))
        await broker.kick(message("later", 4, delay=60))
        view = await queues.inspect(broker, queue)
        assert (view.kind, view.length, view.delayed) == (kind, 5, 1)
        assert {level: n for level, n in view.levels.items() if n} == {2: 2, 8: 1}
        found, complete = await queues.discover(broker)
        assert complete
        assert queue in found
        assert not [name for name in found if "priority" in name]
    finally:
        await broker.shutdown()


async def test_acks_reclaim_and_dead_letters_work_at_every_level(
    topology: Topology, raw_redis: Any, unique: str
) -> None:
    """Level streams are streams of the group like any other: entries are acked and deleted,
    a dead consumer's entries are reclaimed, too many deliveries go to the queue's dead letters,
    and a requeued dead letter goes back to its level."""
    queue = f"levels{unique}"
    level = {n: keys.priority_key(queue, n) for n in (3, 7, 8)}
    options = {"idle_timeout": 300}
    first = make_broker("stream", topology, queue, **options)
    await first.startup()
    await first.kick(message("acked", 3))
    await first.kick(message("lost", 7))
    await first.kick(message("doomed", 8))
    # A consumer that dies holding the level 7 and 8 entries.
    for key in (level[7], level[8]):
        await raw_redis.xreadgroup("taskiq", "dead", {key: ">"}, count=1)
    try:
        taken = [body_of(received) async for received in receive(first, 2)]
    finally:
        await first.shutdown()
    assert taken == ["acked", "doomed"] or taken == ["acked", "lost"], taken
    # ... one of the two reclaimed after idle_timeout, the other still pending: a broker that
    # dead-letters anything delivered more than once takes it now.
    strict = make_broker("stream", topology, queue, max_deliveries=1, **options)
    await strict.startup()
    listener = strict.listen()
    reader = asyncio.ensure_future(anext(listener))
    try:
        for _ in range(100):
            if await raw_redis.xlen(keys.dead_letter_key(queue)) == 1:
                break
            await asyncio.sleep(0.1)
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await listener.aclose()
        await strict.shutdown()
    [(_, fields)] = await raw_redis.xrange(keys.dead_letter_key(queue))
    dead_stream = fields[b"stream"].decode()
    assert dead_stream in (level[7], level[8])
    assert fields[b"deliveries"] == b"2"
    for key in level.values():
        assert await raw_redis.xlen(key) == 0, key  # acked entries are deleted
        assert (await raw_redis.xpending(key, "taskiq"))["pending"] == 0, key
    assert not await raw_redis.exists(keys.dead_letter_key(dead_stream))  # no dead key per level

    operator = make_broker("stream", topology, queue)
    try:
        assert await dead_letters.requeue_dead_letters(operator, queue) == (1, 0)
    finally:
        await operator.shutdown()
    assert await raw_redis.xlen(dead_stream) == 1  # back at its own level
