"""Renewal of held claims outlives an error: a long task keeps its claim across a refusal.

A real fault, not a stand-in: the worker's Redis user loses the right to run scripts for a while
(as an operator's ACL mistake would do), so every renewal is refused with NOPERM. Renewal logs
each failure and goes on; once the right is back, it renews again, so a task that runs far
longer than ``idle_timeout`` is still not handed to the other worker.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from redis.asyncio import Redis

from taskiq_redis import RedisStreamBroker
from tests.queue_kinds import message
from tests.servers import RedisServers

IDLE_MS = 3000  # renewed every second; the refusal below lasts 1.2 s
PATIENCE = 30.0


async def test_renewal_goes_on_after_refusals_and_the_long_task_runs_once(
    redis_servers: RedisServers, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    admin = Redis.from_url(redis_servers.standalone_url)
    user = f"renew-{unique}"
    await admin.execute_command(  # type: ignore[no-untyped-call,unused-ignore]
        "ACL", "SETUSER", user, "reset", "on", ">pw", "~*", "&*", "+@all"
    )
    url = redis_servers.standalone_url.replace("redis://", f"redis://{user}:pw@")
    queue = f"renew{unique}"
    holder = RedisStreamBroker(url, queue_name=queue, idle_timeout=IDLE_MS)
    other = RedisStreamBroker(redis_servers.standalone_url, queue_name=queue, idle_timeout=IDLE_MS)
    deliveries: list[str] = []
    done = asyncio.Event()
    took = asyncio.Event()

    async def work(broker: RedisStreamBroker, seconds: float) -> None:
        async for received in broker.listen():
            deliveries.append(broker.consumer_name)
            took.set()
            await asyncio.sleep(seconds)
            await received.ack()  # type: ignore[misc]
            done.set()

    await holder.startup()
    await other.startup()
    caplog.set_level(logging.WARNING, logger="taskiq.redis_broker")
    holding = asyncio.ensure_future(work(holder, 3 * IDLE_MS / 1000))
    try:
        await holder.kick(message("long"))
        await asyncio.wait_for(took.wait(), PATIENCE)
        watching = asyncio.ensure_future(work(other, 0))  # reclaims what goes idle
        await asyncio.sleep(0.5)
        await admin.execute_command("ACL", "SETUSER", user, "-@scripting")  # type: ignore[no-untyped-call,unused-ignore]
        await asyncio.sleep(1.2)  # at least one renewal refused
        await admin.execute_command("ACL", "SETUSER", user, "+@scripting")  # type: ignore[no-untyped-call,unused-ignore]
        await asyncio.wait_for(done.wait(), PATIENCE)
        await asyncio.sleep(IDLE_MS / 1000 + 1.5)  # room for a wrong second delivery
        assert deliveries == [holder.consumer_name], deliveries
        assert "Renewing claims on stream" in caplog.text
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
    finally:
        holding.cancel()
        await asyncio.gather(holding, return_exceptions=True)
        await holder.shutdown()
        await other.shutdown()
        await admin.acl_deluser(user)
        await admin.aclose()
