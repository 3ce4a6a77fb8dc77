"""taskiq-redis 1.2's module of Redis Sentinel brokers; the names only, re-exported.

Applications written for 1.2 import from here. The classes live in :mod:`taskiq_redis.brokers`.
``BaseSentinelBroker`` is the base of every broker of this package (one implementation per broker
type, whatever the topology): an ``isinstance`` check holds as in 1.2, but a subclass is built
from a connection, not a URL. ``logger`` is the logger the brokers write to.
"""

from taskiq_redis.brokers.base import BaseRedisBroker as BaseSentinelBroker
from taskiq_redis.brokers.list_queue import ListQueueSentinelBroker
from taskiq_redis.brokers.pubsub import PubSubSentinelBroker
from taskiq_redis.brokers.stream import RedisStreamSentinelBroker, logger

__all__ = [
    "BaseSentinelBroker",
    "ListQueueSentinelBroker",
    "PubSubSentinelBroker",
    "RedisStreamSentinelBroker",
    "logger",
]
