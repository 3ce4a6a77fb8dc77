"""How fast a taskiq worker drains a full queue, against taskiq's own ceiling.

Run as ``.venv/bin/python bench/worker_drain.py`` (``make bench`` runs it after ``run.py``;
``--quick`` for a smoke run). It starts a private redis-server, reuses ``.bench/venv-1.2.4``
(made by ``run.py`` when missing) and puts the ``hiredis`` wheel in ``.bench/hiredis`` (a
``--target`` folder added to ``PYTHONPATH`` for the "hiredis" runs, so no venv changes).

One measurement is one process (``--child``) that drains twice, in turns: the side's broker and
the ceiling, a broker that yields the queued bytes from memory (taskiq's own cost per task).
Each drain queues ``--n`` no-op tasks with the broker's own ``kick``, then runs taskiq's
``Receiver`` (what ``taskiq worker`` runs, ``--max-async-tasks 100``, no result backend, logging
at WARNING) until every task ran; tasks/s = tasks / (the first task's start to the last task's
start). The sides:

- ``ours list``, ``ours stream``: this package's ``ListQueueBroker`` and ``RedisStreamBroker``.
- ``1.2.4 stream``, ``1.2.4 list``: taskiq-redis 1.2.4's, in its own venv.

Each Redis side runs without hiredis (redis-py's pure-Python parser, forced where hiredis is
installed) and with it (this package's default install on CPython). Sides alternate within each
round, and so does which of a child's two drains goes first. The table shows each figure's best
round (noise only slows) and the median over rounds of each side's share of the ceiling drained
beside it: this machine's speed moves by tens of percent within seconds, and a share of a
ceiling measured a second away is much steadier than one of a ceiling measured minutes away.
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


def run_child(
    python: Path, kind: str, url: str, n: int, hiredis: bool, ceiling_first: bool
) -> dict[str, Any]:
    """One child: the side's drain and a ceiling's, in the order asked; both results."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if hiredis:
        env["PYTHONPATH"] = str(HIREDIS_DIR)
    command = [str(python), __file__, "--child", kind, "--url", url, "--n", str(n)]
    if hiredis:
        command.append("--hiredis")
    if ceiling_first:
        command.append("--ceiling-first")
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0 or not done.stdout.strip():
        return {"error": done.stderr.strip().splitlines()[-3:]}
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if result["side"]["hiredis"] != hiredis:
        return {"error": f"asked for hiredis={hiredis}, ran with {result['side']['hiredis']}"}
    return result


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from run import OLD_VENV, OURS_PYTHON, ensure_old_venv, flushall, redis_server

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=5000, help="tasks per run (default 5000)")
    parser.add_argument("--rounds", type=int, default=7)
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
    ceilings: list[float] = []
    with redis_server() as url:
        for round_no in range(1, args.rounds + 1):
            print(f"worker drain, round {round_no}/{args.rounds} ...", flush=True)
            turn = round_no
            for side, python, kind in SIDES:
                for hiredis in (False, True):
                    turn += 1
                    flushall(url)
                    outcome = run_child(
                        pythons[python], kind, url, args.n, hiredis, ceiling_first=turn % 2 == 0
                    )
                    if "error" not in outcome:
                        ceilings.append(outcome["ceiling"]["tasks_per_s"])
                    runs.setdefault(f"{side}|{hiredis}", []).append(outcome)
    ceiling = max(ceilings, default=0.0)

    def best(key: str) -> float | None:
        rates = [r["side"]["tasks_per_s"] for r in runs[key] if "error" not in r]
        return max(rates, default=None)

    def paired_share(key: str) -> float | None:
        """The median over rounds of the side's share of the ceiling drained beside it."""
        shares = [
            r["side"]["tasks_per_s"] / r["ceiling"]["tasks_per_s"]
            for r in runs[key]
            if "error" not in r
        ]
        return statistics.median(shares) if shares else None

    print(f"\nworker drain: {args.n} queued no-op tasks, one Receiver, {args.rounds} round(s)")
    print("tasks/s: best round; share: of the best ceiling / median over rounds of the share of")
    print("the ceiling drained beside it; no hiredis: redis-py's pure-Python parser; hiredis:")
    print("what installs by default")
    print(f"{'broker':14}{'no hiredis':>11}{'share':>12}{'hiredis':>10}{'share':>12}")
    print(f"{'ceiling':14}{ceiling:>11.0f}{'100%':>12}")
    for side, _, _ in SIDES:
        cells = []
        for hiredis in (False, True):
            key = f"{side}|{hiredis}"
            figure, median = best(key), paired_share(key)
            if figure is None or median is None:
                cells += ["error", ""]
            else:
                share = f"{figure / ceiling:.0%}" if ceiling else "n/a"
                cells += [f"{figure:.0f}", f"{share} / {median:.0%}"]
        print(f"{side:14}{cells[0]:>11}{cells[1]:>12}{cells[2]:>10}{cells[3]:>12}")
    args.json.write_text(json.dumps({"n": args.n, "ceiling": ceiling, "runs": runs}, indent=2))
    errors = {key: r["error"] for key, outcomes in runs.items() for r in outcomes if "error" in r}
    if errors:
        print(f"errors: {json.dumps(errors)[:2000]}")


def child() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", choices=["list", "stream"], required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--hiredis", action="store_true")
    parser.add_argument("--ceiling-first", action="store_true")
    args = parser.parse_args()
    order = ["ceiling", "side"] if args.ceiling_first else ["side", "ceiling"]
    result = {}
    for name in order:
        kind = "memory" if name == "ceiling" else args.child
        result[name] = asyncio.run(measure(kind, args.url, args.n, args.hiredis))
    print(json.dumps(result))


if __name__ == "__main__":
    if "--child" in sys.argv:
        child()
    else:
        main()
