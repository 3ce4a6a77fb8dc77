"""Schedule sources side by side: ours and taskiq-redis 1.2.4's ListRedisScheduleSource.

``make bench`` runs it after bench/run.py: ``.venv/bin/python bench/schedules.py`` (``--sizes
1000`` for a smoke run). It starts its own redis-server, and for each size stores that many cron
schedules in taskiq-redis 1.2's layout (data keys and the ``schedule:cron`` list), then runs each
side in its own interpreter: ``startup()`` (ours takes 1.2's list over into its index),
``get_schedules()``, ``add_schedule()`` of new cron schedules and ``delete_schedule()`` of
existing ones. For each it reports, per call, the Redis commands (INFO commandstats, script
internals included), the Redis time they took (commandstats usec) and the wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pickle
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "schedule"
OPERATIONS = ("startup", "get_schedules", "add_schedule", "delete_schedule")
SLOW_USEC = 200
# What this package's schedule scripts run inside (never sent on their own by the source).
SCRIPT_INTERNALS = {
    "zadd",
    "zrem",
    "hget",
    "hset",
    "hdel",
    "set",
    "del",
    "lpop",
    "exists",
}


def cron_schedule(schedule_id: str) -> dict[str, Any]:
    """A cron schedule as 1.2 stores it: the JSON-mode dump of a ScheduledTask."""
    return {
        "task_name": "bench.task",
        "labels": {},
        "args": [],
        "kwargs": {},
        "schedule_id": schedule_id,
        "cron": "* * * * *",
        "cron_offset": None,
        "time": None,
        "interval": None,
    }


def fill(url: str, size: int) -> None:
    """``size`` cron schedules in 1.2's layout, written in pipelines of 5000."""
    import redis

    client = redis.Redis.from_url(url)
    client.flushall()
    for start in range(0, size, 5000):
        ids = [f"s{number}" for number in range(start, min(start + 5000, size))]
        pipe = client.pipeline(transaction=False)
        pipe.mset({f"{PREFIX}:data:{i}": pickle.dumps(cron_schedule(i)) for i in ids})
        pipe.rpush(f"{PREFIX}:cron", *ids)
        pipe.execute()
    client.close()


async def measure_side(url: str, size: int, calls: int, writes: int) -> dict[str, Any]:
    """Runs inside the side's interpreter: whichever taskiq_redis it imports is measured."""
    import redis.asyncio
    from taskiq import ScheduledTask

    from taskiq_redis import ListRedisScheduleSource

    raw = redis.asyncio.Redis.from_url(url)

    async def stats() -> dict[str, tuple[int, int]]:
        info = await raw.info("commandstats")
        return {
            name: (int(row["calls"]), int(row["usec"]))
            for name, row in info.items()
            if name not in ("cmdstat_info", "cmdstat_config|set", "cmdstat_slowlog|reset")
        }

    def spent(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> Any:
        """Commands (script internals included) and Redis time (each counted once: a script's
        time already holds that of the commands it ran, which commandstats lists again)."""
        delta = {
            name: (calls - before.get(name, (0, 0))[0], usec - before.get(name, (0, 0))[1])
            for name, (calls, usec) in after.items()
        }
        commands = sum(calls for calls, _ in delta.values())
        scripted = delta.get("cmdstat_evalsha", (0, 0))[0] > 0
        usec = sum(
            usec
            for name, (_, usec) in delta.items()
            if not (scripted and name.removeprefix("cmdstat_") in SCRIPT_INTERNALS)
        )
        return commands, usec

    async def timed(action: Any, count: int) -> dict[str, float]:
        # SLOWLOG records commands run longer than the threshold (script internals too, whose
        # time their script's entry already holds): the longest one, if any took over 0.2 ms.
        await raw.config_set("slowlog-max-len", 10_000)
        await raw.config_set("slowlog-log-slower-than", SLOW_USEC)
        await raw.slowlog_reset()
        before = await stats()
        began = time.perf_counter()
        for number in range(count):
            await action(number)
        wall = time.perf_counter() - began
        commands, usec = spent(before, await stats())
        await raw.config_set("slowlog-log-slower-than", 10_000)
        entries = await raw.slowlog_get(10_000)
        durations = [entry["duration"] for entry in entries]
        return {
            "commands": commands / count,
            "redis_ms": usec / count / 1000,
            "wall_ms": wall / count * 1000,
            "longest_ms": max(durations) / 1000 if durations else 0.0,
        }

    source = ListRedisScheduleSource(url, prefix=PREFIX)
    results: dict[str, Any] = {}

    async def startup(_: int) -> None:
        await source.startup()

    async def get(_: int) -> None:
        got = await source.get_schedules()
        if len(got) < size:
            raise SystemExit(f"get_schedules returned {len(got)} of {size}")

    async def add(number: int) -> None:
        schedule = ScheduledTask.model_validate(cron_schedule(f"new{number}"))
        await source.add_schedule(schedule)

    async def delete(number: int) -> None:
        await source.delete_schedule(f"s{number * 7}")

    try:
        results["startup"] = await timed(startup, 1)
        await source.get_schedules()  # connections open, scripts loaded
        results["get_schedules"] = await timed(get, calls)
        results["add_schedule"] = await timed(add, writes)
        results["delete_schedule"] = await timed(delete, writes)
    finally:
        await source.shutdown()
        await raw.aclose()
    return results


def run_side(python: Path, url: str, size: int, calls: int, writes: int) -> dict[str, Any]:
    command = [str(python), __file__, "--side-url", url, "--size", str(size)]
    command += ["--calls", str(calls), "--writes", str(writes)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not done.stdout.strip():
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        print(f"  failed (exit {done.returncode}): {tail}", flush=True)
        return {}
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def print_table(table: dict[int, dict[str, dict[str, Any]]], sides: list[str]) -> None:
    header = (
        "schedules",
        "operation",
        "side",
        "commands",
        "redis ms",
        "wall ms",
        "longest command",
    )
    widths = (10, 16, 7, 10, 10, 10, 15)
    print("schedule sources, per call: commands and Redis time (INFO commandstats, script")
    print("internals included), wall time, and the longest single command (SLOWLOG)")
    print("".join(text.ljust(width) for text, width in zip(header, widths, strict=True)))
    for size, by_side in table.items():
        for operation in OPERATIONS:
            for side in sides:
                cell = by_side.get(side, {}).get(operation)
                if cell is None:
                    values = ("n/a", "n/a", "n/a", "n/a")
                else:
                    longest = cell["longest_ms"]
                    longest_text = f"{longest:.2f} ms" if longest else f"< {SLOW_USEC / 1000} ms"
                    values = (
                        f"{cell['commands']:.1f}",
                        f"{cell['redis_ms']:.3f}",
                        f"{cell['wall_ms']:.2f}",
                        longest_text,
                    )
                row = (str(size), operation, side, *values)
                print("".join(text.ljust(width) for text, width in zip(row, widths, strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--calls", type=int, default=3, help="get_schedules() calls per size")
    parser.add_argument("--writes", type=int, default=200, help="adds and deletes per size")
    parser.add_argument("--json", type=Path, default=ROOT / ".bench" / "schedules.json")
    parser.add_argument("--side-url", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side_url:
        print(
            json.dumps(asyncio.run(measure_side(args.side_url, args.size, args.calls, args.writes)))
        )
        return

    sys.path.insert(0, str(ROOT / "bench"))
    from run import OLD_VENV, OURS_PYTHON, STATE_DIR, ensure_old_venv, redis_server

    STATE_DIR.mkdir(exist_ok=True)
    ensure_old_venv()
    sides = {"ours": OURS_PYTHON, "1.2.4": OLD_VENV / "bin" / "python"}
    table: dict[int, dict[str, dict[str, Any]]] = {}
    with redis_server() as url:
        for size in (int(size) for size in args.sizes.split(",")):
            table[size] = {}
            for side, python in sides.items():
                print(f"schedules: {side}, {size} cron schedules ...", flush=True)
                fill(url, size)
                table[size][side] = run_side(python, url, size, args.calls, args.writes)
    print()
    print_table(table, list(sides))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
