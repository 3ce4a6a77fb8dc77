"""Outages with real servers and a real ``taskiq worker``: what ran, what was lost, what ran twice.

A long-lived producer (a broker with its result backend, as an application holds them) kicks
numbered tasks at a steady rate while the fault happens; the worker's task appends its number
to a file, so the test counts runs outside Redis, whatever Redis lost. Assertions count only
the tasks kicked after the fault was over (WAIT-free: what asynchronous replication or a crash
loses before that is reported, not asserted). The failover tests use the same harness
(``tests/test_failover.py``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
from redis.asyncio import Redis
from taskiq import AsyncBroker, AsyncResultBackend
from taskiq.exceptions import SendTaskError
from taskiq.kicker import AsyncKicker

import taskiq_redis
from taskiq_redis.diagnostics import describe
from tests.servers import (
    ClusterGroup,
    RedisServers,
    SentinelGroup,
    ServerGroup,
    StandaloneServer,
    Topology,
    TopologyName,
)
from tests.worker_process import WorkerProcess

APP = "tests.apps.outage_app:broker"
# A hang guard only: a broken broker fails the test instead of blocking the suite.
PATIENCE = 30.0
# How long after a fault is over kicks may still fail ("work again within a few seconds").
GRACE = 5.0
# Kicking goes on this long after the grace, so enough tasks are counted.
AFTER_GRACE = 3.0
KICK_INTERVAL = 0.02
# The fewest kicks that must be made and succeed from the moment kicks must work on (one per
# KICK_INTERVAL would be ~150 in AFTER_GRACE): fewer, and the promise "every kick from then on
# succeeds and runs once" was checked on too little to mean anything (a kick that hangs 0.6 s
# made ~5). Loose enough for a loaded two-core machine: one kick per 150 ms.
MIN_KICKS_COUNTED = 20
RECORD_TASK = "outage_app.record"  # the task of tests/apps/outage_app.py
RESTARTED = "is dead. Scheduling reload."  # taskiq's process manager, when a worker died

CLASSES: dict[tuple[str, TopologyName], str] = {
    ("stream", "single"): "RedisStreamBroker",
    ("stream", "cluster"): "RedisStreamClusterBroker",
    ("stream", "sentinel"): "RedisStreamSentinelBroker",
    ("list", "single"): "ListQueueBroker",
    ("list", "cluster"): "ListQueueClusterBroker",
    ("list", "sentinel"): "ListQueueSentinelBroker",
    ("backend", "single"): "RedisAsyncResultBackend",
    ("backend", "cluster"): "RedisAsyncClusterResultBackend",
    ("backend", "sentinel"): "RedisAsyncSentinelResultBackend",
}


def app_config(topology: Topology, kind: str, queue: str, record: Path) -> dict[str, Any]:
    """The worker config of ``tests/apps/outage_app.py``: broker, backend and record file."""
    broker_kwargs: dict[str, Any] = {**topology.kwargs(), "queue_name": queue}
    if kind == "stream":
        # Longer than any fault here: a message comes back only if something is broken.
        broker_kwargs["idle_timeout"] = 60_000
    return {
        "broker": CLASSES[kind, topology.name],
        "broker_kwargs": broker_kwargs,
        "backend": CLASSES["backend", topology.name],
        "backend_kwargs": topology.kwargs("redis_url"),
        "record": str(record),
    }


def build(config: dict[str, Any]) -> tuple[AsyncBroker, AsyncResultBackend[Any]]:
    """The producer's broker and result backend, the same classes the worker uses."""
    backend: AsyncResultBackend[Any] = getattr(taskiq_redis, config["backend"])(
        **config["backend_kwargs"]
    )
    broker: AsyncBroker = getattr(taskiq_redis, config["broker"])(**config["broker_kwargs"])
    return broker.with_result_backend(backend), backend


def runs(record: Path) -> collections.Counter[int]:
    """How many times each task number ran, from the worker's record file."""
    if not record.exists():
        return collections.Counter()
    return collections.Counter(int(line) for line in record.read_text().split())


@dataclass
class Kick:
    number: int
    started: float  # time.monotonic()
    task_id: str | None = None
    error: str | None = None


@dataclass
class Load:
    """One long-lived producer kicking numbered tasks, one at a time, at a steady rate."""

    broker: AsyncBroker
    backend: AsyncResultBackend[Any]
    kicks: list[Kick] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        kicker: AsyncKicker[Any, Any] = AsyncKicker(RECORD_TASK, self.broker, {})
        number = 0
        while not self._stop.is_set():
            kick = Kick(number, time.monotonic())
            self.kicks.append(kick)
            try:
                kick.task_id = (await asyncio.wait_for(kicker.kiq(number), PATIENCE)).task_id
            except Exception as exc:
                # taskiq wraps what the broker raised in SendTaskError: show both.
                cause = f" ({describe(exc.__cause__)})" if exc.__cause__ else ""
                kick.error = describe(exc) + cause
            number += 1
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), KICK_INTERVAL)

    def stop(self) -> None:
        self._stop.set()

    def since(self, moment: float) -> list[Kick]:
        return [kick for kick in self.kicks if kick.started >= moment]


@contextlib.asynccontextmanager
async def kicking(config: dict[str, Any]) -> AsyncIterator[Load]:
    """A producer started like an application starts it, kicking until the block ends."""
    broker, backend = build(config)
    await broker.startup()
    load = Load(broker, backend)
    runner = asyncio.ensure_future(load.run())
    try:
        await until(lambda: len(load.kicks) >= 20)  # warm: tasks flow before the fault
        yield load
    finally:
        load.stop()
        await runner
        # The backend stays open for the checks; closed by ``settle``.


async def until(check: Callable[[], bool], patience: float = PATIENCE) -> None:
    """Wait until ``check()`` holds, at most ``patience`` seconds (a hang guard, no assertion)."""
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        if check():
            return
        await asyncio.sleep(0.05)


async def keep_kicking_until(moment: float) -> None:
    await asyncio.sleep(max(0.0, moment - time.monotonic()))


@dataclass
class Outcome:
    """What happened to the tasks kicked after the fault was over, and to all of them."""

    failed: list[Kick]
    lost: list[Kick]
    twice: list[Kick]
    missing_results: list[str]
    summary: str
    ran_twice: set[int]  # every task number that ran more than once, kicked when it may
    working: list[Kick]  # the kicks made since kicks must work, that succeeded


async def settle(load: Load, record: Path, over: float, working: float | None = None) -> Outcome:
    """Wait for every task kicked since ``over`` to run and store its result; count the rest.

    Kicks must succeed from ``working`` on (default: ``GRACE`` after ``over``).
    """
    working = over + GRACE if working is None else working
    counted = [kick for kick in load.since(over) if kick.error is None]
    deadline = time.monotonic() + PATIENCE
    await until(lambda: all(runs(record)[k.number] for k in counted))
    await asyncio.sleep(0.5)  # room for a wrong second run
    ran = runs(record)
    missing_results = []
    for kick in counted:
        assert kick.task_id is not None
        try:
            result = None
            while time.monotonic() < deadline:
                if await load.backend.is_result_ready(kick.task_id):
                    result = await load.backend.get_result(kick.task_id)
                    break
                await asyncio.sleep(0.1)
            if result is None or result.return_value != kick.number:
                missing_results.append(f"{kick.number}: {result}")
        except Exception as exc:
            missing_results.append(f"{kick.number}: {describe(exc)}")
    await load.backend.shutdown()
    await load.broker.shutdown()

    ok = [kick for kick in load.kicks if kick.error is None]
    working_ok = [kick for kick in load.since(working) if kick.error is None]
    errors = collections.Counter(kick.error for kick in load.kicks if kick.error)
    summary = (
        f"kicked {len(load.kicks)}, failed {len(load.kicks) - len(ok)} ({dict(errors)}); "
        f"of {len(ok)} kicked: lost {sum(1 for k in ok if ran[k.number] == 0)}, "
        f"ran twice {sum(1 for k in ok if ran[k.number] > 1)}; "
        f"after the fault: kicked {len(load.since(over))}, counted {len(counted)}; "
        f"since kicks must work: kicked {len(load.since(working))}, succeeded {len(working_ok)}"
    )
    return Outcome(
        failed=[kick for kick in load.since(working) if kick.error is not None],
        lost=[kick for kick in counted if ran[kick.number] == 0],
        twice=[kick for kick in load.since(over) if ran[kick.number] > 1],
        missing_results=missing_results,
        summary=summary,
        ran_twice={number for number, count in ran.items() if count > 1},
        working=working_ok,
    )


def assert_nothing_lost(outcome: Outcome, worker: WorkerProcess) -> None:
    """The promises every outage test checks, each failure with the whole picture."""
    # The worker's own words, without taskiq's line per task.
    said = "\n".join(line for line in worker.output().splitlines() if "Executing task" not in line)
    picture = f"{outcome.summary}\nworker log without 'Executing task' lines:\n{said[-6000:]}"
    made = len(outcome.working)
    assert made >= MIN_KICKS_COUNTED, (
        f"too few kicks made and counted once they should work: {made}, "
        f"fewer than {MIN_KICKS_COUNTED}\n{picture}"
    )
    assert not outcome.failed, (
        f"kicks failed once they should work: {outcome.failed[:5]}\n{picture}"
    )
    assert not outcome.lost, (
        f"tasks kicked after the fault never ran: {outcome.lost[:5]}\n{picture}"
    )
    assert not outcome.twice, f"tasks ran twice: {outcome.twice[:5]}\n{picture}"
    assert not outcome.missing_results, f"results missing: {outcome.missing_results[:5]}\n{picture}"
    assert worker.proc.poll() is None, f"the worker exited\n{picture}"
    assert RESTARTED not in worker.output(), f"the worker process died and was restarted\n{picture}"
    print(outcome.summary)  # the figures, for `pytest -s`


# ----------------------------------------------------------- restart without data


@pytest.fixture
def empty_server() -> Iterator[StandaloneServer]:
    """A standalone server without persistence, for this test alone."""
    with StandaloneServer() as server:
        server.start()
        yield server


@pytest.mark.parametrize("kind", ["stream", "list"])
async def test_restart_without_data_under_load_loses_nothing_kicked_after_it(
    empty_server: StandaloneServer, kind: str, unique: str, tmp_path: Path
) -> None:
    record = tmp_path / "runs"
    config = app_config(empty_server.topology(), kind, f"queue-{unique}", record)
    with WorkerProcess(APP, config=config) as worker:
        await asyncio.to_thread(worker.wait_ready)
        async with kicking(config) as load:
            await asyncio.to_thread(empty_server.restart_empty)
            over = time.monotonic()
            await keep_kicking_until(over + GRACE + AFTER_GRACE)
        outcome = await settle(load, record, over)
        assert_nothing_lost(outcome, worker)


# --------------------------------------------------------- Redis down at worker start


def unstarted_group(name: TopologyName) -> ServerGroup:
    if name == "single":
        return StandaloneServer()
    if name == "cluster":
        return ClusterGroup(replicas=False)
    return SentinelGroup(replica=False)


def contact_port(topology: Topology) -> int:
    """The port a client is given: the server's, or the sentinel's that names it."""
    if topology.name == "sentinel":
        return topology.sentinels[0][1]
    port = urlsplit(topology.url).port
    assert port is not None
    return port


WAITING = re.compile(r"^.*(?:Redis|server).*not reachable.*$", re.MULTILINE | re.IGNORECASE)


@pytest.mark.parametrize("name", ["single", "cluster", "sentinel"])
async def test_worker_started_while_redis_is_down_waits_and_then_works(
    name: TopologyName, unique: str, tmp_path: Path
) -> None:
    record = tmp_path / "runs"
    with unstarted_group(name) as group:
        topology = group.topology()
        config = app_config(topology, "stream", f"queue-{unique}", record)
        with WorkerProcess(APP, config=config) as worker:
            await until(lambda: len(WAITING.findall(worker.output())) >= 2)
            assert worker.proc.poll() is None, worker.output()
            waits = WAITING.findall(worker.output())
            assert len(waits) >= 2, f"no line per attempt while Redis is down:\n{worker.output()}"
            assert "Traceback" not in worker.output()
            assert RESTARTED not in worker.output()
            await asyncio.to_thread(group.start)
            await asyncio.to_thread(worker.wait_ready, PATIENCE)

            broker, _ = build(config)
            await broker.startup()
            try:
                kicker: AsyncKicker[Any, Any] = AsyncKicker(RECORD_TASK, broker, {})
                task = await kicker.kiq(7)
                result = await task.wait_result(timeout=PATIENCE)
            finally:
                await broker.shutdown()
            assert result.return_value == 7
            assert runs(record) == {7: 1}
            assert RESTARTED not in worker.output()
            assert "Traceback" not in worker.output(), worker.output()
            # Each attempt says why, in the error's own words.
            said = topology.pick(
                single=f"Error 111 connecting to 127.0.0.1:{contact_port(topology)}",
                cluster=f"Error 111 connecting to 127.0.0.1:{contact_port(topology)}",
                sentinel=f"No master found for '{topology.master_name}'",
            )
            assert all(said in line for line in waits), waits
            # redis-py's repr of an error is its kind alone ("network:ConnectionError").
            assert not any(re.search(r"\w+:\w+Error\b", line) for line in waits), waits


async def test_worker_waiting_for_redis_stops_on_sigterm(unique: str, tmp_path: Path) -> None:
    with StandaloneServer() as server:
        config = app_config(server.topology(), "stream", f"queue-{unique}", tmp_path / "r")
        with WorkerProcess(APP, config=config) as worker:
            await asyncio.to_thread(worker.wait_for_line, "not reachable")
            # Raises WorkerProcessError if any process of the worker is still there by then:
            # taskiq's process manager does not wait for its children, so a worker that
            # ignored the signal would live on, orphaned, waiting for Redis forever.
            await asyncio.to_thread(worker.stop, signal.SIGTERM, PATIENCE)
            assert "Redis answers" not in worker.output()


@pytest.mark.parametrize("name", ["single", "cluster", "sentinel"])
async def test_producer_startup_raises_at_once_while_redis_is_down(
    name: TopologyName, unique: str, tmp_path: Path
) -> None:
    with unstarted_group(name) as group:
        config = app_config(group.topology(), "stream", f"queue-{unique}", tmp_path / "r")
        broker, _ = build(config)
        try:
            # RedisClusterException is no RedisError: redis-py's own hierarchy.
            with pytest.raises(
                (redis.RedisError, redis.exceptions.RedisClusterException)
            ) as caught:
                await asyncio.wait_for(broker.startup(), PATIENCE)
        finally:
            await broker.shutdown()
    message = str(caught.value)
    # The address that could not be reached: the server, or the sentinel that names it.
    assert f"127.0.0.1:{contact_port(group.topology())}" in message, message
    assert "network:ConnectionError" not in message, message


# ------------------------------------------------------- what the user reads


WRONGTYPE = "WRONGTYPE Operation against a key holding the wrong kind of value"


@pytest.mark.parametrize("kind", ["stream", "list"])
async def test_wrongtype_on_the_queue_key_is_said_in_words(
    redis_servers: RedisServers, kind: str, unique: str, tmp_path: Path
) -> None:
    topology = Topology.of(redis_servers, "single")
    queue = f"queue-{unique}"
    raw = Redis.from_url(topology.url)
    await raw.set(queue, "not a queue")
    config = app_config(topology, kind, queue, tmp_path / "runs")
    try:
        broker, _ = build(config)
        await broker.startup()
        kicker: AsyncKicker[Any, Any] = AsyncKicker(RECORD_TASK, broker, {})
        try:
            with pytest.raises(SendTaskError) as caught:
                await kicker.kiq(1)
        finally:
            await broker.shutdown()
        # taskiq wraps what the broker raised; the cause is what the user reads.
        assert isinstance(caught.value.__cause__, redis.ResponseError)
        assert str(caught.value.__cause__) == WRONGTYPE

        with WorkerProcess(APP, config=config) as worker:
            await asyncio.to_thread(worker.wait_for_line, WRONGTYPE, 2)
            log = worker.output()
            alive = worker.proc.poll() is None and RESTARTED not in log
    finally:
        await raw.delete(queue)
        await raw.aclose()
    lines = [line for line in log.splitlines() if WRONGTYPE in line]
    # Each line: a log line (not a traceback) naming the key, the server's words, no noise.
    assert alive, f"the worker died of a wrong key type:\n{log}"
    assert "Traceback" not in log, log
    assert all(queue in line for line in lines), lines
    assert not any(re.search(r"script: [0-9a-f]{40}|@user_script", line) for line in lines), lines
    assert "server:ResponseError" not in log


async def acl_log(url: str, reason: str, username: str) -> int:
    """How many refusals of ``reason`` the server logged for ``username`` (entries count)."""
    client = Redis.from_url(url, decode_responses=True)
    try:
        entries = await client.acl_log()
    finally:
        await client.aclose()
    total = 0
    for entry in entries:
        if entry["reason"] == reason and entry["username"] == username:
            total += int(str(entry["count"]))
    return total


async def test_wrong_password_is_said_at_once_without_retries(unique: str) -> None:
    user = f"app-{unique}"
    with StandaloneServer([f"user {user} on >right-password ~* &* +@all"]) as server:
        server.start()
        url = server.url.replace("redis://", f"redis://{user}:wrong-password@")
        broker = taskiq_redis.RedisStreamBroker(url, queue_name=f"queue-{unique}")
        try:
            with pytest.raises(redis.AuthenticationError) as caught:
                await asyncio.wait_for(broker.startup(), PATIENCE)
        finally:
            await broker.shutdown()
        attempts = await acl_log(server.url, "auth", user)
    message = str(caught.value)
    problems = []
    if "invalid username-password pair or user is disabled" not in message:
        problems.append(f"the server's words are missing: {message!r}")
    if attempts != 1:
        problems.append(f"{attempts} AUTH attempts for one startup(): retried")
    assert not problems, problems


async def test_user_without_scripting_is_told_what_it_needs(
    redis_servers: RedisServers, unique: str
) -> None:
    url = redis_servers.standalone_url
    user = f"noscript-{unique}"
    admin = Redis.from_url(url)
    await admin.acl_setuser(
        user,
        enabled=True,
        passwords=["+pw"],
        keys=["*"],
        channels=["*"],
        commands=["+@all", "-@scripting"],
    )
    try:
        broker = taskiq_redis.RedisStreamBroker(
            url.replace("redis://", f"redis://{user}:pw@"), queue_name=f"queue-{unique}"
        )
        try:
            with pytest.raises(redis.exceptions.NoPermissionError) as caught:
                await asyncio.wait_for(broker.startup(), PATIENCE)
        finally:
            await broker.shutdown()
        attempts = await acl_log(url, "command", user)
    finally:
        await admin.acl_deluser(user)
        await admin.aclose()
    message = str(caught.value)
    problems = []
    if "has no permissions to run the 'script|load' command" not in message:
        problems.append(f"the server's words are missing: {message!r}")
    if "+@scripting" not in message:
        problems.append(f"the error does not say what the user needs (+@scripting): {message!r}")
    if attempts != 1:
        problems.append(f"{attempts} refused commands for one startup(): retried")
    assert not problems, problems
