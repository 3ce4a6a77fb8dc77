"""Worker script: times one side's operations and prints the figures as JSON.

Ours and taskiq-redis 1.2.4 both import as ``taskiq_redis``, so each side runs
this file in its own interpreter; the ``redis-py`` side issues the bare Redis
commands each operation needs, which is the floor any package can reach.
``taskiq_redis`` is only reached through ``getattr`` so that a class our
package does not have yet turns into "n/a" instead of an import error, and so
that mypy checks this file the same way whichever package is installed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import inspect
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import redis.asyncio as aioredis
from taskiq import AckableMessage, AsyncBroker, AsyncResultBackend, TaskiqResult
from taskiq.exceptions import TaskiqResultTimeoutError
from taskiq.message import BrokerMessage, TaskiqMessage
from taskiq.serializers import PickleSerializer

BENCH_DIR = Path(__file__).resolve().parent
QUEUE = "bench"
GROUP = "taskiq"
WARMUP = 100  # calls made before the clock starts, so pools hold their connections
OP_TIMEOUT = 180.0  # a hung implementation must not hang the whole run
STOP_GRACE = 3.0  # seconds a taskiq worker gets to exit after SIGINT
E2E_WINDOW = 1000  # tasks in flight at most: measures steady state, not a backlog
E2E_CLIENTS = 10  # concurrent kickers and result checkers on the client side
E2E_POLL = 0.05  # seconds between is_result_ready polls: polling must not starve the worker

Call = Callable[[int], Awaitable[object]]
Factory = Callable[[str, int], AbstractAsyncContextManager[Call]]
T = TypeVar("T")


class Unavailable(Exception):
    """The side lacks what the operation needs: reported as n/a, never as a figure."""


def pkg_class(name: str) -> Callable[..., Any]:
    """Look the class up at run time, so a half-written package still runs the rest."""
    try:
        module = importlib.import_module("taskiq_redis")
    except Exception as exc:
        raise Unavailable(f"import taskiq_redis: {exc!r}") from exc
    cls = getattr(module, name, None)
    if cls is None:
        raise Unavailable(f"taskiq_redis.{name} does not exist")
    return cls  # type: ignore[no-any-return]


async def run_calls(call: Call, start: int, count: int, concurrency: int) -> float:
    """The one timing function: ``concurrency`` tasks split calls start..start+count.

    Returns calls per second. Task k makes calls start+k, start+k+c, ...; at
    concurrency 1 that is one awaited call at a time.
    """

    async def worker(k: int) -> None:
        for i in range(start + k, start + count, concurrency):
            await call(i)

    began = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return count / (time.perf_counter() - began)


def task_messages(count: int) -> list[TaskiqMessage]:
    """Messages shaped like what ``task.kiq(i, 1)`` builds for a two-argument task."""
    return [
        TaskiqMessage(
            task_id=uuid.uuid4().hex,
            task_name="app:add",
            labels={},
            labels_types={},
            args=[i, 1],
            kwargs={},
        )
        for i in range(count)
    ]


def task_results(count: int) -> list[TaskiqResult[int]]:
    """Results shaped like what the taskiq receiver stores after a task returns."""
    return [
        TaskiqResult(is_err=False, log=None, return_value=i, execution_time=0.001)
        for i in range(count)
    ]


def raw_payloads(count: int) -> list[bytes]:
    """Bytes of the size the packages send, for the bare-command side."""
    return [m.model_dump_json().encode() for m in task_messages(count)]


def raw_results(count: int) -> list[bytes]:
    """Result bytes as a pickle-serialising backend stores them."""
    serializer = PickleSerializer()
    return [serializer.dumpb(r.model_dump(mode="json")) for r in task_results(count)]


def consumer(source: AsyncIterator[T], ack: Callable[[T], Awaitable[object]]) -> Call:
    """Turn one message iterator into a call: take the next message, then ack it.

    An async generator cannot be advanced by two tasks at once, so taking is
    serialised by a lock; acks run outside it and so overlap at concurrency 50,
    which is how a taskiq worker uses a broker (one listen(), many tasks).
    """
    lock = asyncio.Lock()

    async def call(_: int) -> None:
        async with lock:
            item = await anext(source)
        await ack(item)

    return call


async def ack_message(message: bytes | AckableMessage) -> None:
    """Ack the way the taskiq receiver does: ack() may or may not be awaitable."""
    if isinstance(message, AckableMessage):
        outcome = message.ack()
        if inspect.isawaitable(outcome):
            await outcome


@asynccontextmanager
async def started(broker: AsyncBroker) -> AsyncIterator[AsyncBroker]:
    """Startup/shutdown around a broker used as a client."""
    await broker.startup()
    try:
        yield broker
    finally:
        await broker.shutdown()


@asynccontextmanager
async def package_broker(cls_name: str, url: str) -> AsyncIterator[AsyncBroker]:
    """A started broker of this side's package, with default options."""
    broker: AsyncBroker = pkg_class(cls_name)(url, queue_name=QUEUE)
    async with started(broker):
        yield broker


@asynccontextmanager
async def package_backend(url: str, **options: Any) -> AsyncIterator[AsyncResultBackend[Any]]:
    """A started result backend of this side's package."""
    backend: AsyncResultBackend[Any] = pkg_class("RedisAsyncResultBackend")(url, **options)
    await backend.startup()
    try:
        yield backend
    finally:
        await backend.shutdown()


@asynccontextmanager
async def raw_client(url: str) -> AsyncIterator[aioredis.Redis]:
    """One plain redis.asyncio client shared by all tasks, as the brokers share a pool."""
    client = aioredis.Redis.from_url(url)
    try:
        yield client
    finally:
        await client.aclose()


def broker_messages(broker: AsyncBroker, count: int) -> list[BrokerMessage]:
    """BrokerMessages made by the broker's own formatter, as ``kiq`` makes them."""
    return [broker.formatter.dumps(m) for m in task_messages(count)]


@asynccontextmanager
async def kick_op(cls_name: str, url: str, count: int) -> AsyncIterator[Call]:
    async with package_broker(cls_name, url) as broker:
        messages = broker_messages(broker, count)
        yield lambda i: broker.kick(messages[i])


@asynccontextmanager
async def receive_op(cls_name: str, url: str, count: int) -> AsyncIterator[Call]:
    """Pre-load ``count`` messages with the broker's own kick, then consume via listen().

    A figure only counts if exactly the kicked payloads came back.
    """
    async with package_broker(cls_name, url) as broker:
        messages = broker_messages(broker, count)
        await run_calls(lambda i: broker.kick(messages[i]), 0, count, 50)
        received: list[bytes] = []

        async def take(message: bytes | AckableMessage) -> None:
            received.append(message.data if isinstance(message, AckableMessage) else message)
            await ack_message(message)

        source = broker.listen()
        try:
            yield consumer(source, take)
        finally:
            await source.aclose()
        if sorted(received) != sorted(m.message for m in messages):
            raise RuntimeError("listen() did not yield exactly the kicked messages")


@asynccontextmanager
async def result_set(url: str, count: int) -> AsyncIterator[Call]:
    async with package_backend(url) as backend:
        results = task_results(count)
        ids = [uuid.uuid4().hex for _ in range(count)]
        yield lambda i: backend.set_result(ids[i], results[i])


@asynccontextmanager
async def result_getdel(url: str, count: int) -> AsyncIterator[Call]:
    async with package_backend(url, keep_results=False) as backend:
        results = task_results(count)
        ids = [uuid.uuid4().hex for _ in range(count)]
        await run_calls(lambda i: backend.set_result(ids[i], results[i]), 0, count, 50)

        async def get(i: int) -> None:
            if (await backend.get_result(ids[i])).return_value != i:
                raise RuntimeError(f"result {i} came back wrong")

        yield get


@asynccontextmanager
async def raw_list_kick(url: str, count: int) -> AsyncIterator[Call]:
    async with raw_client(url) as client:
        payloads = raw_payloads(count)
        yield lambda i: client.lpush(QUEUE, payloads[i])


async def raw_list_source(client: aioredis.Redis) -> AsyncGenerator[bytes, None]:
    """What a list broker's listen() must do at least: one BRPOP per message."""
    while True:
        popped: Any = await client.brpop([QUEUE])
        if popped is not None:
            yield popped[1]


async def raw_no_ack(_: object) -> None:
    """A list message needs no ack."""


@asynccontextmanager
async def raw_list_receive(url: str, count: int) -> AsyncIterator[Call]:
    async with raw_client(url) as client:
        payloads = raw_payloads(count)
        await run_calls(lambda i: client.lpush(QUEUE, payloads[i]), 0, count, 50)
        source = raw_list_source(client)
        try:
            yield consumer(source, raw_no_ack)
        finally:
            await source.aclose()


@asynccontextmanager
async def raw_stream_kick(url: str, count: int) -> AsyncIterator[Call]:
    async with raw_client(url) as client:
        payloads = raw_payloads(count)
        yield lambda i: client.xadd(QUEUE, {b"data": payloads[i]})


async def raw_stream_source(client: aioredis.Redis) -> AsyncGenerator[bytes, None]:
    """XREADGROUP in batches of 100, the packages' default ``xread_count``."""
    while True:
        reply: Any = await client.xreadgroup(GROUP, "bench", {QUEUE: ">"}, count=100, block=2000)
        for _stream, entries in reply or []:
            for entry_id, _fields in entries:
                yield entry_id


@asynccontextmanager
async def raw_stream_receive(url: str, count: int) -> AsyncIterator[Call]:
    async with raw_client(url) as client:
        payloads = raw_payloads(count)
        await client.xgroup_create(QUEUE, GROUP, id="$", mkstream=True)
        await run_calls(lambda i: client.xadd(QUEUE, {b"data": payloads[i]}), 0, count, 50)
        source = raw_stream_source(client)

        async def xack(entry_id: bytes) -> object:
            return await client.xack(QUEUE, GROUP, entry_id)

        try:
            yield consumer(source, xack)
        finally:
            await source.aclose()


@asynccontextmanager
async def raw_result_set(url: str, count: int) -> AsyncIterator[Call]:
    async with raw_client(url) as client:
        values = raw_results(count)
        ids = [uuid.uuid4().hex for _ in range(count)]
        yield lambda i: client.set(ids[i], values[i])


@asynccontextmanager
async def raw_result_getdel(url: str, count: int) -> AsyncIterator[Call]:
    async with raw_client(url) as client:
        values = raw_results(count)
        ids = [uuid.uuid4().hex for _ in range(count)]
        await run_calls(lambda i: client.set(ids[i], values[i]), 0, count, 50)
        yield lambda i: client.getdel(ids[i])


# operation -> (what the packages run, what the redis-py side runs)
OPERATIONS: dict[str, tuple[Factory, Factory]] = {
    "list kick": (partial(kick_op, "ListQueueBroker"), raw_list_kick),
    "list receive": (partial(receive_op, "ListQueueBroker"), raw_list_receive),
    "stream kick": (partial(kick_op, "RedisStreamBroker"), raw_stream_kick),
    "stream receive+ack": (partial(receive_op, "RedisStreamBroker"), raw_stream_receive),
    "result set": (result_set, raw_result_set),
    "result get+del": (result_getdel, raw_result_getdel),
}
CONCURRENCIES = (1, 50)


async def flushall(url: str) -> None:
    async with raw_client(url) as client:
        await client.flushall()


async def redis_cpu_seconds(url: str) -> float:
    """CPU time the Redis server has used so far (INFO cpu: user + system)."""
    async with raw_client(url) as client:
        info = await client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def measure(factory: Factory, url: str, n: int, concurrency: int) -> dict[str, Any]:
    """Warm up at the same concurrency, then time n calls; and Redis's own CPU per call.

    Redis's CPU is what the server spent while the n calls were timed: fewer, larger round trips
    save it a read and a write per command, which a shared Redis serving many workers feels.
    (What a call leaves for later, such as the queued acks of this package's stream broker,
    is not in it.)
    """
    await flushall(url)
    async with factory(url, WARMUP + n) as call:
        await run_calls(call, 0, WARMUP, concurrency)
        cpu = await redis_cpu_seconds(url)
        rate = await run_calls(call, WARMUP, n, concurrency)
        cpu = await redis_cpu_seconds(url) - cpu
    return {"ops_per_s": rate, "redis_us_per_call": cpu / n * 1e6}


async def guarded(work: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """One operation's outcome: its figures, n/a with the reason, or the error."""
    began = time.perf_counter()
    try:
        outcome = await asyncio.wait_for(work, OP_TIMEOUT)
        return outcome | {"seconds": round(time.perf_counter() - began, 2)}
    except Unavailable as exc:
        return {"na": str(exc)}
    except asyncio.TimeoutError:
        return {"error": f"timed out after {OP_TIMEOUT:.0f}s"}
    except Exception as exc:
        return {"error": repr(exc)}


async def ops_per_s(factory: Factory, url: str, n: int, concurrency: int) -> dict[str, Any]:
    return await measure(factory, url, n, concurrency)


async def micro(side: str, url: str, n: int, only: str | None = None) -> dict[str, Any]:
    column = 1 if side == "redis-py" else 0
    results: dict[str, Any] = {}
    for name, factories in OPERATIONS.items():
        if only is not None and name != only:
            continue
        for concurrency in CONCURRENCIES:
            work = ops_per_s(factories[column], url, n, concurrency)
            results[f"{name}@{concurrency}"] = await guarded(work)
    return results


# ---------------------------------------------------------------- end to end


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS/VmHWM of a process in KiB (empty once it has gone)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    fields = (line.split() for line in lines if line.startswith(("VmRSS:", "VmHWM:")))
    return {parts[0].rstrip(":"): int(parts[1]) for parts in fields}


def children_of(pid: int) -> list[int]:
    """Child pids, found through /proc so no extra dependency is needed."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def start_worker(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """``taskiq worker app:broker --workers 1`` with this side's interpreter.

    It runs in bench/ (taskiq puts its cwd on sys.path), never in the repo
    root, where ``taskiq_redis`` would resolve to our package on every side.
    """
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "taskiq", "worker", "app:broker", "--workers", "1"],
            cwd=BENCH_DIR,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def stop_worker(proc: subprocess.Popen[bytes]) -> str:
    """SIGINT as Ctrl-C would send, a short grace period, then SIGKILL the tree.

    Shutdown time is not what is measured, but how the worker left is worth
    knowing, so it is returned.
    """
    pids = children_of(proc.pid)
    began = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(STOP_GRACE)
        how = f"exited {proc.returncode} after SIGINT in {time.perf_counter() - began:.1f}s"
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        how = f"still running {STOP_GRACE:.0f}s after SIGINT: killed"
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return how


@contextlib.contextmanager
def worker_process(
    env: dict[str, str], log_path: Path, exit_note: dict[str, str]
) -> Iterator[subprocess.Popen[bytes]]:
    proc = start_worker(env, log_path)
    try:
        yield proc
    finally:
        exit_note["worker_exit"] = stop_worker(proc)


async def worker_pid(proc: subprocess.Popen[bytes]) -> int:
    """The process that runs tasks: the only child of taskiq's process manager."""
    for _ in range(200):
        children = children_of(proc.pid)
        if children:
            return children[0]
        if proc.poll() is not None:
            break
        await asyncio.sleep(0.05)
    raise RuntimeError(f"taskiq worker did not start (exit code {proc.poll()})")


async def wait_ready(task: Any) -> None:
    """Kick probes until one comes back: the worker has started and is consuming.

    A probe kicked before the worker created its consumer group may never be
    read, hence a new probe every few seconds rather than one long wait.
    """
    for _ in range(20):
        handle = await task.kiq(-1, 1)
        with contextlib.suppress(TaskiqResultTimeoutError):
            await handle.wait_result(check_interval=0.01, timeout=3)
            return
    raise RuntimeError("taskiq worker never returned a probe task")


async def drive(task: Any, n: int) -> float:
    """Kick n tasks and read every result back, checking it; returns tasks/s.

    At most E2E_WINDOW tasks are in flight, so the worker's memory reflects
    steady operation rather than a queue piled up in its prefetch buffer.
    """
    window = asyncio.Semaphore(E2E_WINDOW)
    handles: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    next_index = iter(range(n))

    async def kicker() -> None:
        for i in next_index:
            await window.acquire()
            handles.put_nowait((i, await task.kiq(i, 1)))

    async def checker(count: int) -> None:
        for _ in range(count):
            i, handle = await handles.get()
            result = await handle.wait_result(check_interval=E2E_POLL, timeout=OP_TIMEOUT)
            if result.is_err or result.return_value != i + 1:
                raise RuntimeError(f"task {i}: wrong result {result!r}")
            window.release()

    shares = [len(range(k, n, E2E_CLIENTS)) for k in range(E2E_CLIENTS)]
    began = time.perf_counter()
    await asyncio.gather(
        *(kicker() for _ in range(E2E_CLIENTS)),
        *(checker(count) for count in shares),
    )
    return n / (time.perf_counter() - began)


async def sample_rss(pid: int, peak: dict[str, int], stop: asyncio.Event) -> None:
    """Keep the highest VmRSS seen; VmHWM is read as well at the end."""
    while not stop.is_set():
        rss = proc_status(pid).get("VmRSS", 0)
        peak["VmRSS"] = max(peak.get("VmRSS", 0), rss)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.2)


async def stream_leftover(url: str) -> dict[str, Any]:
    """XLEN once nothing is pending any more (acks land just after results)."""
    async with raw_client(url) as client:
        for _ in range(100):
            groups = await client.xinfo_groups(QUEUE)
            if all(group["pending"] == 0 for group in groups):
                break
            await asyncio.sleep(0.05)
        return {"xlen": await client.xlen(QUEUE), "pending": sum(g["pending"] for g in groups)}


async def end_to_end(kind: str, url: str, n: int, log_dir: Path, rss: bool) -> dict[str, Any]:
    """Tasks/s through a real worker; with ``rss`` also its memory and the stream left over."""
    await flushall(url)
    env = {**os.environ, "BENCH_REDIS_URL": url, "BENCH_QUEUE": QUEUE, "BENCH_BROKER": kind}
    env.pop("PYTHONPATH", None)
    os.environ.update(env)
    pkg_class("RedisAsyncResultBackend")  # n/a early if the side lacks a class
    pkg_class("RedisStreamBroker" if kind == "stream" else "ListQueueBroker")
    sys.modules.pop("app", None)  # it reads the environment when imported
    app = importlib.import_module("app")
    log_path = log_dir / f"worker-{kind}-{'rss' if rss else 'e2e'}.log"
    outcome: dict[str, Any] = {}
    async with started(app.broker):
        with worker_process(env, log_path, outcome) as proc:
            pid = await worker_pid(proc)
            await wait_ready(app.add)
            start = proc_status(pid)
            peak: dict[str, int] = {}
            stop = asyncio.Event()
            sampler = asyncio.create_task(sample_rss(pid, peak, stop))
            rate = await drive(app.add, n)
            stop.set()
            await sampler
            end = proc_status(pid)
    outcome |= {"tasks_per_s": rate, "tasks": n}
    if rss:
        outcome["start_rss_kib"] = start.get("VmRSS")
        outcome["peak_rss_kib"] = max(peak.get("VmRSS", 0), end.get("VmHWM", 0))
        outcome["end_rss_kib"] = end.get("VmRSS")
        outcome.update(await stream_leftover(url))
    return outcome


def side_info() -> dict[str, Any]:
    """Which taskiq_redis this interpreter really imports: sides must not mix."""
    info: dict[str, Any] = {"python": sys.executable}
    try:
        module = importlib.import_module("taskiq_redis")
        info["taskiq_redis"] = str(Path(module.__file__ or "").parent)
    except Exception as exc:
        info["taskiq_redis"] = f"not importable: {exc!r}"
    with contextlib.suppress(Exception):
        from importlib.metadata import version

        info["version"] = version("taskiq-redis")
    return info


async def main(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {"side": args.side, "info": side_info()}
    if args.mode == "micro":
        report["results"] = await micro(args.side, args.url, args.n, args.only)
    elif args.mode == "e2e":
        report["results"] = {}
        for kind in ["stream", "list"]:
            work = end_to_end(kind, args.url, args.n, args.log_dir, rss=False)
            report["results"][f"e2e {kind} broker@worker"] = await guarded(work)
    else:
        work = end_to_end("stream", args.url, args.n, args.log_dir, rss=True)
        try:
            report["results"] = {"rss": await asyncio.wait_for(work, max(OP_TIMEOUT, args.n / 50))}
        except Unavailable as exc:
            report["results"] = {"rss": {"na": str(exc)}}
    return report


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--side", required=True, choices=["ours", "1.2.4", "redis-py"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--mode", choices=["micro", "e2e", "rss"], default="micro")
    parser.add_argument("--only", choices=list(OPERATIONS), help="this operation alone")
    parser.add_argument("--log-dir", type=Path, default=BENCH_DIR.parent / ".bench")
    return parser.parse_args()


def interrupt_on_signals() -> None:
    """Ctrl-C and SIGTERM both unwind through the finally blocks that stop the worker.

    Set explicitly: a process started in the background inherits SIGINT ignored.
    """
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)


if __name__ == "__main__":
    interrupt_on_signals()
    arguments = parse_args()
    arguments.log_dir.mkdir(parents=True, exist_ok=True)
    print(json.dumps(asyncio.run(main(arguments))))
