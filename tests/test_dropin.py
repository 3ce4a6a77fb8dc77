"""An application written for taskiq-redis 1.2 runs here with only the dependency changed.

The module and name lists are those of the taskiq-redis 1.2.4 wheel (every public name each of
its modules defines), so an import that worked there works here.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from taskiq import AsyncBroker
from taskiq.kicker import AsyncKicker

from tests.servers import RedisServers, start_servers
from tests.worker_process import ROOT, WorkerProcess

# Module -> the public names it defines in taskiq-redis 1.2.4.
NAMES_OF_1_2 = {
    "taskiq_redis": [
        "ListQueueBroker",
        "ListQueueClusterBroker",
        "ListQueueSentinelBroker",
        "ListRedisScheduleSource",
        "PubSubBroker",
        "PubSubSentinelBroker",
        "RedisAsyncClusterResultBackend",
        "RedisAsyncResultBackend",
        "RedisAsyncSentinelResultBackend",
        "RedisClusterScheduleSource",
        "RedisScheduleSource",
        "RedisSentinelScheduleSource",
        "RedisStreamBroker",
        "RedisStreamClusterBroker",
        "RedisStreamSentinelBroker",
    ],
    "taskiq_redis.exceptions": [
        "TaskIQRedisError",
        "DuplicateExpireTimeSelectedError",
        "ExpireTimeMustBeMoreThanZeroError",
        "ResultIsMissingError",
    ],
    "taskiq_redis.list_schedule_source": ["logger", "ListRedisScheduleSource"],
    "taskiq_redis.redis_backend": [
        "PROGRESS_KEY_SUFFIX",
        "DuplicateExpireTimeSelectedError",
        "ExpireTimeMustBeMoreThanZeroError",
        "ResultIsMissingError",
        "RedisAsyncResultBackend",
        "RedisAsyncClusterResultBackend",
        "RedisAsyncSentinelResultBackend",
    ],
    "taskiq_redis.redis_broker": [
        "logger",
        "BaseRedisBroker",
        "PubSubBroker",
        "ListQueueBroker",
        "RedisStreamBroker",
    ],
    "taskiq_redis.redis_cluster_broker": [
        "logger",
        "BaseRedisClusterBroker",
        "ListQueueClusterBroker",
        "RedisStreamClusterBroker",
    ],
    "taskiq_redis.redis_sentinel_broker": [
        "logger",
        "BaseSentinelBroker",
        "PubSubSentinelBroker",
        "ListQueueSentinelBroker",
        "RedisStreamSentinelBroker",
    ],
    "taskiq_redis.schedule_source": [
        "RedisScheduleSource",
        "RedisClusterScheduleSource",
        "RedisSentinelScheduleSource",
    ],
}


@pytest.mark.parametrize("module", sorted(NAMES_OF_1_2))
def test_every_module_and_name_of_1_2_is_importable(module: str) -> None:
    imported = importlib.import_module(module)
    missing = [name for name in NAMES_OF_1_2[module] if not hasattr(imported, name)]
    assert not missing, f"{module} lacks {missing}"


def test_1_2_modules_hand_out_the_real_classes() -> None:
    """Re-exports, not copies: a class imported by its 1.2 path is the package's class."""
    import taskiq_redis
    from taskiq_redis import redis_backend, redis_broker, redis_cluster_broker
    from taskiq_redis import redis_sentinel_broker as sentinel

    assert redis_broker.RedisStreamBroker is taskiq_redis.RedisStreamBroker
    assert redis_cluster_broker.ListQueueClusterBroker is taskiq_redis.ListQueueClusterBroker
    assert sentinel.PubSubSentinelBroker is taskiq_redis.PubSubSentinelBroker
    assert redis_backend.RedisAsyncResultBackend is taskiq_redis.RedisAsyncResultBackend
    assert redis_backend.PROGRESS_KEY_SUFFIX == "__progress"
    for base in (
        redis_broker.BaseRedisBroker,
        redis_cluster_broker.BaseRedisClusterBroker,
        sentinel.BaseSentinelBroker,
    ):
        assert issubclass(taskiq_redis.RedisStreamClusterBroker, base)
        assert issubclass(taskiq_redis.ListQueueBroker, base)


def readme_example() -> str:
    """The first Python block of the README's Usage section."""
    readme = (ROOT / "README.md").read_text()
    usage = readme[readme.index("## Usage") :]
    match = re.search(r"```python\n(.*?)```", usage, re.DOTALL)
    assert match, "the README's Usage section has no Python example"
    return match.group(1)


@contextlib.asynccontextmanager
async def producer(url: str, queue_name: str = "taskiq") -> AsyncIterator[AsyncBroker]:
    """What a 1.2 application kicks with: a stream broker with a result backend."""
    from taskiq_redis.redis_backend import RedisAsyncResultBackend
    from taskiq_redis.redis_broker import RedisStreamBroker

    broker = RedisStreamBroker(url=url, queue_name=queue_name).with_result_backend(
        RedisAsyncResultBackend(redis_url=url)
    )
    await broker.startup()
    try:
        yield broker
    finally:
        await broker.shutdown()


async def add_in_worker(url: str, task_name: str, queue_name: str = "taskiq") -> Any:
    async with producer(url, queue_name) as broker:
        kicker: AsyncKicker[..., Any] = AsyncKicker(task_name=task_name, broker=broker, labels={})
        task = await kicker.kiq(20, 22)
        result = await task.wait_result(timeout=30)
    assert not result.is_err, result.error
    return result.return_value


async def test_app_importing_1_2_modules_runs_in_a_real_worker(
    redis_servers: RedisServers, unique: str
) -> None:
    url, queue = redis_servers.standalone_url, f"q{unique}"
    with WorkerProcess("tests.apps.app_1_2:broker", config={"url": url, "queue": queue}) as worker:
        worker.wait_ready()
        assert await add_in_worker(url, "app_1_2.add", queue) == 42, worker.output()


@pytest.fixture
def private_server() -> Iterator[str]:
    """A standalone server of this test's own, so the README's default queue meets nothing else."""
    servers = start_servers(which=["single"])
    try:
        yield servers.standalone_url
    finally:
        servers.stop()


async def test_readme_example_runs_in_a_real_worker(
    private_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's example, with only the address changed to the test server's."""
    code = readme_example().replace("redis://localhost:6379", private_server)
    assert private_server in code
    (tmp_path / "readme_app.py").write_text(code)
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    )
    with WorkerProcess("readme_app:broker") as worker:
        worker.wait_ready()
        assert await add_in_worker(private_server, "readme_app:add") == 42, worker.output()


def test_cluster_pub_sub_says_when_redis_py_is_too_old(redis_servers: RedisServers) -> None:
    """Everything imports on redis-py 7; only PubSubClusterBroker needs 8, and says so."""
    import redis

    from taskiq_redis import PubSubClusterBroker

    if int(redis.__version__.split(".")[0]) >= 8:
        PubSubClusterBroker(redis_servers.cluster_url)
    else:
        with pytest.raises(RuntimeError, match=r"needs redis-py 8\.0 or newer.*7\."):
            PubSubClusterBroker(redis_servers.cluster_url)


def test_the_servers_are_the_programs_ci_asked_for(redis_servers: RedisServers) -> None:
    """The Valkey entry of the CI matrix must run Valkey, not quietly Redis again."""
    import redis

    wanted = {
        "server": os.environ.get("TASKIQ_REDIS_TEST_SERVER", "redis-server"),
        "sentinel": os.environ.get("TASKIQ_REDIS_TEST_SENTINEL", "redis-sentinel"),
    }
    ports = {
        "server": [
            redis.Redis.from_url(url).connection_pool.connection_kwargs["port"]
            for url in (redis_servers.standalone_url, redis_servers.sentinel_primary_url)
        ]
        + list(redis_servers.cluster_ports),
        "sentinel": [port for _, port in redis_servers.sentinels],
    }
    for role, program in wanted.items():
        family = "valkey" if "valkey" in Path(program).name else "redis"
        for port in ports[role]:
            client = redis.Redis(port=port)
            try:
                # Valkey says server_name:valkey; Redis 7 has no such field.
                running = client.info("server").get("server_name", "redis")
            finally:
                client.close()
            assert running == family, f"{role} on port {port} is {running}, {program} was asked"
