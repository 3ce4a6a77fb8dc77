"""The stream broker, in parts (see :mod:`taskiq_redis.brokers.stream.broker`)."""

from taskiq_redis.brokers.stream.broker import (
    BaseStreamBroker,
    RedisStreamBroker,
    RedisStreamClusterBroker,
    RedisStreamSentinelBroker,
    logger,
)

__all__ = [
    "BaseStreamBroker",
    "RedisStreamBroker",
    "RedisStreamClusterBroker",
    "RedisStreamSentinelBroker",
    "logger",
]
