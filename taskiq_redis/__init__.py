"""Redis brokers, result backends and schedule sources for taskiq."""

from taskiq_redis.brokers.list_queue import (
    ListQueueBroker,
    ListQueueClusterBroker,
    ListQueueSentinelBroker,
)
from taskiq_redis.brokers.pubsub import PubSubBroker, PubSubClusterBroker, PubSubSentinelBroker
from taskiq_redis.result_backend import (
    RedisAsyncClusterResultBackend,
    RedisAsyncResultBackend,
    RedisAsyncSentinelResultBackend,
)

__all__ = [
    "ListQueueBroker",
    "ListQueueClusterBroker",
    "ListQueueSentinelBroker",
    "PubSubBroker",
    "PubSubClusterBroker",
    "PubSubSentinelBroker",
    "RedisAsyncClusterResultBackend",
    "RedisAsyncResultBackend",
    "RedisAsyncSentinelResultBackend",
]
