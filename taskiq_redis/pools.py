"""Connection pools that say how many connections they have handed out.

redis-py's pools keep that count in private attributes, and their public ``can_get_connection``
says only whether one more is free. A lane must know whether *two* are (to send a large batch as
two halves without waiting on, say, a worker's blocking read), so the pools this package makes
keep their own set of what they handed out, through the public ``get_connection`` and
``release`` they override.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import BlockingConnectionPool


class CountsHandedOut:
    """Mixin for a redis-py pool: ``handed_out`` holds the connections out of the pool now."""

    # (Names without a leading underscore: they can never collide with redis-py's own.)
    handed_out: set[Any]

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        connection = await super().get_connection(*args, **kwargs)  # type: ignore[misc]
        self.handed_out.add(connection)
        return connection

    async def release(self, connection: Any) -> None:
        self.handed_out.discard(connection)
        await super().release(connection)  # type: ignore[misc]

    def free_now(self) -> int:
        """How many more connections the pool can hand out without waiting."""
        return int(getattr(self, "max_connections", 1)) - len(self.handed_out)


class CountingBlockingPool(CountsHandedOut, BlockingConnectionPool):
    """redis-py's BlockingConnectionPool, counting what it handed out."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.handed_out = set()
        super().__init__(*args, **kwargs)
