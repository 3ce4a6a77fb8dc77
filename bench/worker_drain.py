"""How fast a taskiq worker drains a full queue, against taskiq's own ceiling.

Run as ``.venv/bin/python bench/worker_drain.py`` (``make bench`` runs it after ``run.py``;
``--quick`` for a smoke run). It starts a private redis-server, reuses ``.bench/venv-1.2.4``
(made by ``run.py`` when missing) and puts the ``hiredis`` wheel in ``.bench/hiredis`` (a
``--target`` folder added to ``PYTHONPATH`` for the "hiredis" runs, so no venv changes).

One measurement is one process (``--child``): it starts the broker, queues ``--n`` no-op tasks
with the broker's own ``kick``, then runs taskiq's ``Receiver`` (what ``taskiq worker`` runs,
``--max-async-tasks 100``, no result backend, logging at WARNING) until every task ran.
tasks/s = tasks / (the first task's start to the last task's start). The sides:

- ``ceiling``: a broker that yields the queued bytes from memory: taskiq's own cost per task.
- ``ours list``, ``ours stream``: this package's ``ListQueueBroker`` and ``RedisStreamBroker``.
- ``1.2.4 stream``, ``1.2.4 list``: taskiq-redis 1.2.4's, in its own venv.

Each Redis side runs without hiredis (redis-py's pure-Python parser, forced where hiredis is
installed) and with it (this package's default install on CPython). Sides
alternate within each round; the table shows each figure's best round (noise only slows).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections import deque
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from taskiq import AsyncBroker, BrokerMessage

STATE_DIR = Path(__file__).resolve().parent.parent / ".bench"
HIREDIS_DIR = STATE_DIR / "hiredis"
TASK = "drain.noop"
# (side, interpreter: ours or 1.2.4, broker kind)
SIDES = [
    ("ceiling", "ours", "memory"),
    ("ours list", "ours", "list"),
    ("ours stream", "ours", "stream"),
    ("1.2.4 list", "1.2.4", "list"),
    ("1.2.4 stream", "1.2.4", "stream"),
]


# --- the measuring process ------------------------------------------------------------------


def build_broker(kind: str, url: str, hiredis: bool) -> AsyncBroker:
    if kind == "memory":

        class MemoryBroker(AsyncBroker):
            """Yields what was kicked, from a deque: no transport at all."""

            def __init__(self) -> None:
                super().__init__()
                self.queued: deque[bytes] = deque()

            async def kick(self, message: BrokerMessage) -> None:
                self.queued.append(message.message)

            async def listen(self) -> AsyncGenerator[bytes, None]:
                while self.queued:
                    yield self.queued.popleft()
                await asyncio.Event().wait()

        return MemoryBroker()

    import redis.utils

    import taskiq_redis

    options: dict[str, Any] = {"queue_name": "drain"}
    if not hiredis and redis.utils.HIREDIS_AVAILABLE:  # installed in the venv: force it off
        from redis._parsers import _AsyncRESP2Parser

        options["parser_class"] = _AsyncRESP2Parser
    name = {"list": "ListQueueBroker", "stream": "RedisStreamBroker"}[kind]
    broker: AsyncBroker = getattr(taskiq_redis, name)(url, **options)
    return broker


async def measure(kind: str, url: str, n: int, hiredis: bool) -> dict[str, Any]:
    import redis.utils
    from taskiq.kicker import AsyncKicker
    from taskiq.receiver import Receiver

    broker = build_broker(kind, url, hiredis)
    starts: list[float] = []
    done = asyncio.Event()

    @broker.task(task_name=TASK)
    async def noop() -> None:
        starts.append(time.perf_counter())
        if len(starts) == n:
            done.set()

    await broker.startup()
    kicker: AsyncKicker[[], None] = AsyncKicker(TASK, broker, {})
    for start in range(0, n, 500):
        await asyncio.gather(*(kicker.kiq() for _ in range(start, min(n, start + 500))))
    receiver = Receiver(broker, max_async_tasks=100, run_startup=False)
    finish = asyncio.Event()
    cpu, sys_cpu = time.process_time(), os.times().system
    listening = asyncio.ensure_future(receiver.listen(finish))
    try:
        await asyncio.wait_for(done.wait(), 300)
        cpu, sys_cpu = time.process_time() - cpu, os.times().system - sys_cpu
    finally:
        finish.set()
        await asyncio.wait([listening], timeout=10)
        await broker.shutdown()
    elapsed = starts[-1] - starts[0]
    return {
        "tasks": n,
        "seconds": elapsed,
        "tasks_per_s": (n - 1) / elapsed,
        "cpu_us_per_task": cpu / n * 1e6,  # the worker process's own CPU: steadier than time
        "sys_us_per_task": sys_cpu / n * 1e6,
        "hiredis": bool(redis.utils.HIREDIS_AVAILABLE) and hiredis,
    }


# --- the driver -----------------------------------------------------------------------------


def ensure_hiredis() -> None:
    """The hiredis wheel in a folder of its own, for PYTHONPATH (both venvs run Python 3.x)."""
    if any(HIREDIS_DIR.glob("hiredis*")):
        return
    print(f"installing hiredis into {HIREDIS_DIR} ...", flush=True)
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "--target", str(HIREDIS_DIR), "hiredis"], check=True)


def run_child(python: Path, kind: str, url: str, n: int, hiredis: bool) -> dict[str, Any]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if hiredis:
        env["PYTHONPATH"] = str(HIREDIS_DIR)
    command = [str(python), __file__, "--child", kind, "--url", url, "--n", str(n)]
    if hiredis:
        command.append("--hiredis")
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0 or not done.stdout.strip():
        return {"error": done.stderr.strip().splitlines()[-3:]}
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if result["hiredis"] != hiredis:
        return {"error": f"asked for hiredis={hiredis}, ran with {result['hiredis']}"}
    return result


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from run import OLD_VENV, OURS_PYTHON, ensure_old_venv, flushall, redis_server

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=5000, help="tasks per run (default 5000)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="n=1000, 1 round")
    parser.add_argument("--json", type=Path, default=STATE_DIR / "worker_drain.json")
    args = parser.parse_args()
    if args.quick:
        args.n, args.rounds = 1000, 1
    STATE_DIR.mkdir(exist_ok=True)
    ensure_old_venv()
    ensure_hiredis()
    pythons = {"ours": OURS_PYTHON, "1.2.4": OLD_VENV / "bin" / "python"}
    runs: dict[str, list[dict[str, Any]]] = {}
    with redis_server() as url:
        for round_no in range(1, args.rounds + 1):
            print(f"worker drain, round {round_no}/{args.rounds} ...", flush=True)
            for side, python, kind in SIDES:
                for hiredis in (False, True) if kind != "memory" else (False,):
                    flushall(url)
                    outcome = run_child(pythons[python], kind, url, args.n, hiredis)
                    runs.setdefault(f"{side}|{hiredis}", []).append(outcome)
    best = {
        key: max((r["tasks_per_s"] for r in outcomes if "tasks_per_s" in r), default=None)
        for key, outcomes in runs.items()
    }
    ceiling = best["ceiling|False"]
    ceilings = [r.get("tasks_per_s") for r in runs["ceiling|False"]]

    def round_share(key: str) -> float | None:
        """The median over rounds of the share of that round's ceiling: steadier than best."""
        shares = [
            r["tasks_per_s"] / top
            for r, top in zip(runs[key], ceilings, strict=True)
            if "tasks_per_s" in r and top
        ]
        return statistics.median(shares) if shares else None

    print(f"\nworker drain: {args.n} queued no-op tasks, one Receiver, {args.rounds} round(s)")
    print("tasks/s: best round; share: of the best ceiling / median of each round's share;")
    print("no hiredis: redis-py's pure-Python parser; hiredis: what installs by default")
    print(f"{'broker':14}{'no hiredis':>11}{'share':>12}{'hiredis':>10}{'share':>12}")
    for side, _, kind in SIDES:
        cells = []
        for hiredis in (False, True):
            key = f"{side}|{hiredis}"
            figure = best.get(key) if kind != "memory" or not hiredis else None
            median = round_share(key) if figure is not None else None
            if figure is None:
                cells += ["-" if kind == "memory" else "error", ""]
            else:
                share = f"{figure / ceiling:.0%}" if ceiling else "n/a"
                cells += [f"{figure:.0f}", f"{share} / {median:.0%}" if median else share]
        print(f"{side:14}{cells[0]:>11}{cells[1]:>12}{cells[2]:>10}{cells[3]:>12}")
    args.json.write_text(json.dumps({"n": args.n, "best": best, "runs": runs}, indent=2))
    errors = {key: r["error"] for key, outcomes in runs.items() for r in outcomes if "error" in r}
    if errors:
        print(f"errors: {json.dumps(errors)[:2000]}")


def child() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", choices=["memory", "list", "stream"], required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--hiredis", action="store_true")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(measure(args.child, args.url, args.n, args.hiredis))))


if __name__ == "__main__":
    if "--child" in sys.argv:
        child()
    else:
        main()
