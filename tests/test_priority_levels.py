"""A stream queue's priority levels exist only once used, and a worker finds them when they appear.

A queue that never sets the ``priority`` label has only the keys taskiq-redis 1.2 had: a level's
stream is made by its first message. A worker that started before a level existed reads it once
it appears, whether a kick made it (with the group) or the delay mover or a raw XADD did
(without one: the worker's read gives it the group, from its start).
"""

from __future__ import annotations

import asyncio
from typing import Any

from taskiq_redis import keys
from tests.queue_kinds import acked, body_of, make_broker
from tests.queue_kinds import message as queue_message
from tests.servers import Topology

PATIENCE = 20.0


async def keys_of(raw_redis: Any, queue: str) -> set[str]:
    """Which of the queue's possible keys exist: the queue, its levels 1 to 9, delayed, dead."""
    candidates = [queue, *(keys.priority_key(queue, level) for level in range(1, 10))]
    candidates += [keys.delayed_key(queue), keys.dead_letter_key(queue)]
    return {key for key in candidates if await raw_redis.exists(key)}


async def eventually_empty(raw_redis: Any, key: str) -> None:
    """Wait until the stream ``key`` holds nothing (acks are sent after ``ack()`` returns)."""
    deadline = asyncio.get_running_loop().time() + PATIENCE
    while await raw_redis.xlen(key):
        assert asyncio.get_running_loop().time() < deadline, f"{key} still holds entries"
        await asyncio.sleep(0.05)


async def test_a_queue_that_never_uses_priorities_has_only_the_keys_of_1_2(
    topology: Topology, raw_redis: Any, unique: str
) -> None:
    queue = f"plain{unique}"
    broker = make_broker("stream", topology, queue)
    await broker.startup()
    listener = broker.listen()
    try:
        await broker.kick(queue_message("a"))
        assert body_of(await acked(await asyncio.wait_for(anext(listener), PATIENCE))) == "a"
        await asyncio.sleep(0.3)  # reads and looks at the levels above have gone out
        assert await keys_of(raw_redis, queue) == {queue}
    finally:
        await listener.aclose()
        await broker.shutdown()


async def test_a_level_made_after_the_worker_started_is_read(
    topology: Topology, raw_redis: Any, unique: str
) -> None:
    """The worker blocks on level 0 alone; a kick to level 5 makes the level, and the worker
    finds it within about a second (its blocking read ends and the next read looks)."""
    queue = f"later{unique}"
    worker = make_broker("stream", topology, queue)
    producer = make_broker("stream", topology, queue)
    await worker.startup()
    await producer.startup()
    listener = worker.listen()
    waiting = asyncio.ensure_future(anext(listener))
    try:
        await asyncio.sleep(0.3)  # the blocking read is out, naming level 0 only
        assert await keys_of(raw_redis, queue) == {queue}
        await producer.kick(queue_message("high", priority=5))
        assert body_of(await acked(await asyncio.wait_for(waiting, PATIENCE))) == "high"
        level = keys.priority_key(queue, 5)
        assert await keys_of(raw_redis, queue) == {queue, level}
        await eventually_empty(raw_redis, level)
    finally:
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        await listener.aclose()
        await worker.shutdown()
        await producer.shutdown()


async def test_a_level_stream_made_without_the_group_gets_it_and_is_read_from_its_start(
    topology: Topology, raw_redis: Any, unique: str
) -> None:
    """A requeued dead letter or a delayed message can make a level's stream with a plain XADD:
    the worker's read gives it the group from its start, so those first messages are read."""
    queue = f"bare{unique}"
    worker = make_broker("stream", topology, queue)
    await worker.startup()
    level = keys.priority_key(queue, 7)
    first = queue_message("first", priority=7)
    second = queue_message("second", priority=7)
    await raw_redis.xadd(level, {"data": first.message})
    await raw_redis.xadd(level, {"data": second.message})
    listener = worker.listen()
    try:
        got = [
            body_of(await acked(await asyncio.wait_for(anext(listener), PATIENCE)))
            for _ in range(2)
        ]
        assert got == ["first", "second"]
        await eventually_empty(raw_redis, level)  # acknowledged and deleted
    finally:
        await listener.aclose()
        await worker.shutdown()
