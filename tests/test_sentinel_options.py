"""The sentinel classes' own options reach redis-py's Sentinel: ``sentinel_kwargs`` and
``min_other_sentinels`` (the suite's sentinel runs alone, with no password)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from redis.exceptions import RedisError

import taskiq_redis
from tests.servers import RedisServers

# Each sentinel class with a call that makes it reach the sentinels.
PARTS: dict[str, Callable[..., Any]] = {
    "stream broker": lambda **options: taskiq_redis.RedisStreamSentinelBroker(**options),
    "list broker": lambda **options: taskiq_redis.ListQueueSentinelBroker(**options),
    "result backend": lambda **options: taskiq_redis.RedisAsyncSentinelResultBackend(**options),
    "list schedule source": lambda **options: taskiq_redis.ListRedisSentinelScheduleSource(
        **options
    ),
}


def arguments(redis_servers: RedisServers, **options: Any) -> dict[str, Any]:
    return {
        "sentinels": list(redis_servers.sentinels),
        "master_name": redis_servers.master_name,
        **options,
    }


@pytest.mark.parametrize("part", PARTS)
async def test_sentinel_kwargs_go_to_the_links_to_the_sentinels(
    redis_servers: RedisServers, part: str
) -> None:
    """A user the sentinels do not know: every lookup is refused, so startup fails
    saying what the sentinel answered; without it, the same part starts."""
    refused = PARTS[part](
        **arguments(redis_servers, sentinel_kwargs={"username": "nobody", "password": "nope"})
    )
    with pytest.raises(RedisError) as raised:
        await refused.startup()
    await refused.shutdown()
    assert "sentinels asked" in str(raised.value) or "AUTH" in str(raised.value)
    working = PARTS[part](**arguments(redis_servers, sentinel_kwargs={"socket_timeout": 5}))
    await working.startup()
    await working.shutdown()


@pytest.mark.parametrize("part", PARTS)
async def test_min_other_sentinels_is_honoured(redis_servers: RedisServers, part: str) -> None:
    """The suite's sentinel sees no other sentinel: asking for one makes the primary unknown."""
    strict = PARTS[part](**arguments(redis_servers, min_other_sentinels=1))
    with pytest.raises(RedisError, match="No master found"):
        await strict.startup()
    await strict.shutdown()
    lenient = PARTS[part](**arguments(redis_servers, min_other_sentinels=0))
    await lenient.startup()
    await lenient.shutdown()
