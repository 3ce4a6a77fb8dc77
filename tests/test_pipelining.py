"""Automatic pipelining, on every topology: batched commands keep their own replies and errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.connection import Connection
from redis.exceptions import DataError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from taskiq import TaskiqResult

from taskiq_redis import (
    ListQueueBroker,
    ListQueueClusterBroker,
    ListQueueSentinelBroker,
    RedisAsyncClusterResultBackend,
    RedisAsyncResultBackend,
    RedisAsyncSentinelResultBackend,
    RedisStreamBroker,
    RedisStreamClusterBroker,
    RedisStreamSentinelBroker,
    connection,
    wire,
)
from tests.servers import AsyncRedisClient, Topology

FACTORIES: dict[str, Callable[..., connection.RedisConnection]] = {
    "single": connection.single_node,
    "cluster": connection.cluster,
    "sentinel": connection.sentinel,
}


@pytest.fixture
async def conn(topology: Topology) -> AsyncIterator[connection.RedisConnection]:
    opened = FACTORIES[topology.name](**topology.kwargs())
    yield opened
    await opened.close()


def batch_sizes(conn: connection.RedisConnection, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of every batch the connection sends from now on."""
    sizes: list[int] = []
    lanes = conn._pipeline
    real_send_many = lanes._send_many

    async def counting(server: Any, batch: list[Any]) -> list[Any]:
        sizes.append(len(batch))
        return await real_send_many(server, batch)

    monkeypatch.setattr(lanes, "_send_many", counting)
    return sizes


@pytest.fixture
def pipelines(conn: connection.RedisConnection, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of every batch the connection sends, to see that batching happens."""
    return batch_sizes(conn, monkeypatch)


async def test_concurrent_commands_share_round_trips_and_keep_their_replies(
    conn: connection.RedisConnection, pipelines: list[int], unique: str
) -> None:
    keys = [f"{unique}:{n}" for n in range(200)]
    await conn.execute("SET", f"{unique}:first", 1)  # a cluster client has its slot table now
    await asyncio.gather(*(conn.execute("SET", key, key) for key in keys))
    values = await asyncio.gather(*(conn.execute("GET", key) for key in keys))
    assert values == [key.encode() for key in keys]
    assert pipelines, "200 concurrent commands were sent one by one"
    assert max(pipelines) > 10
    await asyncio.gather(*(conn.execute("DEL", key) for key in keys))


async def test_an_error_in_a_batch_belongs_to_its_caller(
    conn: connection.RedisConnection, pipelines: list[int], unique: str
) -> None:
    await conn.execute("SET", f"{unique}:text", "not a number")
    outcomes = await asyncio.gather(
        *(conn.execute("INCR", f"{unique}:n{i}") for i in range(20)),
        conn.execute("INCR", f"{unique}:text"),
        *(conn.execute("INCR", f"{unique}:m{i}") for i in range(20)),
        return_exceptions=True,
    )
    assert isinstance(outcomes[20], ResponseError)
    assert outcomes[:20] == [1] * 20
    assert outcomes[21:] == [1] * 20
    assert pipelines


async def test_a_cancelled_caller_does_not_strand_its_batch(
    conn: connection.RedisConnection, unique: str
) -> None:
    await conn.execute("PING")  # connected, so the next round trip is in flight at once
    first = asyncio.ensure_future(conn.execute("SET", f"{unique}:a", 1))
    await asyncio.sleep(0)
    batch = [asyncio.ensure_future(conn.execute("INCR", f"{unique}:b")) for _ in range(10)]
    batch[0].cancel()
    assert await first is True
    results = await asyncio.gather(*batch[1:])
    # Each of the nine got its own reply; the cancelled INCR may or may not have run.
    assert len(set(results)) == 9
    assert set(results) <= set(range(1, 11))


async def test_blocking_commands_never_hold_up_a_batch(
    conn: connection.RedisConnection, unique: str
) -> None:
    queue = f"{unique}:queue"
    waiting = asyncio.ensure_future(conn.execute("BRPOP", queue, 5))
    await asyncio.sleep(0.05)
    values = await asyncio.gather(*(conn.execute("INCR", f"{unique}:c{n}") for n in range(30)))
    assert values == [1] * 30
    assert not waiting.done(), "the BRPOP should still be waiting for its message"
    await conn.execute("LPUSH", queue, "wake")
    assert tuple(await waiting) == (queue.encode(), b"wake")


@pytest.mark.parametrize("topology", ["single", "sentinel"], indirect=True)
async def test_every_reply_reaches_its_own_caller_while_lanes_and_a_small_pool_race(
    topology: Topology,
) -> None:
    """Callers that follow each other, slow round trips that start second lanes and a pool of
    2 that makes callers wait for a connection: no socket is ever used by two callers at once.
    """
    kwargs = topology.kwargs()
    conn = (
        connection.single_node(kwargs["url"], 2)
        if topology.name == "single"
        else connection.sentinel(
            kwargs["sentinels"], kwargs["master_name"], max_connection_pool_size=2
        )
    )

    async def chain(number: int) -> None:
        for step in range(150):
            if step % 25 == number % 25:
                await conn.execute("DEBUG", "SLEEP", "0.03")
            text = f"{number}-{step}"
            assert await conn.execute("ECHO", text) == text.encode()

    async def block(rounds: int) -> None:  # holds a pooled connection now and then
        for _ in range(rounds):
            await conn.execute("BLPOP", f"nothing-{id(conn)}", 0.05)

    try:
        await asyncio.wait_for(
            asyncio.gather(block(20), *(chain(number) for number in range(6))), 60
        )
    finally:
        await conn.close()


def test_commands_are_packed_byte_for_byte_as_redis_py_packs_them() -> None:
    redis_py = Connection()
    commands: list[tuple[Any, ...]] = [
        ("EVALSHA", "a" * 40, 2, "{key}", "{key}__progress", "1"),
        ("SET", "clé é", b"\x00\xff bytes", 0.1, 1e20, -0.0, 2**70, float("inf")),
        ("SCRIPT LOAD", "return 1"),
        (b"CLIENT LIST",),
        ("XADD", "q", "*", "data", b""),
    ]
    packed = wire.packed(redis_py, commands)
    packed = packed if isinstance(packed, bytes) else b"".join(packed)
    assert packed == b"".join(redis_py.pack_commands(commands))
    with pytest.raises(DataError):  # redis-py refuses a bool; so does the packing
        wire.packed(redis_py, [("SET", "k", True)])


async def test_a_write_larger_than_the_socket_buffer_arrives_whole_beside_small_commands(
    conn: connection.RedisConnection, unique: str
) -> None:
    """A batch the socket cannot take at once waits for it, as redis-py's write does."""
    big = b"x" * (24 * 1024 * 1024)
    await conn.execute("SET", f"{unique}:first", 1)  # a cluster client has its slot table now
    small = [f"{unique}:{n}" for n in range(50)]
    await asyncio.gather(
        conn.execute("SET", f"{unique}:big", big),
        *(conn.execute("SET", key, key) for key in small),
    )
    assert await conn.execute("STRLEN", f"{unique}:big") == len(big)
    assert await asyncio.gather(*(conn.execute("GET", key) for key in small)) == [
        key.encode() for key in small
    ]
    await asyncio.gather(*(conn.execute("DEL", key) for key in [f"{unique}:big", *small]))


@pytest.mark.parametrize("topology", ["single"], indirect=True)
async def test_a_push_message_among_batched_replies_is_not_taken_for_a_reply(
    topology: Topology, unique: str
) -> None:
    """RESP3 invalidation pushes arrive between a batch's replies: each caller still gets its
    own reply (the push goes to redis-py's push handling, not to a caller)."""
    conn = connection.single_node(topology.kwargs()["url"], 1, protocol=3)
    try:
        assert await conn.execute("CLIENT", "TRACKING", "ON") == b"OK"
        keys = [f"{unique}:{n}" for n in range(40)]
        await asyncio.gather(*(conn.execute("SET", key, "0") for key in keys))
        for _ in range(3):  # read (tracked), then written: one push per key among the replies
            assert await asyncio.gather(*(conn.execute("GET", key) for key in keys)) == [
                b"0"
            ] * len(keys)
            replies = await asyncio.gather(
                *(conn.execute("SET", key, "0") for key in keys),
                *(conn.execute("ECHO", key) for key in keys),
            )
            assert replies == [True] * len(keys) + [key.encode() for key in keys]
    finally:
        await conn.close()


@pytest.mark.parametrize("topology", ["single"], indirect=True)
@pytest.mark.parametrize("pool", [None, 1])
async def test_a_large_batch_goes_as_two_halves_when_the_pool_has_two_connections(
    topology: Topology, pool: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn = connection.single_node(topology.kwargs()["url"], pool)
    sizes = batch_sizes(conn, monkeypatch)
    try:
        texts = [f"echo {n}" for n in range(100)]
        replies = await asyncio.gather(*(conn.execute("ECHO", text) for text in texts))
        assert replies == [text.encode() for text in texts]
    finally:
        await conn.close()
    # The first command goes out alone; the 99 queued behind it go as one batch, or as two
    # halves when a second connection is free.
    assert sizes == ([99] if pool == 1 else [49, 50])


@pytest.mark.parametrize("kind", ["list", "stream"])
async def test_two_hundred_overlapping_kicks_and_results_succeed_with_default_pools(
    topology: Topology, raw_redis: AsyncRedisClient, unique: str, kind: str
) -> None:
    """What a new user does first: many ``kiq()``, ``set_result`` and ``get_result`` at once.

    With redis-py 8.2 every overlapping call of an earlier version failed (an object of ours
    stood in for redis-py's connection); the package now uses redis-py's public API only.
    """
    backend: Any
    if topology.name == "single":
        backend = RedisAsyncResultBackend(topology.url, keep_results=False)
    elif topology.name == "cluster":
        backend = RedisAsyncClusterResultBackend(topology.url, keep_results=False)
    else:
        backend = RedisAsyncSentinelResultBackend(**topology.kwargs(), keep_results=False)
    broker_classes: dict[str, tuple[Any, Any, Any]] = {
        "list": (ListQueueBroker, ListQueueClusterBroker, ListQueueSentinelBroker),
        "stream": (RedisStreamBroker, RedisStreamClusterBroker, RedisStreamSentinelBroker),
    }
    single, cluster, sentinel = broker_classes[kind]
    broker_class = topology.pick(single=single, cluster=cluster, sentinel=sentinel)
    broker = broker_class(**topology.kwargs(), queue_name=f"queue-{unique}")
    broker = broker.with_result_backend(backend)

    @broker.task(task_name=f"echo-{unique}")  # type: ignore[untyped-decorator,unused-ignore]
    async def echo(value: int) -> int:
        return value

    await broker.startup()
    try:
        kicked = await asyncio.gather(*(echo.kiq(n) for n in range(200)))
        assert len({task.task_id for task in kicked}) == 200
        queued = await (
            raw_redis.llen(f"queue-{unique}")
            if kind == "list"
            else raw_redis.xlen(f"queue-{unique}")
        )
        assert queued == 200
        ids = [task.task_id for task in kicked]
        results = [
            TaskiqResult(is_err=False, return_value=n, execution_time=0.1) for n in range(200)
        ]
        await asyncio.gather(*(backend.set_result(i, r) for i, r in zip(ids, results, strict=True)))
        got = await asyncio.gather(*(backend.get_result(i) for i in ids))
        assert [value.return_value for value in got] == list(range(200))
    finally:
        await broker.shutdown()


@pytest.mark.parametrize("topology", ["single", "sentinel"], indirect=True)
async def test_a_stuck_server_fails_a_batch_at_the_socket_timeout_and_connections_keep_theirs(
    topology: Topology, raw_redis: AsyncRedisClient, unique: str
) -> None:
    """A batch has one deadline of ``socket_timeout`` instead of one per reply: a server that
    stops answering fails every command of it with redis-py's TimeoutError, about then, and the
    pool's connections keep their own ``socket_timeout`` for redis-py's calls afterwards."""
    kwargs = topology.kwargs()
    conn = (
        connection.single_node(kwargs["url"], socket_timeout=0.5)
        if topology.name == "single"
        else connection.sentinel(kwargs["sentinels"], kwargs["master_name"], socket_timeout=0.5)
    )
    try:
        await conn.execute("PING")
        sleeping = asyncio.ensure_future(raw_redis.execute_command("DEBUG", "SLEEP", "3"))
        await asyncio.sleep(0.2)  # the server sleeps: nothing is answered for 3 s
        started = asyncio.get_running_loop().time()
        outcomes = await asyncio.gather(
            *(conn.execute("INCR", f"{unique}:{n}") for n in range(20)), return_exceptions=True
        )
        took = asyncio.get_running_loop().time() - started
        await sleeping
        assert all(isinstance(outcome, RedisTimeoutError) for outcome in outcomes), outcomes
        assert took < 2.5, f"the batch waited {took:.1f} s, past the server's sleep"
        assert isinstance(conn.client, Redis)
        pool = conn.client.connection_pool
        held = [await pool.get_connection() for _ in range(3)]  # type: ignore[no-untyped-call,unused-ignore]
        try:
            assert {c.socket_timeout for c in held} == {0.5}
        finally:
            for c in held:
                await pool.release(c)
    finally:
        await conn.close()
