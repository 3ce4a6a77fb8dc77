"""Unique kicks and cancel, on the list and stream brokers, on every topology.

- 50 concurrent unique kicks of one id leave one message; the id is free again once its message
  is gone (acknowledged or popped), and while it is delayed, moved by the mover, or held by a
  worker, a unique kick of it is dropped.
- ``cancel`` deletes a queued or delayed task at any level (found through the unique index, or
  by looking through the queue a slice at a time), and its waiter gets ``TaskCancelledError``;
  a task a worker holds, ran, or that is unknown gives False.
- Through a real ``taskiq worker``: 50 concurrent unique kicks, one run, every handle gets the
  result; a cancelled task never runs and its waiter returns at once.
- Races with a real worker: cancels while it drains (each task cancelled or run, once), and
  unique kicks while it runs and acknowledges the task (never a second copy queued).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import subprocess
import sys
from typing import Any, cast

import pytest
from taskiq import BrokerMessage
from taskiq.kicker import AsyncKicker

import taskiq_redis
from taskiq_redis import delays, keys, scripts, task_ids
from tests.queue_kinds import KINDS, acked, body_of, broker_class, make_broker
from tests.queue_kinds import message as queue_message
from tests.servers import Topology
from tests.worker_process import ROOT, WorkerProcess

PATIENCE = 20.0
TASK = "task_ids_app.echo"  # tests/apps/task_ids_app.py


def message(task_id: str, **labels: Any) -> BrokerMessage:
    return queue_message(task_id, **labels)


def spaced_message(task_id: str, **labels: Any) -> BrokerMessage:
    """A message as taskiq's kicker writes it with its default JSON serializer: ``json.dumps``,
    a space after each colon, non-ASCII escaped."""
    made = message(task_id, **labels)
    made.message = json.dumps(json.loads(made.message)).encode()
    return made


def unique_message(task_id: str, **labels: Any) -> BrokerMessage:
    return queue_message(task_id, unique=True, **labels)


async def waiting(raw_redis: Any, kind: str, queue: str) -> int:
    """Messages waiting in the queue at every level (not counting delayed ones)."""
    total = 0
    for key in task_ids.level_keys(queue, 9):
        total += await (raw_redis.xlen(key) if kind == "stream" else raw_redis.llen(key))
    return int(total)


def backend_class(topology: Topology) -> str:
    return topology.pick(
        single="RedisAsyncResultBackend",
        cluster="RedisAsyncClusterResultBackend",
        sentinel="RedisAsyncSentinelResultBackend",
    )


def make_backend(topology: Topology) -> Any:
    cls = getattr(taskiq_redis, backend_class(topology))
    if topology.name == "sentinel":
        return cls(**topology.kwargs())
    return cls(topology.url)


@pytest.mark.parametrize("kind", KINDS)
async def test_fifty_concurrent_unique_kicks_leave_one_message_until_it_is_gone(
    kind: str, topology: Topology, raw_redis: Any, unique: str
) -> None:
    queue = f"once{kind}{unique}"
    broker: Any = make_broker(kind, topology, queue)
    await broker.startup()
    listener = broker.listen()
    try:
        await asyncio.gather(
            *(broker.kick(unique_message("order-42", priority=3)) for _ in range(50))
        )
        assert await waiting(raw_redis, kind, queue) == 1
        await broker.kick(message("order-42"))  # without the label: queued as ever
        assert await waiting(raw_redis, kind, queue) == 2
        taken = await acked(await asyncio.wait_for(anext(listener), PATIENCE))
        assert body_of(taken) == "order-42"
        if kind == "stream":  # the ack is sent after ack() returns
            deadline = asyncio.get_running_loop().time() + PATIENCE
            while await raw_redis.xlen(keys.priority_key(queue, 3)):
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.05)
        await broker.kick(unique_message("order-42", priority=3))  # its message is gone: free again
        assert await waiting(raw_redis, kind, queue) == 2
    finally:
        await listener.aclose()
        await broker.shutdown()


async def test_a_stream_message_held_by_a_worker_blocks_its_id_until_acknowledged(
    topology: Topology, raw_redis: Any, unique: str
) -> None:
    queue = f"held{unique}"
    broker: Any = make_broker("stream", topology, queue)
    await broker.startup()
    listener = broker.listen()
    try:
        await broker.kick(unique_message("job-1"))
        received = await asyncio.wait_for(anext(listener), PATIENCE)  # held, not acknowledged
        await broker.kick(unique_message("job-1"))
        assert await raw_redis.xlen(queue) == 1
        assert not await broker.cancel("job-1")  # a worker holds it
        await acked(received)
        deadline = asyncio.get_running_loop().time() + PATIENCE
        while await raw_redis.xlen(queue):
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
        await broker.kick(unique_message("job-1"))
        assert await raw_redis.xlen(queue) == 1
    finally:
        await listener.aclose()
        await broker.shutdown()


@pytest.mark.parametrize("kind", KINDS)
async def test_a_delayed_unique_message_blocks_its_id_before_and_after_it_is_due(
    kind: str, topology: Topology, raw_redis: Any, unique: str
) -> None:
    queue = f"later{kind}{unique}"
    broker = make_broker(kind, topology, queue)
    await broker.startup()
    try:
        await broker.kick(unique_message("soon", delay=0.3, priority=2))
        await broker.kick(unique_message("soon", delay=0.3, priority=2))
        assert await raw_redis.zcard(keys.delayed_key(queue)) == 1
        await asyncio.sleep(0.5)
        await delays.move_due(
            broker.redis_connection,
            queue,
            cast(delays.QueueKind, kind),
            task_ids.level_keys(queue, 9),
        )  # what a worker's mover does
        assert await waiting(raw_redis, kind, queue) == 1
        await broker.kick(unique_message("soon", priority=2))  # its record moved with it
        assert await waiting(raw_redis, kind, queue) == 1
    finally:
        await broker.shutdown()


@pytest.mark.parametrize("kind", KINDS)
async def test_cancel_deletes_a_waiting_task_and_its_waiter_gets_the_error(
    kind: str, topology: Topology, raw_redis: Any, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by looking through the queue (not a unique kick): a slice of 7 messages per call,
    so the look spans several calls; then a delayed one and a unique one. Found as taskiq's
    formatters write the id (with a space after the colon, a non-ASCII id escaped or not), and
    never mistaken for a message that holds the id elsewhere (an argument)."""
    monkeypatch.setattr(task_ids, "CANCEL_SLICE", 7)
    queue = f"cancel{kind}{unique}"
    broker: Any = make_broker(kind, topology, queue).with_result_backend(make_backend(topology))
    await broker.startup()
    try:
        for number in range(40):
            await broker.kick(message(f"filler{number}", priority=number % 3))
        await broker.kick(queue_message("decoy", args=["target", '"task_id": "target"']))
        await broker.kick(message("target", priority=1))
        await broker.kick(spaced_message("spaced", priority=2))
        await broker.kick(spaced_message("zadanie-ż"))
        await broker.kick(message("zadanie-ł"))
        for number in range(40, 60):
            await broker.kick(message(f"filler{number}"))
        await broker.kick(message("parked", delay=60))
        await broker.kick(unique_message("indexed", priority=4))
        before = await waiting(raw_redis, kind, queue)
        assert await broker.cancel("target")
        assert await waiting(raw_redis, kind, queue) == before - 1
        for task_id in ("spaced", "zadanie-ż", "zadanie-ł"):
            assert await broker.cancel(task_id), task_id
        before -= 3
        assert await broker.cancel("parked")
        assert await raw_redis.zcard(keys.delayed_key(queue)) == 0
        assert await broker.cancel("indexed")
        assert not await broker.cancel("target")  # gone already
        assert not await broker.cancel("never-kicked")
        result = await broker.result_backend.get_result("target")
        assert result.is_err
        assert "Task target was cancelled" in str(result.error)
        leftover = []
        async for received in receive_all(broker, before - 2):
            leftover.append(body_of(received))
        assert "target" not in leftover
        assert "decoy" in leftover
        assert len(leftover) == before - 2
    finally:
        await broker.shutdown()


def count_cancel_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that gets one item per ``task_cancel`` script call: how much of the queue a
    cancel had to look through, without timing it."""
    calls: list[int] = []
    real_run = scripts.run

    async def counted(conn: Any, script: scripts.Script, *args: Any) -> Any:
        if script.name == task_ids.CANCEL:
            calls.append(1)
        return await real_run(conn, script, *args)

    monkeypatch.setattr(scripts, "run", counted)
    return calls


@pytest.mark.parametrize("kind", KINDS)
async def test_a_cancellable_task_is_found_at_once_in_a_long_queue(
    kind: str, topology: Topology, raw_redis: Any, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Labelled ``cancellable``, a task in a stream queue is recorded in the task index as it is
    kicked: cancel takes one script call where an unlabelled one in the same place takes many
    (a slice of 7 messages per call). A list queue records nothing (it is looked through fast
    enough); either way a cancellable kick is never dropped as a duplicate."""
    monkeypatch.setattr(task_ids, "CANCEL_SLICE", 7)
    calls = count_cancel_calls(monkeypatch)
    queue = f"recorded{kind}{unique}"
    broker: Any = make_broker(kind, topology, queue)
    await broker.startup()
    try:
        for number in range(60):
            if number == 30:
                await broker.kick(message("recorded", priority=1, cancellable=True))
                await broker.kick(message("plain", priority=1))
            await broker.kick(message(f"filler{number}"))
        await broker.kick(message("twice", cancellable=True))
        await broker.kick(message("twice", cancellable="true"))
        await broker.kick(message("later", delay=60, cancellable=True))
        before = await waiting(raw_redis, kind, queue)
        assert before == 64  # nothing dropped

        recorded = await raw_redis.hkeys(keys.unique_key(queue))
        assert sorted(recorded) == ([b"later", b"recorded", b"twice"] if kind == "stream" else [])
        assert await broker.cancel("recorded")
        assert len(calls) == 1 if kind == "stream" else len(calls) > 3
        calls.clear()
        assert await broker.cancel("plain")  # the same place, found by looking
        assert len(calls) > 3
        calls.clear()
        assert await broker.cancel("later")
        assert len(calls) == 1
        assert await raw_redis.zcard(keys.delayed_key(queue)) == 0
        assert await broker.cancel("twice")
        assert await waiting(raw_redis, kind, queue) == before - 3
        leftover = [body_of(received) async for received in receive_all(broker, before - 3)]
        assert sorted(leftover) == sorted([f"filler{number}" for number in range(60)] + ["twice"])
    finally:
        await broker.shutdown()


async def test_the_task_index_is_swept_once_it_is_mostly_stale(
    topology: Topology, raw_redis: Any, unique: str
) -> None:
    """200 cancellable tasks run and acknowledged leave 200 stale records; the next kicks sweep
    them until the index holds at most about twice the queue (here 50 messages)."""
    queue = f"swept{unique}"
    index = keys.unique_key(queue)
    broker: Any = make_broker("stream", topology, queue)
    await broker.startup()
    try:
        for number in range(200):
            await broker.kick(message(f"done{number}", cancellable=True))
        assert [body async for body in receive_all(broker, 200)]
        for _ in range(100):  # acks go in batches: until every entry is acknowledged and gone
            if not await raw_redis.xlen(queue):
                break
            await asyncio.sleep(0.05)
        assert await raw_redis.hlen(index) == 200
        for number in range(50):
            await broker.kick(message(f"new{number}", cancellable=True))
        assert await raw_redis.hlen(index) <= 2 * 50 + 64 + 4
        assert await broker.cancel("new7")
    finally:
        await broker.shutdown()


async def test_a_stream_look_starts_after_what_the_group_was_handed(
    topology: Topology, raw_redis: Any, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Entries the group was handed can never be cancelled, so the look skips them: a task
    kicked after 40 entries a worker holds, with 40 more after it, is found in one call. (The
    worker is a bare XREADGROUP: a broker's read ahead could take the task meanwhile.)"""
    monkeypatch.setattr(task_ids, "CANCEL_SLICE", 7)
    calls = count_cancel_calls(monkeypatch)
    queue = f"handed{unique}"
    broker: Any = make_broker("stream", topology, queue)
    await broker.startup()
    try:
        for number in range(40):
            await broker.kick(message(f"held{number}"))
        held = await raw_redis.xreadgroup("taskiq", "worker-1", {queue: ">"}, count=40)
        assert len(held[0][1]) == 40  # handed over, never acknowledged: held
        await broker.kick(message("target"))
        for number in range(40):
            await broker.kick(message(f"after{number}"))
        assert await broker.cancel("target")
        assert len(calls) == 1
        calls.clear()
        assert not await broker.cancel("held3")  # a worker holds it
    finally:
        await broker.shutdown()


async def receive_all(broker: Any, count: int) -> Any:
    listener = broker.listen()
    try:
        for _ in range(count):
            yield await acked(await asyncio.wait_for(anext(listener), PATIENCE))
    finally:
        await listener.aclose()


def worker_config_for(kind: str, topology: Topology, queue: str) -> dict[str, Any]:
    return {
        "broker": broker_class(kind, topology),
        "broker_kwargs": {**topology.kwargs(), "queue_name": queue},
        "backend": backend_class(topology),
        "backend_kwargs": topology.kwargs(url_param="redis_url")
        if topology.name != "sentinel"
        else topology.kwargs(),
    }


@pytest.mark.parametrize("kind", KINDS)
async def test_unique_kicks_and_cancel_in_a_real_worker(
    kind: str, topology: Topology, unique: str
) -> None:
    queue = f"worker{kind}{unique}"
    config = worker_config_for(kind, topology, queue)
    producer: Any = make_broker(kind, topology, queue).with_result_backend(make_backend(topology))
    await producer.startup()

    def kicker(task_id: str) -> Any:  # as the app's task, kicked by name
        return AsyncKicker(TASK, producer, {"unique": True}).with_task_id(task_id)

    try:
        # Kicked before the worker starts: a list forgets a message once popped, so kicks that
        # race a worker's pop are not all dropped there (a stream holds it until acknowledged).
        handles = await asyncio.gather(*(kicker(f"one{unique}").kiq(7) for _ in range(50)))
        later = await kicker(f"later{unique}").with_labels(delay=3).kiq(2)
        recorded: Any = AsyncKicker(TASK, producer, {"cancellable": True, "delay": 3})
        await recorded.with_task_id(f"recorded{unique}").kiq(3)
        with WorkerProcess("tests.apps.task_ids_app:broker", config=config) as worker:
            worker.wait_ready()
            results = await asyncio.gather(
                *(handle.wait_result(timeout=PATIENCE) for handle in handles)
            )
            assert [result.return_value for result in results] == [7] * 50
            cancelled = await producer.cancel(f"later{unique}")  # delayed, not due yet
            cancelled_too = await producer.cancel(f"recorded{unique}")
            busy = await kicker(f"busy{unique}").kiq(1, 1.0)
            await asyncio.to_thread(worker.wait_for_line, "ran 1")
            running = await producer.cancel(f"busy{unique}")
            result = await later.wait_result(timeout=PATIENCE)
            assert (await busy.wait_result(timeout=PATIENCE)).return_value == 1
            done = await producer.cancel(f"busy{unique}")
            await asyncio.sleep(3.5)  # past the cancelled task's due time
            log = worker.output()
        assert len(re.findall(r"\bran 7\b", log)) == 1, log
        assert "ran 2" not in log, log
        assert "ran 3" not in log, log
        assert cancelled
        assert cancelled_too
        assert not running
        assert not done
        assert result.is_err
        assert "was cancelled" in str(result.error)
    finally:
        await producer.shutdown()


@pytest.mark.parametrize("kind", KINDS)
async def test_cancels_racing_a_worker_cancel_or_run_each_task_once(
    kind: str, topology: Topology, unique: str
) -> None:
    """120 tasks (every other one labelled cancellable) and a worker draining them while each
    is cancelled, in shuffled order: every task either ran once and its cancel said False, or
    never ran, its cancel said True and its waiter got the cancelled error. None is lost."""
    queue = f"race{kind}{unique}"
    producer: Any = make_broker(kind, topology, queue).with_result_backend(make_backend(topology))
    await producer.startup()
    count = 120
    try:
        handles = {}
        for number in range(count):
            labels = {"cancellable": True} if number % 2 else {}
            kicker: Any = AsyncKicker(TASK, producer, labels)
            handles[number] = await kicker.with_task_id(f"r{number}-{unique}").kiq(number, 0.1)
        order = list(range(count))
        random.Random(unique).shuffle(order)
        config = worker_config_for(kind, topology, queue)
        # At most 10 at a time, 0.1 s each: the worker takes tasks all the while the cancels
        # run (about 100 a second against its 100), so both outcomes happen.
        args = ["--max-async-tasks", "10"]
        with WorkerProcess("tests.apps.task_ids_app:broker", config=config, args=args) as worker:
            worker.wait_ready()
            cancelled = {}
            for number in order:
                cancelled[number] = await producer.cancel(f"r{number}-{unique}")
            results = {
                number: await handle.wait_result(timeout=PATIENCE)
                for number, handle in handles.items()
            }
            ran = {number for number in range(count) if results[number].return_value == number}
            await asyncio.to_thread(worker.wait_for_line, "finished", len(ran))
            log = worker.output()
        runs = {number: len(re.findall(rf"\bran {number}\n", log)) for number in range(count)}
        for number in range(count):
            if cancelled[number]:
                assert runs[number] == 0, (number, log)
                assert results[number].is_err, number
                assert "was cancelled" in str(results[number].error)
            else:
                assert runs[number] == 1, (number, runs[number])
                assert number in ran
        assert 0 < sum(cancelled.values()) < count  # the race was run, both ways
    finally:
        await producer.shutdown()


async def test_unique_kicks_racing_the_ack_never_queue_a_second_copy(
    topology: Topology, unique: str
) -> None:
    """A stream holds a unique id until its message is acknowledged: unique kicks made all the
    while a worker runs and acknowledges the task are dropped until the ack, then one goes. The
    task's runs never overlap, it runs again after the ack, and every handle gets a result."""
    queue = f"ackrace{unique}"
    producer: Any = make_broker("stream", topology, queue).with_result_backend(
        make_backend(topology)
    )
    await producer.startup()
    kicker: Any = AsyncKicker(TASK, producer, {"unique": True}).with_task_id(f"u{unique}")
    try:
        config = worker_config_for("stream", topology, queue)
        with WorkerProcess("tests.apps.task_ids_app:broker", config=config) as worker:
            worker.wait_ready()
            handles = []
            for _ in range(150):  # 1.5 s of kicks, each run 0.1 s
                handles.append(await kicker.kiq(5, 0.1))
                await asyncio.sleep(0.01)
            results = [await handle.wait_result(timeout=PATIENCE) for handle in handles]
            await asyncio.to_thread(
                worker.wait_for_line, "finished 5", worker.output().count("ran 5")
            )
            log = worker.output()
        marks = re.findall(r"\b(ran|finished) 5\n", log)
        assert marks == ["ran", "finished"] * (len(marks) // 2), marks  # one at a time
        assert len(marks) // 2 >= 2, marks  # taken again once acknowledged
        assert len(marks) // 2 <= len(handles) // 5  # most kicks were dropped
        assert all(result.return_value == 5 for result in results)
    finally:
        await producer.shutdown()


def run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)


async def test_the_cancel_command_says_what_it_did(topology: Topology, unique: str) -> None:
    queue = f"cli{unique}"
    broker: Any = make_broker("stream", topology, queue)
    await broker.startup()
    try:
        await broker.kick(message("waits"))
        if topology.name == "sentinel":
            host, port = topology.sentinels[0]
            where = ["--sentinel", f"{host}:{port}", "--master-name", topology.master_name]
        else:
            where = ["--url", topology.url]
        command = [sys.executable, "-m", "taskiq_redis", "cancel", queue, "waits", "nope"]
        done = await asyncio.to_thread(run, [*command, *where])
        assert done.returncode == 0, done.stderr
        assert "waits: cancelled" in done.stdout
        assert "nope: not queued" in done.stdout
        again = await asyncio.to_thread(run, [*command[:-1], *where])
        assert again.returncode == 1
        assert "waits: not queued" in again.stdout
        # A group the queue does not have counts nothing as taken: refused, nothing deleted.
        await broker.kick(message("held-elsewhere"))
        wrong = [*command[:-2], "held-elsewhere", *where, "--consumer-group", "nope"]
        refused = await asyncio.to_thread(run, wrong)
        assert refused.returncode != 0
        assert "has no consumer group 'nope'" in refused.stderr
        assert await broker.cancel("held-elsewhere")
    finally:
        await broker.shutdown()
