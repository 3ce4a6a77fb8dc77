"""Cancel in a long queue: how long ``broker.cancel`` takes, and the longest Redis is blocked.

``make bench`` runs it after the others: ``.venv/bin/python bench/cancel.py`` (``--size 10000``
for a smoke run). It starts its own redis-server, fills a stream queue and a list queue with
``--size`` taskiq messages each (as ``kiq()`` writes them), and cancels
the last one kicked, then one in the middle and one that is not there (every message looked
at; the worst case), and one in the middle kicked with the ``cancellable`` label (found through
the task index). For each it reports the wall time of the cancel, the number of script calls,
and the longest single command Redis ran (SLOWLOG, which times each script call as one
command). Every round refills the queue.

Then what the label costs a kick: plain and ``cancellable`` kicks through the broker, 50 at a
time, alternating rounds, as kicks per second and their ratio.
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


def broker_message(task_id: str, number: int, **labels: Any) -> Any:
    """A taskiq message as ``kiq()`` makes it (a broker's default formatter)."""
    from taskiq import InMemoryBroker, TaskiqMessage

    task = TaskiqMessage(
        task_id=task_id, task_name="bench:add", labels=labels, args=[number, 1], kwargs={}
    )
    return InMemoryBroker().formatter.dumps(task)


async def fill(url: str, kind: str, queue: str, size: int, broker: Any) -> list[str]:
    """``size`` messages in ``queue``, as the broker's kick writes them; their task ids. The one
    in the middle goes through ``broker`` with the ``cancellable`` label; its id is last."""
    from redis.asyncio import Redis

    client = Redis.from_url(url)
    ids: list[str] = []
    recorded = uuid.uuid4().hex
    pipe = client.pipeline(transaction=False)
    for number in range(size):
        if number == size // 2:
            await pipe.execute()
            await broker.kick(broker_message(recorded, number, cancellable=True))
            pipe = client.pipeline(transaction=False)
        task_id = uuid.uuid4().hex
        ids.append(task_id)
        data = broker_message(task_id, number).message
        if kind == "stream":
            pipe.xadd(queue, {"data": data})
        else:
            pipe.lpush(queue, data)
        if number % 5000 == 4999:
            await pipe.execute()
            pipe = client.pipeline(transaction=False)
    await pipe.execute()
    await client.aclose()
    return [*ids, recorded]


async def started_broker(url: str, kind: str, queue: str) -> Any:
    """A started stream or list broker of ``queue``."""
    import taskiq_redis

    broker: Any = (
        taskiq_redis.RedisStreamBroker(url, queue_name=queue)
        if kind == "stream"
        else taskiq_redis.ListQueueBroker(url, queue_name=queue)
    )
    await broker.startup()
    return broker


async def measure(url: str, kind: str, size: int, rounds: int) -> dict[str, Any]:
    from redis.asyncio import Redis

    client = Redis.from_url(url)
    results: dict[str, list[tuple[float, float, bool, float, int]]] = {
        "last": [],
        "middle": [],
        "absent": [],
        "cancellable": [],
    }
    for round_no in range(rounds):
        queue = f"cancel-{kind}-{round_no}"
        broker = await started_broker(url, kind, queue)
        *ids, recorded = await fill(url, kind, queue, size, broker)
        # a list is looked through from its head (the newest): its worst case is the oldest
        last = ids[-1] if kind == "stream" else ids[0]
        for name, task_id in (
            ("last", last),
            ("middle", ids[size // 2]),
            ("absent", "nope"),
            ("cancellable", recorded),
        ):
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


async def kick_cost(url: str, kind: str, kicks: int, rounds: int) -> tuple[float, float]:
    """Kicks per second through the broker, 50 at a time: plain, and labelled cancellable
    (best of ``rounds``, the two alternating)."""

    best = {False: 0.0, True: 0.0}
    for round_no in range(rounds):
        for labelled in (False, True):
            queue = f"kicks-{kind}-{round_no}-{labelled}"
            broker = await started_broker(url, kind, queue)
            labels = {"cancellable": True} if labelled else {}
            messages = [broker_message(uuid.uuid4().hex, n, **labels) for n in range(kicks)]

            async def kick_share(share: list[Any], broker: Any = broker) -> None:
                for message in share:
                    await broker.kick(message)

            started = time.perf_counter()
            await asyncio.gather(*(kick_share(messages[i::50]) for i in range(50)))
            best[labelled] = max(best[labelled], kicks / (time.perf_counter() - started))
            await broker.shutdown()
    return best[False], best[True]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=100_000, help="messages in the queue")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kicks", type=int, default=20_000, help="kicks per kick-cost round")
    args = parser.parse_args()
    from run import redis_server

    with redis_server() as url:
        print(f"cancel in a queue of {args.size} messages (median of {args.rounds} rounds):")
        print(
            f"{'queue':8}{'which':12}{'wall ms':>10}{'redis ms':>10}{'calls':>7}"
            f"{'longest call ms':>17}  cancelled"
        )
        for kind in ("stream", "list"):
            for name, row in asyncio.run(measure(url, kind, args.size, args.rounds)).items():
                print(
                    f"{kind:8}{name:12}{row['wall_ms']:>10.1f}{row['redis_ms']:>10.1f}"
                    f"{row['calls']:>7}{row['longest_call_ms']:>17.2f}  {row['cancelled']}"
                )
        print(f"\nkicks per second through the broker, 50 at a time (best of {args.rounds}):")
        print(f"{'queue':8}{'plain':>10}{'cancellable':>13}{'ratio':>8}")
        for kind in ("stream", "list"):
            plain, labelled = asyncio.run(kick_cost(url, kind, args.kicks, args.rounds))
            print(f"{kind:8}{plain:>10.0f}{labelled:>13.0f}{labelled / plain:>8.2f}")


if __name__ == "__main__":
    main()
