"""A worker's watch over the priority levels above its ``max_priority``.

A worker reads levels 0 to its ``max_priority``; what a producer with a higher ``max_priority``
kicks above that waits for ever, unseen. So a listening worker looks when it starts and every
:data:`CHECK_SECONDS` (one command per level, in one round trip, beside the reads) and warns
once per queue and level, naming both. The list and stream brokers run the same watch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Literal

from taskiq_redis import queues
from taskiq_redis.connection import RedisConnection
from taskiq_redis.diagnostics import describe

logger = logging.getLogger("taskiq.redis_broker")

CHECK_SECONDS = 60.0


async def watch_levels_above(
    conn: RedisConnection,
    queue_names: Iterable[str],
    max_priority: int,
    kind: Literal["list", "stream"],
) -> None:
    """Warn, once per queue and level, of messages above ``max_priority``; runs until cancelled."""
    if max_priority >= queues.ALL_LEVELS:
        return
    warned: set[tuple[str, int]] = set()
    names = list(queue_names)
    while True:
        for queue in names:
            try:
                above = await queues.levels_above(conn, queue, max_priority, kind)
            except Exception as exc:  # a look that failed is no reason to stop a worker
                logger.debug("Looking above max_priority on %r failed: %s", queue, describe(exc))
                continue
            for level in above:
                if (queue, level) not in warned:
                    warned.add((queue, level))
                    logger.warning(
                        "Queue %r holds messages at priority level %d, above this worker's "
                        "max_priority %d, so it never runs them: a producer has a higher "
                        "max_priority. Give the workers the producers' max_priority.",
                        queue,
                        level,
                        max_priority,
                    )
        await asyncio.sleep(CHECK_SECONDS)
