"""Cancel in a long queue: how long ``broker.cancel`` takes, and the longest Redis is blocked.

``make bench`` runs it after the others: ``.venv/bin/python bench/cancel.py`` (``--size 10000``
for a smoke run). It starts its own redis-server, fills a stream queue and a list queue with
``--size`` taskiq messages each (the JSON formatter's, as ``kiq()`` sends them), and cancels
the last one kicked, which the look reaches last (the worst case), then one in the middle and
one that is not there (every message looked at). For each it reports the wall time of the
cancel, the number of script calls, and the longest single command Redis ran (SLOWLOG, which
times each script call as one command). Every round refills the queue.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


async def fill(url: str, kind: str, queue: str, size: int) -> list[str]:
    """``size`` messages in ``queue``, as the broker's kick writes them; their task ids."""
    from redis.asyncio import Redis
    from taskiq import TaskiqMessage
    from taskiq.formatters.json_formatter import JSONFormatter

    client = Redis.from_url(url)
    formatter = JSONFormatter()
    ids: list[str] = []
    pipe = client.pipeline(transaction=False)
    for number in range(size):
        task_id = uuid.uuid4().hex
        ids.append(task_id)
        data = formatter.dumps(
            TaskiqMessage(
                task_id=task_id, task_name="bench:add", labels={}, args=[number, 1], kwargs={}
            )
        ).message
        if kind == "stream":
            pipe.xadd(queue, {"data": data})
        else:
            pipe.lpush(queue, data)
        if number % 5000 == 4999:
            await pipe.execute()
            pipe = client.pipeline(transaction=False)
    await pipe.execute()
    await client.aclose()
    return ids


async def measure(url: str, kind: str, size: int, rounds: int) -> dict[str, Any]:
    from redis.asyncio import Redis

    import taskiq_redis

    client = Redis.from_url(url)
    results: dict[str, list[tuple[float, float, bool, float, int]]] = {
        "last": [],
        "middle": [],
        "absent": [],
    }
    for round_no in range(rounds):
        queue = f"cancel-{kind}-{round_no}"
        broker: Any = (
            taskiq_redis.RedisStreamBroker(url, queue_name=queue)
            if kind == "stream"
            else taskiq_redis.ListQueueBroker(url, queue_name=queue)
        )
        await broker.startup()
        ids = await fill(url, kind, queue, size)
        # The list broker's workers pop the oldest (the tail); the look starts at the head, where
        # the newest are: its worst case is the oldest message.
        last = ids[-1] if kind == "stream" else ids[0]
        for name, task_id in (("last", last), ("middle", ids[size // 2]), ("absent", "nope")):
            await client.config_set("slowlog-max-len", 1024)
            await client.config_set("slowlog-log-slower-than", 0)
            await client.slowlog_reset()
            started = time.perf_counter()
            cancelled = await broker.cancel(task_id)
            took = time.perf_counter() - started
            log = await client.slowlog_get(1024)
            calls = [entry["duration"] for entry in log if b"EVALSHA" in entry["command"].upper()]
            longest, busy = max(calls, default=0), sum(calls)
            results[name].append((took * 1000, longest / 1000, cancelled, busy / 1000, len(calls)))
        await client.config_set("slowlog-log-slower-than", 10000)
        await client.delete(queue)
        await broker.shutdown()
    await client.aclose()
    return {
        name: {
            "wall_ms": statistics.median(row[0] for row in rows),
            "longest_call_ms": max(row[1] for row in rows),
            "cancelled": all(row[2] for row in rows),
            "redis_ms": statistics.median(row[3] for row in rows),
            "calls": max(row[4] for row in rows),
        }
        for name, rows in results.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=100_000, help="messages in the queue")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from run import redis_server

    with redis_server() as url:
        print(f"cancel in a queue of {args.size} messages (median of {args.rounds} rounds):")
        print(
            f"{'queue':8}{'which':8}{'wall ms':>10}{'redis ms':>10}{'calls':>7}"
            f"{'longest call ms':>17}  cancelled"
        )
        for kind in ("stream", "list"):
            for name, row in asyncio.run(measure(url, kind, args.size, args.rounds)).items():
                print(
                    f"{kind:8}{name:8}{row['wall_ms']:>10.1f}{row['redis_ms']:>10.1f}"
                    f"{row['calls']:>7}{row['longest_call_ms']:>17.2f}  {row['cancelled']}"
                )


if __name__ == "__main__":
    main()
