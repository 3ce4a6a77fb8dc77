"""Fault soak: two real taskiq workers under random faults lose no task and log no traceback.

Run as ``.venv/bin/python tools/chaos.py [--seconds 60] [--seed N] [--tasks-per-second 50]
[--url redis://...]`` from anywhere; the workers run from the repository root.

1. A private ``redis-server`` on a free loopback port, in a temporary folder, with
   ``--appendonly yes --appendfsync always --save ""``: a restart keeps every acknowledged
   write. With ``--url`` that server is used instead, and the Redis restart fault is skipped.
2. Two ``taskiq worker tools.chaos_app:broker --workers 1 --max-async-tasks 10`` processes, each
   in a process group of its own, logging to ``.chaos/<run>/worker-<k>-<generation>.log``. The
   app (``tools/chaos_app.py``) is a ``RedisStreamBroker`` with ``idle_timeout=3000`` and a
   ``RedisAsyncResultBackend``; its one task ``record(n)`` adds ``n`` to ``chaos:{run}:done``
   and counts the run in ``chaos:{run}:runs``.
3. A producer here kicks ``record(n)`` for n = 0, 1, 2, ... at about ``--tasks-per-second`` for
   ``--seconds``. A kick that raises is logged, counted and retried until it returns; only then
   does ``n`` count as expected.
4. Meanwhile, every 1.5-4 s (seeded), one fault: ``kill -9`` a worker's process group, SIGTERM a
   worker (it must exit within 15 s), restart Redis (SIGTERM, start again on the same port and
   folder), ``CLIENT KILL TYPE normal`` or ``CLIENT PAUSE 1500 ALL``. A worker that a fault
   stopped, or that exited on its own (reported), is started again as its next generation.
5. Then no more faults; up to 120 s for every expected ``n`` to be done, the consumer group to
   have nothing pending and every expected task's result to be ready; then SIGTERM the workers.
6. The report (also ``.chaos/<run>/report.json``). Exit status 0 only when no task was lost,
   nothing is pending, no result is missing, no worker log holds a traceback and both workers
   stopped within 15 s of the final SIGTERM.

Everything started here (workers, redis-server) is killed on exit, Ctrl-C and errors included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, ModuleType
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
RUNS_DIR = ROOT / ".chaos"
APP = "tools.chaos_app:broker"
WORKERS = 2
WORKER_ARGS = ("--workers", "1", "--max-async-tasks", "10")
FAULT_GAP_SECONDS = (1.5, 4.0)
FAULT_KINDS = ("kill9", "sigterm", "redis_restart", "client_kill", "client_pause")
PAUSE_MS = 1500
STOP_PATIENCE_SECONDS = 15.0  # a SIGTERMed worker must be gone by then
KILL_PATIENCE_SECONDS = 10.0  # a SIGKILLed process group must be gone by then
REDIS_PATIENCE_SECONDS = 30.0  # for redis-server to stop, or to answer after a start
DRAIN_PATIENCE_SECONDS = 120.0
READY_LINE = "Listening started."  # what taskiq logs once a worker's broker started
READY_PATIENCE_SECONDS = 30.0
KICK_TIMEOUT_SECONDS = 10.0
KICK_RETRY_SECONDS = 0.1
POLL_SECONDS = 0.05
EXCERPT_BEFORE, EXCERPT_AFTER = 10, 30  # lines around the first traceback
LEVEL = re.compile(r"\]\[(DEBUG|INFO|WARNING|ERROR|CRITICAL)\s*\]")
PROCESS = re.compile(r"^\[[^\]]*\]\s*")  # taskiq's "[worker-0] " before the message
EXECUTING = re.compile(r"^Executing task \S+ with ID: (\S+)")
NUMBER = re.compile(r"\d+")
STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]")


def describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


class Journal:
    """Timestamped lines on stdout and in the run folder's ``chaos.log``."""

    def __init__(self, path: Path) -> None:
        self.started = time.monotonic()
        self._file: IO[str] = path.open("a", encoding="utf-8")

    def say(self, message: str) -> None:
        now = datetime.datetime.now().strftime("%H:%M:%S,%f")[:-3]
        line = f"[{now} +{time.monotonic() - self.started:6.1f}s] {message}"
        print(line, flush=True)
        self._file.write(line + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


@dataclass
class Stats:
    faults: Counter[str] = field(default_factory=Counter)
    fault_log: list[dict[str, Any]] = field(default_factory=list)
    fault_errors: int = 0
    kick_failures: int = 0
    expected: dict[int, str] = field(default_factory=dict)  # n -> task id of the kick that returned
    produced_seconds: float = 0.0
    unexpected_exits: int = 0
    slow_sigterm_stops: int = 0  # a fault's SIGTERM that needed a SIGKILL after 15 s
    final_stops: dict[str, float | None] = field(default_factory=dict)


# --- processes ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process of the group remains.

    Orphans are reaped by PID 1, which in a container may never happen: a zombie counts as gone.
    """
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def kill_group_now(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGKILL a process group started with ``start_new_session`` and reap its leader."""
    if proc is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(KILL_PATIENCE_SECONDS)


async def wait_group_gone(proc: subprocess.Popen[bytes], timeout: float) -> float | None:
    """Seconds until the leader exited and its group is gone; None after ``timeout``."""
    started = time.monotonic()
    while True:
        proc.poll()
        waited = time.monotonic() - started
        if proc.returncode is not None and not group_alive(proc.pid):
            return waited
        if waited > timeout:
            return None
        await asyncio.sleep(POLL_SECONDS)


class RedisServer:
    """The private redis-server: AOF with fsync on every write, no RDB snapshots."""

    def __init__(self, folder: Path, log: Path) -> None:
        self.port = free_port()
        self.folder = folder
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        if shutil.which("redis-server") is None:
            sys.exit("error: redis-server is not installed (Debian: apt-get install redis-server)")
        # stdout too: a server that cannot start says why there before it opens its log file.
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    *("redis-server", "--port", str(self.port), "--bind", "127.0.0.1"),
                    *("--dir", str(self.folder), "--appendonly", "yes"),
                    *("--appendfsync", "always", "--save", "", "--daemonize", "no"),
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    async def answers(self) -> bool:
        """Whether the server answers PING with PONG (not LOADING, not a refused connection)."""
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.port), 1.0
            )
        except (OSError, asyncio.TimeoutError):
            return False
        try:
            writer.write(b"PING\r\n")
            await writer.drain()
            return (await asyncio.wait_for(reader.readline(), 1.0)).startswith(b"+PONG")
        except (OSError, asyncio.TimeoutError):
            return False
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def wait_ready(self) -> float:
        started = time.monotonic()
        while not await self.answers():
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited; see {self.log}")
            if time.monotonic() - started > REDIS_PATIENCE_SECONDS:
                raise RuntimeError(f"redis-server did not answer within {REDIS_PATIENCE_SECONDS} s")
            await asyncio.sleep(POLL_SECONDS)
        return time.monotonic() - started

    async def stop(self) -> float:
        """SIGTERM (the server fsyncs its AOF and exits); seconds until it exited."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        waited = await wait_group_gone(self.proc, REDIS_PATIENCE_SECONDS)
        if waited is None:
            raise RuntimeError(f"redis-server still running {REDIS_PATIENCE_SECONDS} s after TERM")
        return waited

    def kill_now(self) -> None:
        kill_group_now(self.proc)


@dataclass
class Worker:
    index: int
    generation: int = 0
    proc: subprocess.Popen[bytes] | None = None
    # Held by whoever handles the process (a fault, the supervisor, the final stop).
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Workers:
    """The ``taskiq worker`` processes: started, restarted, signalled, killed."""

    def __init__(self, run_dir: Path, env: dict[str, str], journal: Journal, stats: Stats) -> None:
        self.run_dir = run_dir
        self.env = env
        self.journal = journal
        self.stats = stats
        self.all = [Worker(index) for index in range(1, WORKERS + 1)]
        self.logs: list[Path] = []  # in the order the processes were started

    def start(self, worker: Worker) -> None:
        worker.generation += 1
        log = self.run_dir / f"worker-{worker.index}-{worker.generation}.log"
        command = [sys.executable, "-m", "taskiq", "worker", APP, *WORKER_ARGS]
        with log.open("wb") as out:
            worker.proc = subprocess.Popen(
                command,
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.logs.append(log)
        self.journal.say(
            f"worker {worker.index} generation {worker.generation} started "
            f"(pid {worker.proc.pid}, log {log.name})"
        )

    async def wait_listening(self, worker: Worker) -> bool:
        """Wait (up to 30 s) until the worker's current log says it is listening."""
        log = self.run_dir / f"worker-{worker.index}-{worker.generation}.log"
        deadline = time.monotonic() + READY_PATIENCE_SECONDS
        while READY_LINE not in log.read_text(errors="replace"):
            if time.monotonic() > deadline or worker.proc is None or worker.proc.poll() is not None:
                return False
            await asyncio.sleep(0.1)
        return True

    async def kill(self, worker: Worker) -> None:
        """SIGKILL the worker's whole process group and wait until it is gone."""
        assert worker.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.proc.pid, signal.SIGKILL)
        if await wait_group_gone(worker.proc, KILL_PATIENCE_SECONDS) is None:
            raise RuntimeError(f"worker {worker.index} still running after SIGKILL")

    async def terminate(self, worker: Worker) -> float | None:
        """SIGTERM the main process, as a supervisor would; seconds until the group is gone.

        None, and the group SIGKILLed, when it was still there after 15 s.
        """
        assert worker.proc is not None
        with contextlib.suppress(ProcessLookupError):
            worker.proc.send_signal(signal.SIGTERM)
        waited = await wait_group_gone(worker.proc, STOP_PATIENCE_SECONDS)
        if waited is None:
            self.journal.say(
                f"worker {worker.index} still running {STOP_PATIENCE_SECONDS:.0f} s after "
                f"SIGTERM; kill -9 (log {self.run_dir.name}/"
                f"worker-{worker.index}-{worker.generation}.log)"
            )
            await self.kill(worker)
        return waited

    async def supervise(self) -> None:
        """Start again a worker that exited without a fault asking it to (and report it)."""
        while True:
            for worker in self.all:
                proc = worker.proc
                if worker.lock.locked() or proc is None or proc.poll() is None:
                    continue
                async with worker.lock:
                    self.stats.unexpected_exits += 1
                    self.journal.say(
                        f"UNEXPECTED: worker {worker.index} generation {worker.generation} "
                        f"exited on its own with code {proc.returncode}"
                    )
                    await self.kill(worker)  # whatever of its group is left
                    self.start(worker)
            await asyncio.sleep(0.25)

    def kill_all_now(self) -> None:
        for worker in self.all:
            kill_group_now(worker.proc)


# --- faults ---------------------------------------------------------------------------------


class Injector:
    """One random fault every 1.5-4 s until told to stop; each fault is over before the next."""

    def __init__(
        self,
        rng: random.Random,
        workers: Workers,
        server: RedisServer | None,
        url: str,
        journal: Journal,
        stats: Stats,
    ) -> None:
        self.rng = rng
        self.workers = workers
        self.server = server
        self.url = url
        self.journal = journal
        self.stats = stats
        self.kinds = [kind for kind in FAULT_KINDS if kind != "redis_restart" or server]
        self.faults: dict[str, Callable[[], Awaitable[str]]] = {
            "kill9": self.kill9,
            "sigterm": self.sigterm,
            "redis_restart": self.redis_restart,
            "client_kill": self.client_kill,
            "client_pause": self.client_pause,
        }

    async def run(self, stop: asyncio.Event) -> None:
        while True:
            try:
                await asyncio.wait_for(stop.wait(), self.rng.uniform(*FAULT_GAP_SECONDS))
                return
            except asyncio.TimeoutError:
                pass
            kind = self.rng.choice(self.kinds)
            number = sum(self.stats.faults.values()) + 1
            self.stats.faults[kind] += 1
            started = time.monotonic()
            wall = datetime.datetime.now().strftime("%H:%M:%S,%f")[:-3]
            try:
                outcome = await self.faults[kind]()
            except RuntimeError:
                raise
            except Exception as exc:  # a Redis command of the fault failed: report, go on
                self.stats.fault_errors += 1
                outcome = f"failed: {describe(exc)}"
            self.journal.say(f"fault #{number} {kind}: {outcome}")
            self.stats.fault_log.append(
                {
                    "number": number,
                    "kind": kind,
                    "at": wall,
                    "since_start_s": round(started - self.journal.started, 2),
                    "outcome": outcome,
                }
            )

    def _worker(self) -> Worker:
        return self.rng.choice(self.workers.all)

    async def kill9(self) -> str:
        worker = self._worker()
        async with worker.lock:
            assert worker.proc is not None
            self.journal.say(
                f"FAULT kill -9 worker {worker.index} generation {worker.generation} "
                f"(process group {worker.proc.pid})"
            )
            await self.workers.kill(worker)
            self.workers.start(worker)
        return f"worker {worker.index} killed and started again"

    async def sigterm(self) -> str:
        worker = self._worker()
        async with worker.lock:
            assert worker.proc is not None
            self.journal.say(
                f"FAULT SIGTERM worker {worker.index} generation {worker.generation} "
                f"(pid {worker.proc.pid})"
            )
            waited = await self.workers.terminate(worker)
            if waited is None:
                self.stats.slow_sigterm_stops += 1
                gone = f"not gone {STOP_PATIENCE_SECONDS:.0f} s after SIGTERM, killed"
            else:
                gone = f"exited {waited:.1f} s after SIGTERM (code {worker.proc.returncode})"
            self.workers.start(worker)
        return f"worker {worker.index} {gone}, started again"

    async def redis_restart(self) -> str:
        assert self.server is not None
        self.journal.say(f"FAULT restart Redis (SIGTERM redis-server, port {self.server.port})")
        stopped = await self.server.stop()
        self.server.start()
        answered = await self.server.wait_ready()
        return f"stopped in {stopped:.1f} s, answering {answered:.1f} s after the start"

    async def _command(self, *args: str) -> Any:
        from redis import asyncio as aioredis

        client = aioredis.Redis.from_url(self.url)
        try:
            return await client.execute_command(*args)  # type: ignore[no-untyped-call]
        finally:
            await client.aclose()

    async def client_kill(self) -> str:
        self.journal.say("FAULT CLIENT KILL TYPE normal")
        killed = await self._command("CLIENT", "KILL", "TYPE", "normal")
        return f"{killed} connections killed"

    async def client_pause(self) -> str:
        self.journal.say(f"FAULT CLIENT PAUSE {PAUSE_MS} ALL")
        await self._command("CLIENT", "PAUSE", str(PAUSE_MS), "ALL")
        return "paused"


# --- producer and checks --------------------------------------------------------------------


async def produce(
    app: ModuleType, args: argparse.Namespace, journal: Journal, stats: Stats
) -> None:
    """Kick record(n) for n = 0, 1, ... on a schedule of ``--tasks-per-second``."""
    started = time.monotonic()
    n = 0
    while True:
        due = started + n / args.tasks_per_second
        if due - started >= args.seconds:
            break
        if due > time.monotonic():
            await asyncio.sleep(due - time.monotonic())
        attempt = 0
        while True:
            attempt += 1
            try:
                task = await asyncio.wait_for(app.record.kiq(n), KICK_TIMEOUT_SECONDS)
            except Exception as exc:
                stats.kick_failures += 1
                journal.say(
                    f"kick of record({n}) failed (attempt {attempt}; "
                    f"{stats.kick_failures} failed kicks so far), retrying: {describe(exc)}"
                )
                await asyncio.sleep(KICK_RETRY_SECONDS)
            else:
                stats.expected[n] = str(task.task_id)
                break
        n += 1
    stats.produced_seconds = time.monotonic() - started
    journal.say(f"producer done: {n} tasks kicked in {stats.produced_seconds:.1f} s")


@dataclass
class Outcome:
    done: set[int] = field(default_factory=set)
    runs: dict[int, int] = field(default_factory=dict)
    pending: int | None = None
    results_missing: list[int] = field(default_factory=list)
    dead_letters: int = 0
    entries_added: int | None = None  # XADDs the queue stream ever took (XINFO STREAM)
    waited: float = 0.0


async def look(app: ModuleType, client: Any, stats: Stats, results: bool) -> Outcome:
    """What Redis holds now; the results are checked only when asked."""
    outcome = Outcome()
    outcome.done = {int(member) for member in await client.smembers(app.DONE_KEY)}
    summary = await client.xpending(app.broker.queue_name, app.broker.consumer_group_name)
    outcome.pending = int(summary["pending"])
    if results:
        backend = app.broker.result_backend
        for n, task_id in sorted(stats.expected.items()):
            if not await backend.is_result_ready(task_id):
                outcome.results_missing.append(n)
        raw_runs = await client.hgetall(app.RUNS_KEY)
        outcome.runs = {int(key): int(value) for key, value in raw_runs.items()}
        outcome.dead_letters = int(await client.xlen(f"{app.broker.queue_name}:dead"))
        info = await client.xinfo_stream(app.broker.queue_name)
        added = info.get("entries-added")  # Redis 7.0 and later
        outcome.entries_added = None if added is None else int(added)
    return outcome


async def drain(app: ModuleType, url: str, journal: Journal, stats: Stats) -> Outcome:
    """Wait (up to 120 s) until every expected task is done, with nothing pending."""
    from redis import asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    started = time.monotonic()
    said = 0.0
    expected = set(stats.expected)
    try:
        while True:
            waited = time.monotonic() - started
            last = waited > DRAIN_PATIENCE_SECONDS
            try:
                outcome = await look(app, client, stats, results=False)
                settled = expected <= outcome.done and outcome.pending == 0
                if settled or last:
                    outcome = await look(app, client, stats, results=True)
                    if not outcome.results_missing or last:
                        outcome.waited = waited
                        return outcome
                if waited - said >= 5:
                    said = waited
                    journal.say(
                        f"draining: {len(expected & outcome.done)}/{len(expected)} done, "
                        f"{outcome.pending} pending, {len(outcome.results_missing)} results "
                        "missing"
                    )
            except Exception as exc:
                if last:
                    raise
                journal.say(f"draining: reading the state failed, retrying: {describe(exc)}")
            await asyncio.sleep(0.5)
    finally:
        await client.aclose()


# --- worker logs ----------------------------------------------------------------------------


@dataclass
class LogScan:
    tracebacks: int = 0
    levels: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)  # "logged message -> exception"
    first: tuple[str, Path, int, list[str]] | None = None  # (stamp, log, line index, lines)
    # The library's (and taskiq's) warnings and errors, numbers replaced by '#'.
    notices: Counter[str] = field(default_factory=Counter)
    executions: dict[str, list[str]] = field(default_factory=dict)  # task id -> "log stamp"


def scan_logs(logs: list[Path]) -> LogScan:
    scan = LogScan()
    for log in logs:
        lines = log.read_text(errors="replace").splitlines()
        stamp, message = "", ""
        for index, line in enumerate(lines):
            level = LEVEL.search(line)
            if level:
                scan.levels[level.group(1)] += 1
            found = STAMP.match(line)
            if found:  # a log record's first line: what the traceback below belongs to
                stamp = found.group(1)
                message = PROCESS.sub("", line[level.end() :] if level else line)
                executing = EXECUTING.search(message)
                if executing:
                    where = f"{log.name} {stamp.split()[-1]}"
                    scan.executions.setdefault(executing.group(1), []).append(where)
                elif level and level.group(1) != "INFO" and "[chaos.app]" not in line:
                    logger = line[found.end() : level.start() + 1]
                    text = NUMBER.sub("#", message.strip())[:150]
                    scan.notices[f"{logger}[{level.group(1)}] {text}"] += 1
            if "Traceback" not in line:
                continue
            scan.tracebacks += 1
            raised = next(
                (
                    later
                    for later in lines[index + 1 :]
                    if later and not later[0].isspace() and not later.startswith("Traceback")
                ),
                "?",
            )
            scan.kinds[f"{message.strip()[:120]} -> {raised[:160]}"] += 1
            if scan.first is None or (stamp and stamp < scan.first[0]):
                scan.first = (stamp, log, index, lines)
    return scan


# --- the run --------------------------------------------------------------------------------


def report_lines(
    args: argparse.Namespace, stats: Stats, outcome: Outcome, scan: LogScan, run_dir: Path
) -> tuple[list[str], dict[str, Any], bool]:
    expected = set(stats.expected)
    lost = sorted(expected - outcome.done)
    more_than_once = sorted(n for n, count in outcome.runs.items() if count > 1)
    extra = sorted(outcome.done - expected)
    faults = ", ".join(f"{kind} {stats.faults[kind]}" for kind in FAULT_KINDS)
    stops = ", ".join(
        f"worker {name} {'NOT within 15 s' if seconds is None else f'{seconds:.1f} s'}"
        for name, seconds in stats.final_stops.items()
    )
    slow_final = sum(seconds is None for seconds in stats.final_stops.values())
    ok = (
        not lost
        and outcome.pending == 0
        and not outcome.results_missing
        and scan.tracebacks == 0
        and slow_final == 0
    )
    levels = ", ".join(f"{level} {scan.levels[level]}" for level in ("WARNING", "ERROR"))
    added = "unknown (Redis before 7.0)"
    if outcome.entries_added is not None:
        repeated = max(0, outcome.entries_added - len(expected) - stats.kick_failures)
        added = (
            f"{outcome.entries_added} for {len(expected)} kicks that returned and "
            f"{stats.kick_failures} that raised: at least {repeated} XADDs repeated under a "
            "kick that returned once"
        )
    lines = [
        f"seconds: {args.seconds} (producer {stats.produced_seconds:.1f} s, "
        f"drain {outcome.waited:.1f} s)",
        f"seed: {args.seed}",
        f"faults injected: {sum(stats.faults.values())} ({faults}; "
        f"{stats.fault_errors} failed to apply)",
        f"kicked (expected): {len(expected)}",
        f"done: {len(expected & outcome.done)}"
        + (f" (and {len(extra)} done whose kick raised)" if extra else ""),
        f"lost: {len(lost)}" + (f" {lost[:20]}" if lost else ""),
        f"ran more than once: {len(more_than_once)}",
        f"pending at the end: {outcome.pending}",
        f"results missing: {len(outcome.results_missing)}"
        + (f" {outcome.results_missing[:20]}" if outcome.results_missing else ""),
        f"kick failures retried: {stats.kick_failures}",
        f"tracebacks: {scan.tracebacks}",
        f"worker exits no fault asked for: {stats.unexpected_exits}; SIGTERM faults that needed "
        f"kill -9: {stats.slow_sigterm_stops}; final SIGTERM stop: {stops}",
        f"dead letters: {outcome.dead_letters}; worker log lines: {levels}",
        f"stream entries added: {added}",
        f"verdict: {'PASS' if ok else 'FAIL'} (run folder {run_dir})",
    ]
    data = {
        "seconds": args.seconds,
        "seed": args.seed,
        "tasks_per_second": args.tasks_per_second,
        "url_given": bool(args.url),
        "faults": dict(stats.faults),
        "faults_failed": stats.fault_errors,
        "fault_log": stats.fault_log,
        "kicked": len(expected),
        "done": len(expected & outcome.done),
        "done_not_expected": extra,
        "lost": lost,
        "ran_more_than_once": len(more_than_once),
        "ran_more_than_once_n": more_than_once,
        "pending": outcome.pending,
        "results_missing": outcome.results_missing,
        "kick_failures": stats.kick_failures,
        "tracebacks": scan.tracebacks,
        "traceback_kinds": dict(scan.kinds),
        "log_levels": dict(scan.levels),
        "unexpected_worker_exits": stats.unexpected_exits,
        "sigterm_faults_killed": stats.slow_sigterm_stops,
        "final_stop_seconds": stats.final_stops,
        "dead_letters": outcome.dead_letters,
        "stream_entries_added": outcome.entries_added,
        "warnings_and_errors": dict(scan.notices),
        "task_runs": {  # where each lost, repeated or result-less task was executed
            str(n): {
                "task_id": stats.expected.get(n),
                "runs_counted": outcome.runs.get(n, 0),
                "executions": sorted(
                    scan.executions.get(stats.expected.get(n, ""), []),
                    key=lambda where: where.split()[-1],
                ),
            }
            for n in sorted({*lost, *more_than_once, *outcome.results_missing})
        },
        "producer_seconds": round(stats.produced_seconds, 2),
        "drain_seconds": round(outcome.waited, 2),
        "passed": ok,
    }
    return lines, data, ok


def import_app(url: str, queue: str, run: str) -> ModuleType:
    os.environ.update(CHAOS_REDIS_URL=url, CHAOS_QUEUE=queue, CHAOS_RUN=run)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import importlib

    return importlib.import_module("tools.chaos_app")


async def soak(
    args: argparse.Namespace,
    run: str,
    run_dir: Path,
    journal: Journal,
    stats: Stats,
    workers: Workers,
    server: RedisServer | None,
    url: str,
) -> tuple[Outcome, LogScan]:
    if server is not None:
        server.start()
        await server.wait_ready()
        journal.say(f"redis-server on {url} (pid {server.proc.pid if server.proc else '?'})")
    app = import_app(url, f"chaos-{run}", run)
    await app.broker.startup()
    try:
        for worker in workers.all:
            workers.start(worker)
        supervisor = asyncio.ensure_future(workers.supervise())
        stop_faults = asyncio.Event()
        injector = asyncio.ensure_future(
            Injector(random.Random(args.seed), workers, server, url, journal, stats).run(
                stop_faults
            )
        )
        producer = asyncio.ensure_future(produce(app, args, journal, stats))
        try:
            await asyncio.wait([producer, injector], return_when=asyncio.FIRST_COMPLETED)
            if injector.done():
                injector.result()  # the injector only ends early by raising
            await producer
            stop_faults.set()
            await injector
            journal.say("faults stopped; waiting for the workers to finish")
            outcome = await drain(app, url, journal, stats)
        finally:
            for running in (producer, injector, supervisor):
                running.cancel()
            await asyncio.gather(producer, injector, supervisor, return_exceptions=True)
        for worker in workers.all:
            await worker.lock.acquire()  # for good: nobody starts it again
            if not await workers.wait_listening(worker):
                journal.say(f"worker {worker.index} is not listening yet; stopping it anyway")
            waited = await workers.terminate(worker)
            stats.final_stops[str(worker.index)] = waited
            journal.say(
                f"final SIGTERM: worker {worker.index} "
                + ("did NOT exit within 15 s" if waited is None else f"exited in {waited:.1f} s")
            )
    finally:
        with contextlib.suppress(Exception):
            await app.broker.shutdown()
    return outcome, scan_logs(workers.logs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to produce")
    parser.add_argument("--seed", type=int, default=None, help="fault schedule seed")
    parser.add_argument("--tasks-per-second", type=float, default=50.0)
    parser.add_argument(
        "--url",
        default=None,
        help="use this Redis: no Redis restart fault, but CLIENT KILL and CLIENT PAUSE hit all "
        "of its clients",
    )
    args = parser.parse_args()
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1, 10**6)
    if args.tasks_per_second <= 0 or args.seconds <= 0:
        parser.error("--seconds and --tasks-per-second must be positive")
    run = f"{datetime.datetime.now():%Y%m%d-%H%M%S}-s{args.seed}"
    run_dir = RUNS_DIR / run
    run_dir.mkdir(parents=True)
    ignore = RUNS_DIR / ".gitignore"
    if not ignore.exists():
        ignore.write_text("*\n")
    journal = Journal(run_dir / "chaos.log")
    stats = Stats()
    env = dict(os.environ)
    folder = Path(tempfile.mkdtemp(prefix="taskiq-redis-chaos-"))
    server = None if args.url else RedisServer(folder, run_dir / "redis.log")
    url = args.url or (server.url if server else "")
    env.update(
        CHAOS_REDIS_URL=url,
        CHAOS_QUEUE=f"chaos-{run}",
        CHAOS_RUN=run,
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    workers = Workers(run_dir, env, journal, stats)

    def terminated(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminated)
    journal.say(
        f"chaos run {run}: {args.seconds} s, seed {args.seed}, {args.tasks_per_second} tasks/s, "
        f"{'redis ' + args.url if args.url else 'private redis-server'}; folder {run_dir}"
    )
    try:
        outcome, scan = asyncio.run(soak(args, run, run_dir, journal, stats, workers, server, url))
    except KeyboardInterrupt:
        journal.say("interrupted; cleaning up")
        return 130
    finally:
        workers.kill_all_now()
        if server is not None:
            server.kill_now()
        shutil.rmtree(folder, ignore_errors=True)
    lines, data, ok = report_lines(args, stats, outcome, scan, run_dir)
    print()
    for line in lines:
        journal.say(line)
    if scan.notices:
        journal.say("library and taskiq warnings and errors in the worker logs:")
        for notice, count in scan.notices.most_common(15):
            journal.say(f"  {count} x {notice}")
    for title, numbers in (
        ("lost", data["lost"]),
        ("ran more than once", data["ran_more_than_once_n"]),
        ("result missing", data["results_missing"]),
    ):
        for n in numbers[:10]:
            runs = data["task_runs"][str(n)]
            journal.say(
                f"{title}: record({n}) task {runs['task_id']}, {runs['runs_counted']} runs "
                f"counted, executions logged: {'; '.join(runs['executions']) or 'none'}"
            )
    if scan.kinds:
        journal.say("tracebacks by logged message -> exception:")
        for kind, count in scan.kinds.most_common():
            journal.say(f"  {count} x {kind}")
    if scan.first is not None:
        stamp, log, index, log_lines = scan.first
        start = max(0, index - EXCERPT_BEFORE)
        excerpt = log_lines[start : index + EXCERPT_AFTER]
        journal.say(f"first traceback: {log.name} line {index + 1} ({stamp or 'no timestamp'}):")
        for line in excerpt:
            print(f"    {line}")
        data["first_traceback"] = {"log": log.name, "line": index + 1, "excerpt": excerpt}
    (run_dir / "report.json").write_text(json.dumps(data, indent=2) + "\n")
    journal.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
