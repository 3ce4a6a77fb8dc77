"""A small command beside a slow reply: how long it waits, ours against plain redis-py.

``make bench`` runs it: ``.venv/bin/python bench/slow_reply.py``. It starts its own
redis-server, stores a 64 MB value, and per round sends ``GET`` of it, waits 10 ms (the reply
is on its way), then times an ``EXISTS`` of a small key on the same client. Ours is
``connection.single_node`` with default options; plain is ``redis.asyncio.Redis`` on a
``BlockingConnectionPool``. Rounds alternate between the two, so each pair sees the same
machine; it prints the median wait of each and the median of the per-pair ratios.

The suite asserts only the order (the small reply is not queued behind the big one): a
shared machine's timings are no test.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

BIG, SMALL = "bench:big", "bench:small"


async def wait_beside_big_read(execute: Callable[..., Awaitable[Any]]) -> float:
    """Seconds an EXISTS takes while a 64 MB GET is being read on the same client."""
    reading = asyncio.ensure_future(execute("GET", BIG))
    await asyncio.sleep(0.01)
    started = time.monotonic()
    await execute("EXISTS", SMALL)
    took = time.monotonic() - started
    await reading
    return took


async def measure(url: str, rounds: int) -> tuple[list[float], list[float]]:
    from redis.asyncio import BlockingConnectionPool, Redis

    from taskiq_redis import connection

    plain_pool = BlockingConnectionPool.from_url(url)
    plain = Redis(connection_pool=plain_pool)
    ours = connection.single_node(url)
    try:
        await plain.set(BIG, b"x" * (64 * 1024 * 1024))
        await plain.set(SMALL, 1)
        await ours.execute("PING")
        ours_waits, plain_waits = [], []
        for _ in range(rounds):
            ours_waits.append(await wait_beside_big_read(ours.execute))
            plain_waits.append(await wait_beside_big_read(plain.execute_command))
        return ours_waits, plain_waits
    finally:
        await plain.delete(BIG)
        await ours.close()
        await plain.aclose()
        await plain_pool.disconnect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    from run import redis_server

    with redis_server() as url:
        ours, plain = asyncio.run(measure(url, args.rounds))
    ratios = [o / p for o, p in zip(ours, plain, strict=True)]
    print(f"EXISTS beside a 64 MB GET, one client (median of {args.rounds} alternating rounds):")
    print(f"{'ours ms':>10}{'redis-py ms':>13}{'paired ratio':>14}")
    print(
        f"{statistics.median(ours) * 1000:>10.1f}{statistics.median(plain) * 1000:>13.1f}"
        f"{statistics.median(ratios):>14.2f}"
    )


if __name__ == "__main__":
    main()
