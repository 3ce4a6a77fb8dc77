"""Checks on the test servers themselves.

Every other test trusts these servers; a topology that silently degrades (a
cluster missing slots, a sentinel that lost its primary, a restart that drops
data) would turn into confusing failures far away from the cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis
import redis.asyncio
from redis.asyncio.sentinel import SentinelConnectionPool

from tests.servers import (
    CLUSTER_SIZE,
    CLUSTER_SLOTS,
    HOST,
    AsyncRedisClient,
    MissingRedisProgramError,
    RedisServers,
    Topology,
    start_servers,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
PR_SET_CHILD_SUBREAPER = 36


def _port(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None
    return port


def _alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie nobody reaped yet counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_until_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (alive := [pid for pid in pids if _alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


@contextlib.contextmanager
def _adopting_orphans() -> Iterator[None]:
    """Become the parent of orphaned descendants while the block runs.

    The servers of a killed child are otherwise reparented to PID 1, which in
    a container may reap them late or never, leaving zombies behind.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def _reap(pids: list[int], timeout: float) -> list[int]:
    """Wait for adopted processes to exit and reap them; return those still running."""
    remaining = set(pids)
    deadline = time.monotonic() + timeout
    while remaining and time.monotonic() < deadline:
        for pid in list(remaining):
            try:
                exited, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                # Not adopted after all; all that can be checked is that it ended.
                exited = 0 if _alive(pid) else pid
            if exited:
                remaining.discard(pid)
        time.sleep(0.02)
    return sorted(remaining)


async def test_ping(topology: Topology, raw_redis: AsyncRedisClient) -> None:
    expected = topology.pick(
        single=redis.asyncio.Redis,
        cluster=redis.asyncio.RedisCluster,
        sentinel=redis.asyncio.Redis,
    )
    assert isinstance(raw_redis, expected)
    assert await raw_redis.ping()


async def test_keys_round_trip(raw_redis: AsyncRedisClient, unique: str) -> None:
    # Twenty keys land in slots of every cluster node, not just one of them.
    keys = [f"{unique}:{index}" for index in range(20)]
    for index, key in enumerate(keys):
        await raw_redis.set(key, index, ex=60)
    assert [await raw_redis.get(key) for key in keys] == [str(i).encode() for i in range(20)]


async def test_sentinel_client_goes_through_the_sentinel(redis_servers: RedisServers) -> None:
    client = Topology.of(redis_servers, "sentinel").client()
    try:
        assert isinstance(client, redis.asyncio.Redis)
        assert isinstance(client.connection_pool, SentinelConnectionPool)
        assert await client.ping()
    finally:
        await client.aclose()


def test_kwargs(topology: Topology) -> None:
    assert topology.kwargs("redis_url") == topology.pick(
        single={"redis_url": topology.url},
        cluster={"redis_url": topology.url},
        sentinel={"sentinels": topology.sentinels, "master_name": "mymaster"},
    )


def test_cluster_has_three_primaries_covering_every_slot(redis_servers: RedisServers) -> None:
    assert len(redis_servers.cluster_ports) == CLUSTER_SIZE
    assert _port(redis_servers.cluster_url) in redis_servers.cluster_ports
    for port in redis_servers.cluster_ports:
        client = redis.Redis(host=HOST, port=port, decode_responses=True)
        try:
            info = client.cluster("INFO")
            slots = client.cluster("SLOTS")
        finally:
            client.close()
        assert info["cluster_state"] == "ok"
        assert info["cluster_slots_assigned"] == str(CLUSTER_SLOTS)
        assert info["cluster_size"] == str(CLUSTER_SIZE)

        covered: list[int] = []
        primaries: set[int] = set()
        for first, last, primary, *replicas in slots:
            assert replicas == []
            covered.extend(range(first, last + 1))
            assert primary[0] == HOST
            primaries.add(primary[1])
        assert sorted(covered) == list(range(CLUSTER_SLOTS))
        assert primaries == set(redis_servers.cluster_ports)


async def test_sentinel_reports_the_primary(redis_servers: RedisServers) -> None:
    sentinel = redis.asyncio.Sentinel(redis_servers.sentinels)  # type: ignore[no-untyped-call,unused-ignore]
    try:
        address = await sentinel.discover_master(redis_servers.master_name)
    finally:
        for link in sentinel.sentinels:  # not Sentinel.aclose: it came after redis-py 8.0.0
            await link.aclose()
    assert address == (HOST, _port(redis_servers.sentinel_primary_url))


async def test_restart_standalone_keeps_data(redis_servers: RedisServers, unique: str) -> None:
    before = redis.asyncio.Redis.from_url(redis_servers.standalone_url)
    try:
        await before.set(f"{unique}:kept", "value")
        run_id = (await before.info("server"))["run_id"]
    finally:
        await before.aclose()

    restart = asyncio.create_task(redis_servers.arestart_standalone(downtime=0.5))
    went_down = False
    while not restart.done():
        probe = redis.asyncio.Redis.from_url(redis_servers.standalone_url, retry=None)
        try:
            await probe.ping()
        except redis.ConnectionError:
            went_down = True
        finally:
            await probe.aclose()
        await asyncio.sleep(0.02)
    await restart
    assert went_down

    after = redis.asyncio.Redis.from_url(redis_servers.standalone_url)
    try:
        assert (await after.info("server"))["run_id"] != run_id
        assert await after.get(f"{unique}:kept") == b"value"
    finally:
        await after.aclose()


def test_stop_leaves_nothing_behind() -> None:
    servers = start_servers({"single"})
    pids = servers.pids()
    assert len(pids) == 1
    servers.stop()
    servers.stop()
    assert _wait_until_gone(pids, timeout=5) == []
    assert not servers.tmpdir.exists()


def test_servers_of_a_crashed_process_are_killed() -> None:
    # SIGKILL skips atexit, so only the watchdog can clean up after it.
    script = (
        "from tests.servers import start_servers\n"
        "servers = start_servers({'single', 'sentinel'})\n"
        "print(servers._watchdog._proc.pid, *servers.pids(), servers.tmpdir, flush=True)\n"
        "import time; time.sleep(60)\n"
    )
    with _adopting_orphans():
        with subprocess.Popen(
            [sys.executable, "-c", script], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True
        ) as child:
            try:
                assert child.stdout is not None
                watchdog, *servers, tmpdir = child.stdout.readline().split()
            finally:
                child.kill()
        assert len(servers) == 3
        assert _reap([int(pid) for pid in servers], timeout=10) == []
        # The watchdog removes the directory after the servers died, then exits.
        assert _reap([int(watchdog)], timeout=10) == []
    assert not Path(tmpdir).exists()


def test_missing_program_is_an_error_not_a_skip(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("TASKIQ_REDIS_TEST_SERVER", raising=False)
    with pytest.raises(MissingRedisProgramError, match=r"apt-get install redis-server"):
        start_servers()
