"""What Redis ran for one action of ours, read from INFO commandstats.

A test of what a call costs Redis counts commands on a server of its own. Opening a
connection is not part of any call's cost: a pool opens one when two calls overlap, at
whatever moment the scheduler lets them, so the handshake (HELLO, CLIENT SETINFO, AUTH,
SELECT) is left out of the count, as is the INFO that does the counting.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

from tests.servers import AsyncRedisClient

T = TypeVar("T")

NOT_COUNTED = frozenset(
    {"cmdstat_info", "cmdstat_hello", "cmdstat_client|setinfo", "cmdstat_auth", "cmdstat_select"}
)


async def command_counts(raw: AsyncRedisClient) -> dict[str, int]:
    stats = await raw.info("commandstats")
    return {name: int(stat["calls"]) for name, stat in stats.items() if name not in NOT_COUNTED}


async def commands_during(raw: AsyncRedisClient, action: Awaitable[T]) -> tuple[dict[str, int], T]:
    """The commands Redis ran while ``action`` ran (those run inside a script too), by name."""
    before = await command_counts(raw)
    outcome = await action
    after = await command_counts(raw)
    spent = {name: calls - before.get(name, 0) for name, calls in after.items()}
    return {name: calls for name, calls in spent.items() if calls}, outcome
