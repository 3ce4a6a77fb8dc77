"""Result backends: one implementation, three topologies.

Results and progress are stored under the taskiq-redis 1.2 key names (see :mod:`keys`), as the
serializer's bytes of ``TaskiqResult.model_dump(mode="json")``, so either package reads what
the other wrote. Reading with ``keep_results=False`` is one Lua script, so a result meant to be
read once reaches exactly one reader, and its progress goes with it.
"""

from __future__ import annotations

from typing import Any, TypeVar

from taskiq import AsyncResultBackend, TaskiqResult
from taskiq.abc.serializer import TaskiqSerializer
from taskiq.depends.progress_tracker import TaskProgress
from taskiq.serializers import PickleSerializer

from taskiq_redis import connection, keys, scripts
from taskiq_redis.exceptions import (
    DuplicateExpireTimeSelectedError,
    ExpireTimeMustBeMoreThanZeroError,
    ResultIsMissingError,
)

_ReturnType = TypeVar("_ReturnType")

RESULT_GET = "result_get"


def expiry_arguments(
    result_ex_time: int | None, result_px_time: int | None
) -> tuple[str, int] | tuple[()]:
    """The SET option that makes results and progress expire, checked once at construction."""
    for name, value in (("result_ex_time", result_ex_time), ("result_px_time", result_px_time)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"{name} must be a whole number, got {value!r}")
        if value is not None and value <= 0:
            raise ExpireTimeMustBeMoreThanZeroError
    if result_ex_time and result_px_time:
        raise DuplicateExpireTimeSelectedError
    if result_ex_time:
        return ("EX", result_ex_time)
    if result_px_time:
        return ("PX", result_px_time)
    return ()


class BaseRedisResultBackend(AsyncResultBackend[_ReturnType]):
    """The result backend; the public classes below only choose how to reach Redis."""

    def __init__(
        self,
        conn: connection.RedisConnection,
        keep_results: bool = True,
        result_ex_time: int | None = None,
        result_px_time: int | None = None,
        serializer: TaskiqSerializer | None = None,
        prefix_str: str | None = None,
    ) -> None:
        self._expiry = expiry_arguments(result_ex_time, result_px_time)
        self._conn = conn
        self.serializer = serializer or PickleSerializer()
        self.keep_results = keep_results
        self.result_ex_time = result_ex_time
        self.result_px_time = result_px_time
        self.prefix_str = prefix_str

    async def startup(self) -> None:
        """Load the script now, so the first read does not pay for a NOSCRIPT round trip."""
        await super().startup()
        await scripts.load(self._conn, [scripts.get(RESULT_GET)])

    async def shutdown(self) -> None:
        """Close the connections."""
        await self._conn.close()
        await super().shutdown()

    def _key(self, task_id: str) -> str:
        return keys.result_key(task_id, self.prefix_str)

    async def _store(self, key: str, value: Any) -> None:
        await self._conn.execute("SET", key, self.serializer.dumpb(value), *self._expiry)

    async def set_result(self, task_id: str, result: TaskiqResult[_ReturnType]) -> None:
        """Store a task's result, with the configured expiry."""
        await self._store(self._key(task_id), result.model_dump(mode="json"))

    async def is_result_ready(self, task_id: str) -> bool:
        """Whether a result is stored for the task."""
        return bool(await self._conn.execute("EXISTS", self._key(task_id)))

    async def get_result(self, task_id: str, with_logs: bool = False) -> TaskiqResult[_ReturnType]:
        """Read a task's result; with ``keep_results=False`` it and its progress are deleted.

        :raises ResultIsMissingError: no result is stored (not ready, expired or already read).
        """
        key = self._key(task_id)
        delete = "0" if self.keep_results else "1"
        raw = await scripts.run(
            self._conn, scripts.get(RESULT_GET), [key, keys.progress_key(key)], [delete]
        )
        if raw is None:
            raise ResultIsMissingError
        result: TaskiqResult[_ReturnType] = TaskiqResult.model_validate(self.serializer.loadb(raw))
        if not with_logs:
            result.log = None
        return result

    async def set_progress(self, task_id: str, progress: TaskProgress[_ReturnType]) -> None:
        """Store a task's progress beside its result, with the same expiry."""
        await self._store(keys.progress_key(self._key(task_id)), progress.model_dump(mode="json"))

    async def get_progress(self, task_id: str) -> TaskProgress[_ReturnType] | None:
        """The task's last reported progress, or None when it reported none."""
        raw = await self._conn.execute("GET", keys.progress_key(self._key(task_id)))
        if raw is None:
            return None
        progress: TaskProgress[_ReturnType] = TaskProgress.model_validate(
            self.serializer.loadb(raw)
        )
        return progress


class RedisAsyncResultBackend(connection.SingleNodeAttributes, BaseRedisResultBackend[_ReturnType]):
    """Results on one Redis server."""

    def __init__(
        self,
        redis_url: str,
        keep_results: bool = True,
        result_ex_time: int | None = None,
        result_px_time: int | None = None,
        max_connection_pool_size: int | None = None,
        serializer: TaskiqSerializer | None = None,
        prefix_str: str | None = None,
        **connection_kwargs: Any,
    ) -> None:
        super().__init__(
            connection.single_node(redis_url, max_connection_pool_size, **connection_kwargs),
            keep_results,
            result_ex_time,
            result_px_time,
            serializer,
            prefix_str,
        )


class RedisAsyncClusterResultBackend(
    connection.ClusterAttributes, BaseRedisResultBackend[_ReturnType]
):
    """Results on a Redis Cluster."""

    def __init__(
        self,
        redis_url: str,
        keep_results: bool = True,
        result_ex_time: int | None = None,
        result_px_time: int | None = None,
        serializer: TaskiqSerializer | None = None,
        prefix_str: str | None = None,
        **connection_kwargs: Any,
    ) -> None:
        super().__init__(
            connection.cluster(redis_url, **connection_kwargs),
            keep_results,
            result_ex_time,
            result_px_time,
            serializer,
            prefix_str,
        )


class RedisAsyncSentinelResultBackend(
    connection.SentinelAttributes, BaseRedisResultBackend[_ReturnType]
):
    """Results on the primary that Redis Sentinel names."""

    def __init__(
        self,
        sentinels: list[tuple[str, int]],
        master_name: str,
        keep_results: bool = True,
        result_ex_time: int | None = None,
        result_px_time: int | None = None,
        min_other_sentinels: int = 0,
        sentinel_kwargs: Any | None = None,
        serializer: TaskiqSerializer | None = None,
        prefix_str: str | None = None,
        **connection_kwargs: Any,
    ) -> None:
        super().__init__(
            connection.sentinel(
                sentinels, master_name, min_other_sentinels, sentinel_kwargs, **connection_kwargs
            ),
            keep_results,
            result_ex_time,
            result_px_time,
            serializer,
            prefix_str,
        )
