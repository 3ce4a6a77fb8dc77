"""``taskiq-redis queues`` and ``taskiq-redis dead-letters`` against real servers.

The figures the command prints are compared with what the test put into Redis through the
package's own brokers; requeued dead letters are then run by a real ``taskiq worker``.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncGenerator
from typing import Any

import pytest
from redis.asyncio import Redis
from taskiq import AckableMessage, BrokerMessage
from taskiq.kicker import AsyncKicker

import taskiq_redis
from taskiq_redis import delays, keys
from taskiq_redis.brokers.stream import BaseStreamBroker
from tests.servers import StandaloneServer, Topology
from tests.worker_process import WorkerProcess

RECORD_TASK = "ops_app.record"  # tests/apps/ops_app.py


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "taskiq_redis", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def server_args(topology: Topology) -> list[str]:
    if topology.name == "sentinel":
        host, port = topology.sentinels[0]
        return ["--sentinel", f"{host}:{port}", "--master-name", topology.master_name]
    return ["--url", topology.url]


def stream_class(topology: Topology) -> str:
    return topology.pick(
        single="RedisStreamBroker",
        cluster="RedisStreamClusterBroker",
        sentinel="RedisStreamSentinelBroker",
    )


def list_class(topology: Topology) -> str:
    return topology.pick(
        single="ListQueueBroker",
        cluster="ListQueueClusterBroker",
        sentinel="ListQueueSentinelBroker",
    )


def stream_broker(topology: Topology, queue: str, **options: Any) -> BaseStreamBroker:
    broker: BaseStreamBroker = getattr(taskiq_redis, stream_class(topology))(
        **topology.kwargs(), queue_name=queue, **options
    )
    return broker


async def kick(broker: Any, name: str) -> None:
    kicker: AsyncKicker[[str], None] = AsyncKicker(RECORD_TASK, broker, {})
    await kicker.kiq(name)


async def five_kicked_two_held(
    topology: Topology, queue: str
) -> tuple[BaseStreamBroker, AsyncGenerator[AckableMessage, None]]:
    """A started stream broker of ``queue`` with five tasks kicked and two of them read and not
    acknowledged (pending for its consumer, three waiting), and its listener to close."""
    broker = stream_broker(topology, queue, xread_count=2)
    await broker.startup()
    for number in range(5):
        await kick(broker, f"n{number}")
    listener = broker.listen()
    for _ in range(2):
        await asyncio.wait_for(anext(listener), 10)
    return broker, listener


def dead_letter_fields(data: bytes | None, queue: str, entry_id: str) -> dict[str, Any]:
    """A dead letter as the stream broker writes it (see BaseStreamBroker._dead_letter)."""
    about = {"reason": "test", "stream": queue, "id": entry_id, "deliveries": 3, "group": "g"}
    return {"data": data, **about} if data is not None else about


async def test_queues_shows_what_is_in_redis(
    topology: Topology, raw_redis: Any, unique: str
) -> None:
    queue, plain = f"view{unique}", f"plain{unique}"
    broker, listener = await five_kicked_two_held(topology, queue)
    await delays.add(broker._conn, queue, b"later", 60_000)
    for number in range(2):
        await raw_redis.xadd(
            keys.dead_letter_key(queue), dead_letter_fields(b"x", queue, f"{number}-1")
        )
    await raw_redis.lpush(plain, "a", "b", "c")
    try:
        done = run_cli("queues", queue, plain, "--json", *server_args(topology))
        assert done.returncode == 0, done.stderr
        document = json.loads(done.stdout)
        assert document["scan_complete"] is None
        stream_view, list_view = document["queues"]
        assert stream_view["name"] == queue
        assert stream_view["kind"] == "stream"
        assert (stream_view["length"], stream_view["delayed"], stream_view["dead_letters"]) == (
            5,
            1,
            2,
        )
        [group] = stream_view["groups"]
        assert (group["name"], group["pending"], group["lag"]) == ("taskiq", 2, 3)
        [consumer] = group["consumers"]
        assert (consumer["name"], consumer["pending"]) == (broker.consumer_name, 2)
        # The idle time Redis gives, in ms: no more than Redis says right after the command.
        [after] = await raw_redis.xinfo_consumers(queue, "taskiq")
        assert 0 <= consumer["idle_ms"] <= after["idle"], (consumer, after)
        assert list_view == {
            "name": plain,
            "kind": "list",
            "length": 3,
            "delayed": 0,
            "dead_letters": 0,
            "groups": [],
            "levels": {},
        }

        human = run_cli("queues", queue, *server_args(topology))
        assert human.returncode == 0, human.stderr
        lines = human.stdout.splitlines()
        assert lines[0] == f"{queue}  stream  length 5  delayed 1  dead letters 2"
        assert lines[1] == "  group taskiq  pending 2  lag 3  consumers 1"
        assert lines[2].startswith(f"    consumer {broker.consumer_name}  pending 2  idle ")
    finally:
        await listener.aclose()
        await broker.shutdown()


async def test_queues_finds_queues_by_scanning(
    topology: Topology, raw_redis: Any, unique: str
) -> None:
    stream, listed, delayed_only, dead_only, hashed = (f"{kind}{unique}" for kind in "sldxh")
    await raw_redis.hset(hashed, "field", "value")  # a delayed set beside a key of another type
    await raw_redis.zadd(keys.delayed_key(hashed), {b"id:0:m": 1})
    await raw_redis.xadd(stream, {"data": "1"})
    await raw_redis.lpush(listed, "1")
    await raw_redis.zadd(keys.delayed_key(delayed_only), {b"id:0:m": 1})
    await raw_redis.xadd(
        keys.dead_letter_key(dead_only), dead_letter_fields(b"m", dead_only, "1-1")
    )

    done = run_cli("queues", "--json", *server_args(topology))
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert document["scan_complete"] is True
    found = {view["name"]: view for view in document["queues"]}
    assert found[stream]["kind"] == "stream"
    assert found[listed]["kind"] == "list"
    assert (found[delayed_only]["kind"], found[delayed_only]["delayed"]) == ("none", 1)
    assert (found[dead_only]["kind"], found[dead_only]["dead_letters"]) == ("none", 1)
    assert (found[hashed]["kind"], found[hashed]["length"], found[hashed]["delayed"]) == (
        "hash",
        None,
        1,
    )
    assert not [name for name in found if name.endswith((":dead", ":delayed"))]


async def test_dead_letters_requeue_then_a_worker_runs_them(
    topology: Topology, raw_redis: Any, unique: str
) -> None:
    """Tasks dead-lettered for too many deliveries are listed, requeued and run once each."""
    queue = f"dl{unique}"
    first = stream_broker(topology, queue, idle_timeout=100)
    await first.startup()
    for number in range(3):
        await kick(first, f"task{number}")
    listener = first.listen()
    for _ in range(3):  # taken and never acknowledged: their worker "crashed" mid-task
        await asyncio.wait_for(anext(listener), 10)
    await listener.aclose()
    await first.shutdown()  # released: the next reclaim counts a second delivery
    second = stream_broker(topology, queue, idle_timeout=100, max_deliveries=1)
    await second.startup()
    listener = second.listen()
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(anext(listener), 3)
    await listener.aclose()
    await second.shutdown()
    assert await raw_redis.xlen(keys.dead_letter_key(queue)) == 3
    no_data = await raw_redis.xadd(
        keys.dead_letter_key(queue), dead_letter_fields(None, queue, "9-9")
    )

    listed = run_cli("dead-letters", "list", queue, "--json", *server_args(topology))
    assert listed.returncode == 0, listed.stderr
    letters = json.loads(listed.stdout)
    assert len(letters) == 4
    assert {letter["reason"] for letter in letters[:3]} == {
        "delivered 2 times, max_deliveries is 1"
    }
    assert all(letter["stream"] == queue and letter["group"] == "taskiq" for letter in letters[:3])
    assert letters[3]["data"] is None

    requeued = run_cli("dead-letters", "requeue", queue, *server_args(topology))
    assert requeued.returncode == 0, requeued.stderr
    assert requeued.stdout.strip() == (
        f"requeued 3 dead letters to {queue} (1 without a data field left in place)"
    )
    remaining = await raw_redis.xrange(keys.dead_letter_key(queue))
    assert [_text(entry_id) for entry_id, _ in remaining] == [_text(no_data)]
    assert await raw_redis.xlen(queue) == 3

    config = {
        "broker": stream_class(topology),
        "broker_kwargs": {**topology.kwargs(), "queue_name": queue},
    }
    with WorkerProcess("tests.apps.ops_app:broker", config=config) as worker:
        worker.wait_ready()
        for number in range(3):
            worker.wait_for_line(f"ran task{number} at")
        await asyncio.sleep(1)
        log = worker.output()
    assert sum(log.count(f"ran task{number} at") for number in range(3)) == 3, log


async def test_dead_letters_requeue_limit_and_purge(
    topology: Topology, raw_redis: Any, unique: str
) -> None:
    queue = f"dp{unique}"
    dead = keys.dead_letter_key(queue)
    for number in range(7):
        await raw_redis.xadd(dead, dead_letter_fields(f"m{number}".encode(), queue, f"{number}-1"))

    requeued = run_cli("dead-letters", "requeue", queue, "--limit", "2", *server_args(topology))
    assert requeued.returncode == 0, requeued.stderr
    assert requeued.stdout.strip() == f"requeued 2 dead letters to {queue}"
    assert [fields[b"data"] for _, fields in await raw_redis.xrange(queue)] == [b"m0", b"m1"]

    purged = run_cli("dead-letters", "purge", queue, *server_args(topology))
    assert purged.returncode == 0, purged.stderr
    assert purged.stdout.strip() == f"purged 5 dead letters of {queue}"
    assert await raw_redis.xlen(dead) == 0
    again = run_cli("dead-letters", "purge", queue, *server_args(topology))
    assert again.stdout.strip() == f"purged 0 dead letters of {queue}"


async def test_requeue_to_a_list_queue_pushes_where_the_list_broker_pops(
    topology: Topology, raw_redis: Any, unique: str
) -> None:
    queue = f"dlist{unique}"
    broker = getattr(taskiq_redis, list_class(topology))(**topology.kwargs(), queue_name=queue)
    await broker.startup()
    await broker.kick(BrokerMessage(task_id="old", task_name="t", message=b"older", labels={}))
    await raw_redis.xadd(keys.dead_letter_key(queue), dead_letter_fields(b"revived", queue, "1-1"))
    try:
        assert run_cli("dead-letters", "requeue", queue, *server_args(topology)).returncode == 0
        listener = broker.listen()
        taken = [await asyncio.wait_for(anext(listener), 10) for _ in range(2)]
        await listener.aclose()
    finally:
        await broker.shutdown()
    assert taken == [b"older", b"revived"]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["queues", "--url", "redis://127.0.0.1:1"], 1, "127.0.0.1:1"),
        (["dead-letters", "purge", "q", "--url", "redis://127.0.0.1:1"], 1, "127.0.0.1:1"),
        (["dead-letters", "requeue", "--url", "redis://127.0.0.1:1"], 2, "required: queue"),
        (["queues", "--scan-limit", "0", "--url", "redis://x"], 2, "at least 1"),
        (["dead-letters", "list", "q", "--count", "many", "--url", "redis://x"], 2, "'many'"),
        (["queues", "--sentinel", "127.0.0.1:1"], 2, "needs --master-name"),
        (["dead-letters", "shred", "q"], 2, "invalid choice"),
    ],
)
def test_cli_failures_are_one_line(args: list[str], code: int, message: str) -> None:
    done = run_cli(*args)
    assert done.returncode == code, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    if code == 1:
        assert len(done.stderr.strip().splitlines()) == 1


async def test_a_key_that_is_no_queue_is_named_in_the_error(
    topology: Topology, raw_redis: Any, unique: str
) -> None:
    await raw_redis.hset(f"h{unique}", "field", "value")
    done = run_cli("queues", f"h{unique}", *server_args(topology))
    assert done.returncode == 1
    assert (
        done.stderr.strip()
        == f"taskiq-redis: 'h{unique}' is a Redis hash, not a stream or list queue"
    )


async def test_a_scan_stops_near_scan_limit_and_says_so() -> None:
    """Past ``--scan-limit`` keys the scan stops, the document says it is incomplete and a
    warning names the option; without the limit in reach every queue is found."""
    total = 5000
    with StandaloneServer() as server:
        server.start()
        raw = Redis.from_url(server.url)
        try:
            pipe = raw.pipeline(transaction=False)
            for number in range(total):
                pipe.lpush(f"many{number}", "m")
            await pipe.execute()
        finally:
            await raw.aclose()
        cut = run_cli("queues", "--json", "--scan-limit", "1000", "--url", server.url)
        whole = run_cli("queues", "--json", "--url", server.url)
    assert cut.returncode == 0, cut.stderr
    cut_document = json.loads(cut.stdout)
    assert cut_document["scan_complete"] is False
    assert "the scan stopped at --scan-limit" in cut.stderr
    assert "raise --scan-limit" in cut.stderr
    # "About" the limit: a SCAN call examines up to 1000 keys, so well under all 5000.
    assert 0 < len(cut_document["queues"]) < total / 2, len(cut_document["queues"])
    assert whole.returncode == 0, whole.stderr
    whole_document = json.loads(whole.stdout)
    assert whole_document["scan_complete"] is True
    assert "scan stopped" not in whole.stderr
    assert len(whole_document["queues"]) == total
