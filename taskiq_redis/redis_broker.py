"""taskiq-redis 1.2's module of single-node brokers; the names only, re-exported.

Applications written for 1.2 import from here. The classes live in :mod:`taskiq_redis.brokers`.
``BaseRedisBroker`` is the base of every broker of this package, of every topology: an
``isinstance`` check holds as in 1.2, but a subclass is built from a connection, not a URL.
"""

from taskiq_redis.brokers.base import BaseRedisBroker
from taskiq_redis.brokers.list_queue import ListQueueBroker
from taskiq_redis.brokers.pubsub import PubSubBroker
from taskiq_redis.brokers.stream import RedisStreamBroker, logger

__all__ = ["BaseRedisBroker", "ListQueueBroker", "PubSubBroker", "RedisStreamBroker", "logger"]
