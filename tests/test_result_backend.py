"""Result backends on every topology, seen through what a taskiq user calls."""

from __future__ import annotations

import asyncio
import pickle
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio
from taskiq import TaskiqResult
from taskiq.depends.progress_tracker import TaskProgress, TaskState
from taskiq.serializers import JSONSerializer

from taskiq_redis import (
    RedisAsyncClusterResultBackend,
    RedisAsyncResultBackend,
    RedisAsyncSentinelResultBackend,
    result_backend,
)
from taskiq_redis.exceptions import (
    DuplicateExpireTimeSelectedError,
    ExpireTimeMustBeMoreThanZeroError,
    ResultIsMissingError,
    TaskIQRedisError,
)
from taskiq_redis.result_backend import BaseRedisResultBackend
from tests.servers import (
    AsyncRedisClient,
    RedisServers,
    StandaloneServer,
    Topology,
    start_servers,
)
from tests.test_outages import acl_log

Backend = BaseRedisResultBackend[Any]


@pytest.fixture
def make_backend(topology: Topology) -> Callable[..., Backend]:
    """Build the public backend class of this topology with the given options."""

    def make(**options: Any) -> Backend:
        cls = topology.pick(
            single=RedisAsyncResultBackend,
            cluster=RedisAsyncClusterResultBackend,
            sentinel=RedisAsyncSentinelResultBackend,
        )
        backend: Backend = cls(**topology.kwargs("redis_url"), **options)
        return backend

    return make


@pytest.fixture
async def backend(make_backend: Callable[..., Backend]) -> AsyncIterator[Backend]:
    started = make_backend()
    await started.startup()
    yield started
    await started.shutdown()


def a_result(value: Any = 42, log: str | None = None) -> TaskiqResult[Any]:
    return TaskiqResult(is_err=False, return_value=value, execution_time=0.5, log=log)


async def test_result_round_trip_keeps_every_field(backend: Backend, unique: str) -> None:
    result = TaskiqResult(
        is_err=False,
        return_value={"answer": [1, 2, 3]},
        execution_time=1.25,
        labels={"queue_name": "q"},
    )
    assert not await backend.is_result_ready(unique)
    await backend.set_result(unique, result)
    assert await backend.is_result_ready(unique)
    assert await backend.get_result(unique) == result
    assert await backend.get_result(unique) == result, "keep_results=True keeps it readable"


async def test_error_result_brings_the_exception_back(backend: Backend, unique: str) -> None:
    await backend.set_result(
        unique,
        TaskiqResult(is_err=True, return_value=None, execution_time=0.1, error=ValueError("no")),
    )
    read = await backend.get_result(unique)
    assert read.is_err
    with pytest.raises(ValueError, match="no"):
        read.raise_for_error()


async def test_log_is_dropped_unless_asked_for(backend: Backend, unique: str) -> None:
    await backend.set_result(unique, a_result(log="printed by the task"))
    assert (await backend.get_result(unique)).log is None
    assert (await backend.get_result(unique, with_logs=True)).log == "printed by the task"


async def test_missing_result_raises(backend: Backend, unique: str) -> None:
    with pytest.raises(ResultIsMissingError):
        await backend.get_result(unique)


async def test_delete_after_reading_removes_result_and_progress(
    make_backend: Callable[..., Backend], unique: str
) -> None:
    backend = make_backend(keep_results=False)
    await backend.startup()
    try:
        await backend.set_progress(unique, TaskProgress(state=TaskState.STARTED, meta={"n": 1}))
        await backend.set_result(unique, a_result())
        assert (await backend.get_result(unique)).return_value == 42
        assert not await backend.is_result_ready(unique)
        assert await backend.get_progress(unique) is None
        with pytest.raises(ResultIsMissingError):
            await backend.get_result(unique)
    finally:
        await backend.shutdown()


async def test_delete_after_reading_hands_the_result_to_one_reader(
    make_backend: Callable[..., Backend], unique: str
) -> None:
    backend = make_backend(keep_results=False)
    await backend.startup()
    try:
        await backend.set_result(unique, a_result())
        outcomes = await asyncio.gather(
            *(backend.get_result(unique) for _ in range(20)), return_exceptions=True
        )
        got = [o for o in outcomes if isinstance(o, TaskiqResult)]
        missing = [o for o in outcomes if isinstance(o, ResultIsMissingError)]
        assert (len(got), len(missing)) == (1, 19)
    finally:
        await backend.shutdown()


async def test_progress_round_trip(backend: Backend, unique: str) -> None:
    assert await backend.get_progress(unique) is None
    progress = TaskProgress(state=TaskState.STARTED, meta={"done": 3, "of": 10})
    await backend.set_progress(unique, progress)
    assert await backend.get_progress(unique) == progress


@pytest.mark.parametrize("expiry", [{"result_ex_time": 1}, {"result_px_time": 300}])
async def test_results_and_progress_expire(
    make_backend: Callable[..., Backend], unique: str, expiry: dict[str, int]
) -> None:
    backend = make_backend(**expiry)
    await backend.startup()
    try:
        await backend.set_result(unique, a_result())
        await backend.set_progress(unique, TaskProgress(state=TaskState.STARTED, meta=None))
        assert await backend.is_result_ready(unique)
        assert await backend.get_progress(unique) is not None
        await asyncio.sleep(1.2 if "result_ex_time" in expiry else 0.5)
        assert not await backend.is_result_ready(unique)
        assert await backend.get_progress(unique) is None
    finally:
        await backend.shutdown()


async def test_prefix_puts_results_under_it(
    make_backend: Callable[..., Backend], raw_redis: AsyncRedisClient, unique: str
) -> None:
    backend = make_backend(prefix_str=f"p{unique}")
    await backend.startup()
    try:
        await backend.set_result("task", a_result())
        assert await raw_redis.exists(f"p{unique}:task") == 1
        assert (await backend.get_result("task")).return_value == 42
    finally:
        await backend.shutdown()


async def test_reads_a_result_written_as_taskiq_redis_1_2_writes_it(
    backend: Backend, raw_redis: AsyncRedisClient, unique: str
) -> None:
    """1.2 stores pickle of ``model_dump(mode="json")`` under the task id: switching keeps it."""
    await raw_redis.set(unique, pickle.dumps(a_result("old").model_dump(mode="json")))
    assert (await backend.get_result(unique)).return_value == "old"


async def test_any_taskiq_serializer_works(
    make_backend: Callable[..., Backend], raw_redis: AsyncRedisClient, unique: str
) -> None:
    backend = make_backend(serializer=JSONSerializer())
    await backend.startup()
    try:
        await backend.set_result(unique, a_result([1, "two"]))
        stored = await raw_redis.get(unique)
        assert isinstance(stored, bytes)
        assert stored.startswith(b"{")
        assert (await backend.get_result(unique)).return_value == [1, "two"]
    finally:
        await backend.shutdown()


async def test_results_survive_script_flush(
    make_backend: Callable[..., Backend], raw_redis: AsyncRedisClient, unique: str
) -> None:
    backend = make_backend(keep_results=False)
    await backend.startup()
    try:
        await backend.set_result(f"{unique}-1", a_result(1))
        assert (await backend.get_result(f"{unique}-1")).return_value == 1
        await raw_redis.script_flush()
        await backend.set_result(f"{unique}-2", a_result(2))
        assert (await backend.get_result(f"{unique}-2")).return_value == 2
    finally:
        await backend.shutdown()


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"result_ex_time": 1, "result_px_time": 1}, DuplicateExpireTimeSelectedError),
        ({"result_ex_time": 0}, ExpireTimeMustBeMoreThanZeroError),
        ({"result_px_time": -5}, ExpireTimeMustBeMoreThanZeroError),
    ],
)
def test_bad_expiry_is_refused(
    make_backend: Callable[..., Backend], options: dict[str, int], error: type[Exception]
) -> None:
    with pytest.raises(error):
        make_backend(**options)
    assert issubclass(error, TaskIQRedisError)


def test_expiry_of_the_wrong_type_names_the_option(make_backend: Callable[..., Backend]) -> None:
    with pytest.raises(TypeError, match="result_ex_time"):
        make_backend(result_ex_time="10")


def test_public_attributes_of_taskiq_redis_1_2(
    make_backend: Callable[..., Backend], topology: Topology
) -> None:
    backend = make_backend()
    attribute = topology.pick(single="redis_pool", cluster="redis", sentinel="sentinel")
    assert getattr(backend, attribute) is not None
    assert backend.keep_results is True


@pytest.fixture
def private_server() -> Iterator[RedisServers]:
    """A standalone server of this test's own, so its command counts are this test's alone."""
    servers = start_servers(which=["single"])
    try:
        yield servers
    finally:
        servers.stop()


async def command_calls(client: AsyncRedisClient, command: str) -> int:
    stats = await client.info("commandstats")
    entry = stats.get(f"cmdstat_{command}", {"calls": 0})
    return int(entry["calls"])


@pytest.mark.parametrize(("keep_results", "scripts_run"), [(True, 0), (False, 10)])
async def test_reading_a_kept_result_is_a_plain_get(
    private_server: RedisServers, keep_results: bool, scripts_run: int
) -> None:
    """A script copies the value in and out of Lua while Redis serves nobody else; GET does not."""
    backend: Backend = RedisAsyncResultBackend(
        private_server.standalone_url, keep_results=keep_results
    )
    client = redis.asyncio.Redis.from_url(private_server.standalone_url)
    await backend.startup()
    try:
        for number in range(10):
            await backend.set_result(f"task-{number}", a_result(number))
        gets, scripts = await command_calls(client, "get"), await command_calls(client, "evalsha")
        for number in range(10):
            assert (await backend.get_result(f"task-{number}")).return_value == number
        calls = {
            "get": await command_calls(client, "get") - gets,
            "evalsha": await command_calls(client, "evalsha") - scripts,
        }
        # commandstats counts a script's own GET too: the scripts are what tells the two apart.
        assert calls == {"get": 10, "evalsha": scripts_run}
    finally:
        await client.aclose()
        await backend.shutdown()


async def test_set_result_rides_out_a_5_second_outage(
    redis_servers: RedisServers, unique: str
) -> None:
    """taskiq acknowledges the message after set_result: a result given up on is lost for good."""
    backend: Backend = RedisAsyncResultBackend(redis_servers.standalone_url)
    await backend.startup()
    try:
        await backend.set_result(f"{unique}-before", a_result(1))
        await asyncio.to_thread(redis_servers.stop_standalone)
        try:
            storing = asyncio.create_task(backend.set_result(unique, a_result(2)))
            await asyncio.sleep(5)
            assert not storing.done(), "set_result returned while the server was down"
        finally:
            await asyncio.to_thread(redis_servers.start_standalone)
        await asyncio.wait_for(storing, timeout=result_backend.SET_RESULT_PATIENCE_SECONDS)
        assert (await backend.get_result(unique)).return_value == 2
    finally:
        await backend.shutdown()


async def test_set_result_gives_up_with_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, unique: str
) -> None:
    """Past its patience set_result says which task lost its result, and why."""
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(result_backend, "SET_RESULT_PATIENCE_SECONDS", 0.5)
    backend: Backend = RedisAsyncResultBackend(f"redis://127.0.0.1:{port}")
    try:
        with pytest.raises(result_backend.ResultNotStoredError) as caught:
            await backend.set_result(unique, a_result())
        message = str(caught.value)
        assert f"task {unique} was not stored" in message
        assert "Redis stayed unreachable" in message
        assert f"127.0.0.1:{port}" in message, message
    finally:
        await backend.shutdown()


@pytest.mark.parametrize("change", ["password", "permission"])
async def test_set_result_does_not_wait_out_a_wrong_password_or_a_missing_permission(
    change: str, unique: str
) -> None:
    """Only outages are waited out: a password rotated under a running worker, or a permission
    taken away, fails set_result at once with the server's words, tried once, not for the
    whole patience (waiting cannot fix either, and the worker's slot is held meanwhile)."""
    user = f"app-{unique}"
    with StandaloneServer([f"user {user} on >right ~* &* +@all"]) as server:
        server.start()
        backend: Backend = RedisAsyncResultBackend(
            server.url.replace("redis://", f"redis://{user}:right@")
        )
        admin = redis.asyncio.Redis.from_url(server.url)
        await backend.startup()
        try:
            await backend.set_result(f"{unique}-before", a_result(1))
            if change == "password":
                await admin.acl_setuser(
                    user, enabled=True, reset_passwords=True, passwords=["+new"]
                )
                expected: type[Exception] = redis.AuthenticationError
                words, reason = "invalid username-password pair", "auth"
            else:
                await admin.acl_setuser(user, enabled=True, commands=["-set"])
                expected = redis.exceptions.NoPermissionError
                words, reason = "no permissions to run the 'set' command", "command"
            await admin.execute_command("CLIENT", "KILL", "USER", user)  # type: ignore[no-untyped-call]
            started = time.monotonic()
            with pytest.raises(expected) as caught:
                await asyncio.wait_for(
                    backend.set_result(unique, a_result(2)),
                    result_backend.SET_RESULT_PATIENCE_SECONDS * 2,
                )
            took = time.monotonic() - started
            refused = await acl_log(server.url, reason, user)
        finally:
            await backend.shutdown()
            await admin.aclose()
    assert words in str(caught.value), caught.value
    assert refused == 1, f"refused {refused} times for one set_result: it was retried"
    # Well under the patience it would have spent retrying (the test that an outage is ridden
    # out shows what waiting looks like).
    assert took < result_backend.SET_RESULT_PATIENCE_SECONDS / 3, took
