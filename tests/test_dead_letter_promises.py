"""Two promises of the README's operators' commands, on every topology.

- ``dead-letters purge`` deletes the dead letters present when it starts and spares those that
  arrive while it runs (it works in bounded batches, so it can run a while).
- ``dead-letters requeue`` gives a requeued task a fresh delivery count: a worker with
  ``max_deliveries=1`` runs a dead letter that had been delivered twice, instead of sending it
  straight back to the dead letters.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from taskiq_redis import connection, dead_letters, keys
from tests.queue_kinds import acked, body_of, make_broker, message
from tests.servers import Topology

PATIENCE = 20.0


async def test_purge_spares_the_dead_letters_that_arrive_while_it_runs(
    topology: Topology, raw_redis: Any, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dead_letters, "DEAD_LETTER_BATCH", 50)  # many calls: room for arrivals
    queue = f"purge{unique}"
    dead = keys.dead_letter_key(queue)
    await raw_redis.xadd(queue, {"data": "queue exists"})
    for number in range(2000):
        await raw_redis.xadd(dead, {"data": f"old{number}"})
    arrived: list[bytes] = []

    async def arrive() -> None:
        for _ in range(100_000):  # until the purge's first batch is done
            if await raw_redis.xlen(dead) < 2000:
                break
        for number in range(200):
            arrived.append(await raw_redis.xadd(dead, {"data": f"new{number}"}))
            await asyncio.sleep(0)

    conn = topology_connection(topology)
    try:
        arriving = asyncio.ensure_future(arrive())
        purged = await dead_letters.purge_dead_letters(conn, queue)
        await arriving
    finally:
        await conn.close()
    left = await raw_redis.xrange(dead)
    left_data = [fields[b"data"] for _, fields in left]
    assert purged == 2000
    assert not [data for data in left_data if data.startswith(b"old")]
    assert arrived, "nothing arrived while the purge ran"
    assert sorted(entry_id for entry_id, _ in left) == sorted(arrived)


def topology_connection(topology: Topology) -> Any:
    if topology.name == "single":
        return connection.single_node(topology.url)
    if topology.name == "cluster":
        return connection.cluster(topology.url)
    return connection.sentinel(**topology.kwargs())


async def test_a_requeued_dead_letter_gets_a_fresh_delivery_count(
    topology: Topology, raw_redis: Any, unique: str
) -> None:
    queue = f"fresh{unique}"
    strict: Any = make_broker("stream", topology, queue, max_deliveries=1, idle_timeout=300)
    await strict.startup()
    await strict.kick(message("twice"))
    # A consumer that dies holding it: its next delivery is the second, over max_deliveries.
    await raw_redis.xreadgroup("taskiq", "dies", {queue: ">"}, count=1)
    listener = strict.listen()
    taking = asyncio.ensure_future(anext(listener))
    try:
        deadline = asyncio.get_running_loop().time() + PATIENCE
        while not await raw_redis.xlen(keys.dead_letter_key(queue)):
            assert asyncio.get_running_loop().time() < deadline, "never dead-lettered"
            await asyncio.sleep(0.05)
        [(_, fields)] = await raw_redis.xrange(keys.dead_letter_key(queue))
        assert fields[b"deliveries"] == b"2"
        assert await dead_letters.requeue_dead_letters(strict, queue) == (1, 0)
        received = await asyncio.wait_for(taking, PATIENCE)  # delivered once: runs
        assert body_of(await acked(received)) == "twice"
        assert await raw_redis.xlen(keys.dead_letter_key(queue)) == 0
    finally:
        taking.cancel()
        await asyncio.gather(taking, return_exceptions=True)
        await listener.aclose()
        await strict.shutdown()
