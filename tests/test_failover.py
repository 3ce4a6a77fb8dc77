"""Real failovers under load: a sentinel primary with one replica, a cluster with one per primary.

A real ``taskiq worker`` and one long-lived producer (broker and result backend) keep working
through the failover (harness in ``tests/test_outages.py``). Counted are the tasks kicked from a
few seconds after the sentinels named the new primary, and after the last CLUSTER FAILOVER: they
all run, once, with their results, and the worker never dies. What replication loses before
that is reported (``pytest -s``), not asserted.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from redis.asyncio import Redis

from taskiq_redis import connection
from tests.servers import HOST, MASTER_NAME, ClusterGroup, SentinelGroup
from tests.test_outages import (
    AFTER_GRACE,
    APP,
    GRACE,
    app_config,
    assert_nothing_lost,
    keep_kicking_until,
    kicking,
    settle,
)
from tests.worker_process import WorkerProcess


@pytest.mark.parametrize("fault", ["SENTINEL FAILOVER", "kill -9 of the primary"])
async def test_sentinel_failover_under_load(
    sentinel_group: SentinelGroup, fault: str, unique: str, tmp_path: Path
) -> None:
    record = tmp_path / "runs"
    config = app_config(sentinel_group.topology(), "stream", f"queue-{unique}", record)
    with WorkerProcess(APP, config=config) as worker:
        await asyncio.to_thread(worker.wait_ready)
        async with kicking(config) as load:
            if fault == "SENTINEL FAILOVER":
                await asyncio.to_thread(sentinel_group.failover)
                named = time.monotonic()
                # The old primary serves as a primary until the sentinel demotes it (~8 s):
                # a client still writing there loses those writes, so kicking goes on past it.
                await asyncio.to_thread(sentinel_group.wait_demoted)
                demoted = time.monotonic()
            else:
                await asyncio.to_thread(sentinel_group.kill_primary)
                named = demoted = time.monotonic()
            await keep_kicking_until(max(named + GRACE, demoted) + AFTER_GRACE)
        # A write that reaches the old primary between the sentinel's switch and the moment
        # the client hears of it is lost when that primary is demoted: sentinel's own
        # split-brain window, which no client closes. A client that follows the sentinels
        # hears within a few seconds, so what it kicks from then on must all run.
        outcome = await settle(load, record, named + GRACE, working=named + GRACE)
        assert_nothing_lost(outcome, worker)


async def test_cluster_failover_under_load(
    cluster_group: ClusterGroup, unique: str, tmp_path: Path
) -> None:
    queue = f"queue-{unique}"
    record = tmp_path / "runs"
    config = app_config(cluster_group.topology(), "stream", queue, record)
    with WorkerProcess(APP, config=config) as worker:
        await asyncio.to_thread(worker.wait_ready)
        async with kicking(config) as load:
            # The queue's shard first, then the others: results live on every shard, and
            # each new primary starts without the scripts (Redis 7.0 does not replicate
            # SCRIPT LOAD), so every path meets NOSCRIPT on a new primary.
            first = cluster_group.primary_for(queue)
            primaries = [first, *(p for p in cluster_group.serving() if p is not first)]
            for primary in primaries:
                await asyncio.to_thread(cluster_group.failover, cluster_group.replica_of(primary))
            over = time.monotonic()
            await keep_kicking_until(over + GRACE + AFTER_GRACE)
        # A manual CLUSTER FAILOVER loses no write, so no task may run twice, kicked when it
        # may: settle counts the duplicates of every task kicked since the first kick.
        outcome = await settle(load, record, over)
        duplicated = [k for k in load.kicks if k.error is None and k.number in outcome.ran_twice]
        assert not duplicated, f"tasks ran twice: {duplicated[:5]}\n{outcome.summary}"
        assert_nothing_lost(outcome, worker)


async def test_a_sentinel_connection_closed_under_a_command_reconnects_to_the_new_primary(
    sentinel_group: SentinelGroup,
) -> None:
    """redis-py reconnects a closed connection before it sends, to the address it had: after a
    failover the old primary, which loses what it takes once it is demoted. It must ask."""
    conn = connection.sentinel(sentinel_group.sentinels, MASTER_NAME)
    try:
        assert isinstance(conn.client, Redis)
        pool = conn.client.connection_pool
        link = await pool.get_connection()  # type: ignore[no-untyped-call]
        old = (link.host, link.port)
        new = await asyncio.to_thread(sentinel_group.failover)
        deadline = time.monotonic() + 30
        while await pool.get_master_address() != (HOST, new.port):  # type: ignore[attr-defined]
            assert time.monotonic() < deadline, "the sentinels never named the new primary"
            await asyncio.sleep(0.1)
        await link.disconnect()
        await link.send_packed_command(link.pack_command("PING"))  # reconnects on its own
        assert await link.read_response() in (b"PONG", "PONG")
        assert (link.host, link.port) == (HOST, new.port) != old
        await pool.release(link)
    finally:
        await conn.close()
