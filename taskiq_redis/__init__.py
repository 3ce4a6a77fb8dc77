"""Redis brokers, result backends and schedule sources for taskiq."""

from taskiq_redis.brokers.list_queue import (
    ListQueueBroker,
    ListQueueClusterBroker,
    ListQueueSentinelBroker,
)
from taskiq_redis.brokers.pubsub import PubSubBroker, PubSubClusterBroker, PubSubSentinelBroker
from taskiq_redis.brokers.stream import (
    RedisStreamBroker,
    RedisStreamClusterBroker,
    RedisStreamSentinelBroker,
)
from taskiq_redis.list_schedule_source import (
    ListRedisClusterScheduleSource,
    ListRedisScheduleSource,
    ListRedisSentinelScheduleSource,
)
from taskiq_redis.result_backend import (
    RedisAsyncClusterResultBackend,
    RedisAsyncResultBackend,
    RedisAsyncSentinelResultBackend,
)
from taskiq_redis.schedule_source import (
    RedisClusterScheduleSource,
    RedisScheduleSource,
    RedisSentinelScheduleSource,
)

__all__ = [
    "ListQueueBroker",
    "ListQueueClusterBroker",
    "ListQueueSentinelBroker",
    "ListRedisClusterScheduleSource",
    "ListRedisScheduleSource",
    "ListRedisSentinelScheduleSource",
    "PubSubBroker",
    "PubSubClusterBroker",
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
]
