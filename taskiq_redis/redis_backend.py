"""taskiq-redis 1.2's module of result backends; the names only, re-exported.

Applications written for 1.2 import from here. The classes live in
:mod:`taskiq_redis.result_backend`.
"""

from taskiq_redis.exceptions import (
    DuplicateExpireTimeSelectedError,
    ExpireTimeMustBeMoreThanZeroError,
    ResultIsMissingError,
)
from taskiq_redis.keys import PROGRESS_SUFFIX as PROGRESS_KEY_SUFFIX
from taskiq_redis.result_backend import (
    RedisAsyncClusterResultBackend,
    RedisAsyncResultBackend,
    RedisAsyncSentinelResultBackend,
)

__all__ = [
    "PROGRESS_KEY_SUFFIX",
    "DuplicateExpireTimeSelectedError",
    "ExpireTimeMustBeMoreThanZeroError",
    "RedisAsyncClusterResultBackend",
    "RedisAsyncResultBackend",
    "RedisAsyncSentinelResultBackend",
    "ResultIsMissingError",
]
