"""taskiq-redis 1.2's module of Redis Cluster brokers; the names only, re-exported.

Applications written for 1.2 import from here. The classes live in :mod:`taskiq_redis.brokers`.
``BaseRedisClusterBroker`` is the base of every broker of this package (one implementation per
broker type, whatever the topology): an ``isinstance`` check holds as in 1.2, but a subclass is
built from a connection, not a URL. ``logger`` is the logger the brokers write to.
"""

from taskiq_redis.brokers.base import BaseRedisBroker as BaseRedisClusterBroker
from taskiq_redis.brokers.list_queue import ListQueueClusterBroker
from taskiq_redis.brokers.pubsub import PubSubClusterBroker
from taskiq_redis.brokers.stream import RedisStreamClusterBroker, logger

__all__ = [
    "BaseRedisClusterBroker",
    "ListQueueClusterBroker",
    "PubSubClusterBroker",
    "RedisStreamClusterBroker",
    "logger",
]
