"""The page of one queue over plain HTTP: its entries at every priority level, what it costs.

As in test_dashboard.py the application runs in the test's process, on real servers of every
topology, and the queues are filled by the package's own brokers; a worker's read is a raw
XREADGROUP, so what is taken and what waits is known exactly.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio

from taskiq_redis import keys
from taskiq_redis.dashboard import create_app
from taskiq_redis.dashboard.detail import WAITING_ENTRIES
from tests.command_counts import commands_during
from tests.dashboard_support import app_options
from tests.queue_kinds import KINDS, make_broker
from tests.queue_kinds import message as queue_message
from tests.servers import StandaloneServer, Topology
from tests.test_dashboard import Client


@pytest.fixture
async def client(topology: Topology) -> AsyncIterator[Client]:
    made = Client(create_app(**app_options(topology), allow_actions=True))
    yield made
    await made.close()


def level_and_task(page: str, table: str) -> list[tuple[str, str]]:
    """(level, task id) of each row of a table of the page, in the page's order."""
    found = re.search(rf'<table id="{table}">(.*?)</table>', page, re.S)
    assert found is not None, f"no table {table}: {page}"
    return re.findall(r'data-level="(\d+)".*?<td>(task-[^<]*)</td>', found.group(1))


@pytest.mark.parametrize("kind", KINDS)
async def test_waiting_and_pending_entries_of_every_level_highest_first(
    kind: str, topology: Topology, raw_redis: Any, client: Client, unique: str
) -> None:
    queue = f"levels{kind}{unique}"
    broker = make_broker(kind, topology, queue)
    await broker.startup()
    try:
        for task_id, priority in (
            ("task-low-taken", None),
            ("task-low-waits", None),
            ("task-high-taken", 3),
            ("task-high-waits", 3),
        ):
            await broker.kick(queue_message(task_id, priority=priority))
        for level in (0, 3):  # a worker takes the oldest of each level
            key = keys.priority_key(queue, level)
            if kind == "stream":
                await raw_redis.xreadgroup("taskiq", "worker-1", {key: ">"}, count=1)
            else:
                await raw_redis.rpop(key)
        page = (await client.http.get(f"/queues/{queue}")).text
        assert level_and_task(page, "waiting") == [
            ("3", "task-high-waits"),
            ("0", "task-low-waits"),
        ]
        if kind == "stream":
            assert level_and_task(page, "pending") == [
                ("3", "task-high-taken"),
                ("0", "task-low-taken"),
            ]
            assert "worker-1" in page
            assert "released" not in page
            # A stopping worker hands back what it holds: not an entry idle for 11574 days.
            worker = make_broker(kind, topology, queue)
            await worker.startup()
            listener = worker.listen()
            await asyncio.wait_for(anext(listener), 10)
            await worker.shutdown()
            for _ in range(50):  # the page is read again once its copy is 2 s old
                page = (await client.http.get(f"/queues/{queue}")).text
                if "released" in page:
                    break
                await asyncio.sleep(0.1)
            assert "released, for the next reclaim" in page
            assert "11574d" not in page
        else:
            assert "A list queue keeps no pending entries" in page
    finally:
        await broker.shutdown()


async def test_a_queue_page_reads_a_bounded_slice_and_never_keys(unique: str) -> None:
    """INFO commandstats of a server of this test's own: a queue of 300 costs the page the
    same commands as a queue of 3, the page lists the next few and says how many wait; a
    second look within the refresh interval reads nothing."""
    with StandaloneServer() as server:
        server.start()
        raw = redis.asyncio.Redis.from_url(server.url)
        broker = make_broker("stream", server.topology(), "unused")
        await broker.startup()
        for queue, length in ((f"big{unique}", 300), (f"small{unique}", 3)):
            for number in range(length):
                await broker.kick(queue_message(f"task-{number}", queue_name=queue))
            await broker.kick(queue_message("task-high", priority=2, queue_name=queue))
            await raw.xgroup_create(queue, "taskiq", "0")

        client = Client(create_app(url=server.url, refresh=30))

        async def spent(path: str) -> tuple[dict[str, int], str]:
            commands, response = await commands_during(raw, client.http.get(path))
            return commands, response.text

        try:
            await client.http.get("/fragments/queues")  # connected, as after the first look
            big, fragment = await spent(f"/fragments/queues/big{unique}")
            small, _ = await spent(f"/fragments/queues/small{unique}")
            again, _ = await spent(f"/queues/big{unique}")
        finally:
            await client.close()
            await broker.shutdown()
            await raw.aclose()
    listed = level_and_task(fragment, "waiting")
    assert listed[0] == ("2", "task-high")
    assert listed[1:] == [("0", f"task-{n}") for n in range(WAITING_ENTRIES)]
    assert f"priority 0 (group taskiq): the next {WAITING_ENTRIES} of 300" in fragment
    assert big == small
    assert "cmdstat_keys" not in big
    assert "cmdstat_scan" not in big
    assert again == {}  # the page within the refresh interval shares the fragment's read


@pytest.mark.parametrize("topology", ["single"], indirect=True)
async def test_when_redis_cannot_count_what_waits_the_page_says_more_may(
    topology: Topology, raw_redis: Any, client: Client, unique: str
) -> None:
    """An entry deleted from the middle of a stream (a cancel does that) leaves a group's lag
    unknown to Redis: the page says that more than it lists may wait."""
    queue = f"unknown{unique}"
    broker: Any = make_broker("stream", topology, queue)
    await broker.startup()
    try:
        for number in range(WAITING_ENTRIES + 5):
            await broker.kick(queue_message(f"task-{number}"))
        assert await broker.cancel("task-3")
        fragment = (await client.http.get(f"/fragments/queues/{queue}")).text
    finally:
        await broker.shutdown()
    assert len(level_and_task(fragment, "waiting")) == WAITING_ENTRIES
    assert f"priority 0 (group taskiq): the next {WAITING_ENTRIES}; more may wait" in fragment


@pytest.mark.parametrize("topology", ["single"], indirect=True)
async def test_the_fragment_says_why_a_queue_cannot_be_read(
    raw_redis: Any, client: Client, unique: str
) -> None:
    queue = f"odd{unique}"
    await raw_redis.hset(queue, "a", "b")
    answer = await client.http.get(f"/fragments/queues/{queue}")
    assert answer.status_code == 404
    assert answer.headers["content-type"].startswith("text/plain")
    assert answer.text == f"{queue!r} is a Redis hash, not a stream or list queue"
