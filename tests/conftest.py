"""Fixtures that run every test against real Redis servers.

The servers are started once per session (about two seconds, most of it the
cluster waiting out Redis' own post-start delay) and shared by all tests, so
tests isolate themselves with ``unique`` names instead of flushing databases.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.servers import (
    TOPOLOGIES,
    AsyncRedisClient,
    RedisServers,
    Topology,
    TopologyName,
    start_servers,
)


@pytest.fixture(scope="session")
def redis_servers() -> Iterator[RedisServers]:
    servers = start_servers()
    try:
        yield servers
    finally:
        servers.stop()


@pytest.fixture(params=TOPOLOGIES, ids=list(TOPOLOGIES))
def topology(request: pytest.FixtureRequest, redis_servers: RedisServers) -> Topology:
    name: TopologyName = request.param
    return Topology.of(redis_servers, name)


@pytest.fixture
async def raw_redis(topology: Topology) -> AsyncIterator[AsyncRedisClient]:
    client = topology.client()
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def unique() -> str:
    """A fresh name part, so tests sharing the servers never see each other's keys."""
    return uuid.uuid4().hex[:12]
