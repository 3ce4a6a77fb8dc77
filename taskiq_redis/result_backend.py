"""Result backends: one implementation, three topologies.

Results and progress are stored under the taskiq-redis 1.2 key names (see :mod:`keys`), as the
serializer's bytes of ``TaskiqResult.model_dump(mode="json")``, so either package reads what
the other wrote. Reading with ``keep_results=False`` is one Lua script, so a result meant to be
read once reaches exactly one reader, and its progress goes with it; with ``keep_results=True``
it is a plain GET, because a script copies the value in and out of Lua while every other client
waits (30 ms against 5 ms for a 10 MB result).

``set_result`` rides out an outage of several seconds: taskiq acknowledges the message after it
returns or raises, so a result not stored then is lost for good although the task ran.
"""

from __future__ import annotations

import logging
import time
from typing import Any, TypeVar

from redis import exceptions as redis_errors
from taskiq import AsyncResultBackend, TaskiqResult
from taskiq.abc.serializer import TaskiqSerializer
from taskiq.depends.progress_tracker import TaskProgress
from taskiq.exceptions import ResultSetError
from taskiq.serializers import PickleSerializer

from taskiq_redis import connection, keys, scripts
from taskiq_redis.diagnostics import describe
from taskiq_redis.exceptions import (
    DuplicateExpireTimeSelectedError,
    ExpireTimeMustBeMoreThanZeroError,
    ResultIsMissingError,
    TaskIQRedisError,
)

_ReturnType = TypeVar("_ReturnType")

logger = logging.getLogger("taskiq.redis_result_backend")

RESULT_GET = "result_get"
# How long set_result keeps trying while Redis is unreachable: a restart or a failover takes a
# few seconds; past this the worker should not hold the task's slot any longer.
SET_RESULT_PATIENCE_SECONDS = 15.0
# What set_result waits out: the server is unreachable, restarting, failing over or moving a
# slot. Not a wrong password or a missing permission (also ConnectionErrors in redis-py):
# waiting does not fix those.
_WAIT_OUT = connection.TRANSIENT_ERRORS
_NEVER_WAIT_OUT = (redis_errors.AuthenticationError, redis_errors.AuthorizationError)


class ResultNotStoredError(TaskIQRedisError, ResultSetError):
    """Redis stayed unreachable while a task's result was being stored."""

    __template__ = (
        "The result of task {task_id} was not stored: Redis stayed unreachable for"
        " {seconds:.0f} s ({error})"
    )
    task_id: str
    seconds: float
    error: str


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


class BaseRedisResultBackend(connection.HasConnection, AsyncResultBackend[_ReturnType]):
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
        """Store a task's result, with the configured expiry.

        While Redis is unreachable the SET is retried with a capped backoff for up to
        ``SET_RESULT_PATIENCE_SECONDS`` (SET of the same value twice is harmless).

        :raises ResultNotStoredError: Redis stayed unreachable for that long.
        """
        key = self._key(task_id)
        value = result.model_dump(mode="json")
        deadline = time.monotonic() + SET_RESULT_PATIENCE_SECONDS
        backoff = connection.Backoff(first=0.1, cap=1.0)
        while True:
            try:
                await self._store(key, value)
            except _NEVER_WAIT_OUT:
                raise
            except _WAIT_OUT as exc:
                if time.monotonic() >= deadline:
                    raise ResultNotStoredError(
                        task_id=task_id, seconds=SET_RESULT_PATIENCE_SECONDS, error=describe(exc)
                    ) from exc
                logger.warning(
                    "Storing the result of task %s failed; retrying: %s", task_id, describe(exc)
                )
                await backoff.wait()
            else:
                return

    async def is_result_ready(self, task_id: str) -> bool:
        """Whether a result is stored for the task."""
        return bool(await self._conn.execute("EXISTS", self._key(task_id)))

    async def get_result(self, task_id: str, with_logs: bool = False) -> TaskiqResult[_ReturnType]:
        """Read a task's result; with ``keep_results=False`` it and its progress are deleted.

        :raises ResultIsMissingError: no result is stored (not ready, expired or already read).
        """
        key = self._key(task_id)
        if self.keep_results:
            raw = await self._conn.execute("GET", key)
        else:
            raw = await scripts.run(
                self._conn, scripts.get(RESULT_GET), [key, keys.progress_key(key)], ["1"]
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
