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
    ClusterGroup,
    RedisServers,
    SentinelGroup,
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


# The failover topologies are started only for the tests that ask for them, so the rest of
# the suite does not pay for six more cluster nodes and a second sentinel.


@pytest.fixture
def sentinel_group() -> Iterator[SentinelGroup]:
    """A primary, its replica and a sentinel that fails over in seconds, for one test.

    Fresh for each test (about 0.3 s): after a kill -9, bringing the old primary back as a
    replica the sentinel would promote again takes it ten seconds to notice.
    """
    with SentinelGroup() as group:
        group.start()
        yield group


@pytest.fixture(scope="module")
def failover_cluster() -> Iterator[ClusterGroup]:
    """Three primaries with one replica each (about 2.5 s to form), shared by a module."""
    with ClusterGroup() as group:
        group.start()
        yield group


@pytest.fixture
def cluster_group(failover_cluster: ClusterGroup) -> ClusterGroup:
    """The module's cluster with replicas, healthy again after the previous test's failovers."""
    failover_cluster.wait_healthy()
    return failover_cluster
