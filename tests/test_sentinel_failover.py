"""A long-lived sentinel producer follows the primary the sentinels name, after SENTINEL FAILOVER
and after kill -9 of the primary (a primary, a replica and one sentinel of the test's own).
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from taskiq import BrokerMessage

from taskiq_redis import ListQueueSentinelBroker
from tests.servers import HOST, SentinelGroup, _free_ports, find_program

NAME = "failover-test"
# How long the sentinel waits before it calls a silent primary down; kicks must work again
# within a few seconds after it names the new one.
DOWN_AFTER_MS = 1000
RECOVERY = 8.0


class Deployment:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ports: dict[str, int] = {}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, program: str, lines: list[str]) -> int:
        (port,) = _free_ports(1)
        workdir = self.tmp / name
        workdir.mkdir()
        config = workdir / "redis.conf"
        base = [f"bind {HOST}", f"port {port}", f'dir "{workdir}"', 'save ""', 'logfile ""']
        config.write_text("\n".join(base + lines) + "\n")
        log = (workdir / "log").open("wb")
        self.procs[name] = subprocess.Popen([find_program(program), str(config)], stdout=log)
        self.ports[name] = port
        wait_until(lambda: redis.Redis(port=port).ping())
        return port

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.kill()
            proc.wait()

    def sentinel(self) -> redis.Redis:
        return redis.Redis(port=self.ports["sentinel"], decode_responses=True)

    def named_primary(self) -> int:
        address: Any = self.sentinel().sentinel_get_master_addr_by_name(NAME)
        return int(address[1])


def wait_until(check: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():  # type: ignore[operator]
                return
        except (redis.RedisError, OSError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError("the deployment did not reach the expected state")
        time.sleep(0.1)


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    servers = Deployment(tmp_path)
    try:
        primary = servers.start("a", "redis-server", [])
        servers.start("b", "redis-server", [f"replicaof {HOST} {primary}"])
        wait_until(
            lambda: (
                redis.Redis(port=servers.ports["b"]).info("replication")["master_link_status"]
                == "up"
            )
        )
        servers.start(
            "sentinel",
            "redis-sentinel",
            [
                f"sentinel monitor {NAME} {HOST} {primary} 1",
                f"sentinel down-after-milliseconds {NAME} {DOWN_AFTER_MS}",
                f"sentinel failover-timeout {NAME} 5000",
            ],
        )
        wait_until(lambda: cast(Any, servers.sentinel().sentinel_master(NAME))["num-slaves"] == 1)
        yield servers
    finally:
        servers.stop()


async def kicks_work_again(broker: ListQueueSentinelBroker, queue: str, primary: int) -> float:
    """Seconds until a kick lands on ``primary``; every kick before it may fail."""
    started = time.monotonic()
    client = redis.Redis(port=primary)
    last: BaseException | None = None
    while True:
        try:
            await broker.kick(BrokerMessage(task_id="t", task_name="t", message=b"m", labels={}))
            if client.llen(queue) > 0:
                client.delete(queue)
                return time.monotonic() - started
        except (redis.RedisError, OSError) as error:
            last = error
        waited = time.monotonic() - started
        assert waited < RECOVERY, f"no kick reached port {primary} in {waited:.1f} s; last: {last}"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("how", ["SENTINEL FAILOVER", "kill -9"])
async def test_a_long_lived_producer_follows_the_new_primary(
    deployment: Deployment, how: str
) -> None:
    queue = "failover-queue"
    broker = ListQueueSentinelBroker([(HOST, deployment.ports["sentinel"])], NAME, queue_name=queue)
    await broker.startup()
    try:
        old = deployment.named_primary()
        await kicks_work_again(broker, queue, old)
        if how == "kill -9":
            name = next(name for name, port in deployment.ports.items() if port == old)
            deployment.procs[name].kill()
        else:
            # Refused (NOGOODSLAVE) until the sentinel has heard from the replica recently.
            wait_until(
                lambda: deployment.sentinel().execute_command(  # type: ignore[no-untyped-call]
                    "SENTINEL", "FAILOVER", NAME
                )
            )
        wait_until(lambda: deployment.named_primary() != old)
        new = deployment.named_primary()
        await kicks_work_again(broker, queue, new)
    finally:
        await broker.shutdown()


async def test_connections_opened_while_the_sentinel_is_away_reach_the_primary(
    sentinel_group: SentinelGroup, caplog: pytest.LogCaptureFixture
) -> None:
    """A sentinel that cannot be reached says nothing about the primary: the one it last named
    is used, so a restarting sentinel does not fail commands that need a new connection.
    """
    topology = sentinel_group.topology()
    queue = f"away-{time.monotonic_ns()}"
    broker = ListQueueSentinelBroker(topology.sentinels, topology.master_name, queue_name=queue)
    await broker.startup()
    try:
        await broker.kick(BrokerMessage(task_id="0", task_name="t", message=b"m", labels={}))
        sentinel_group.sentinel.kill()
        # Every connection closed, as after a failover: each command looks the primary up.
        await cast(Any, broker)._conn.client.connection_pool.disconnect(inuse_connections=True)
        for number in range(1, 4):
            kick = BrokerMessage(task_id=str(number), task_name="t", message=b"m", labels={})
            await asyncio.wait_for(broker.kick(kick), 10)
    finally:
        await broker.shutdown()
    primary = redis.Redis(port=sentinel_group.nodes[0].port)  # no failover happened
    try:
        assert primary.llen(queue) == 4
    finally:
        primary.delete(queue)
        primary.close()
    warnings = [r.getMessage() for r in caplog.records if "No sentinel answers" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert f"{HOST}:{topology.sentinels[0][1]} (ConnectionError: " in warnings[0]
