"""The main job: a real ``taskiq worker`` and a producer, against Redis.

Uses ``REDIS_URL`` when set; otherwise starts a throwaway ``redis-server`` on a free loopback
port and stops it at the end. Prints each result and a one-line summary; exits non-zero if any
task did not come back right.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TASKS = int(os.environ.get("TASKS", "20"))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def local_redis() -> Iterator[str]:
    """A private redis-server for this run, so the example never touches a real deployment."""
    if not shutil.which("redis-server"):
        sys.exit("error: redis-server is not installed (Debian: apt-get install redis-server)")
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="taskiq-redis-example-") as folder:
        server = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--dir",
                folder,
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        sys.exit("error: redis-server did not start")
                    time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}"
        finally:
            server.terminate()
            server.wait(10)


async def produce() -> int:
    """Send TASKS additions through the broker and check every result."""
    from examples.app import add, broker

    await broker.startup()
    try:
        started = time.perf_counter()
        sent = [await add.kiq(number, number) for number in range(TASKS)]
        wrong = 0
        for number, task in enumerate(sent):
            result = await task.wait_result(timeout=30)
            ok = not result.is_err and result.return_value == 2 * number
            wrong += not ok
            print(f"add({number}, {number}) = {result.return_value}{'' if ok else '  WRONG'}")
        elapsed = time.perf_counter() - started
        print(f"{TASKS - wrong}/{TASKS} tasks done right in {elapsed:.2f} s")
        return 1 if wrong else 0
    finally:
        await broker.shutdown()


def main() -> int:
    """Start the worker, run the producer, stop the worker (and the private Redis, if any)."""
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    given = os.environ.get("REDIS_URL")
    with nullcontext(given) if given else local_redis() as url:
        os.environ["REDIS_URL"] = url
        print(f"redis: {url}")
        worker = subprocess.Popen(
            [sys.executable, "-m", "taskiq", "worker", "examples.app:broker", "--workers", "1"],
            env=os.environ.copy(),
        )
        try:
            return asyncio.run(produce())
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(15)
            except subprocess.TimeoutExpired:
                worker.kill()


if __name__ == "__main__":
    sys.exit(main())
