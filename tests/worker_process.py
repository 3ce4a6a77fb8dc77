"""A real ``taskiq worker`` process, for the tests that only a real worker can answer.

How a worker stops on SIGTERM, or what its messages become when it is killed, depends on
taskiq's receiver, its process manager and signal handlers, none of which an in-process test
runs. So these tests start the real command line against an app module and watch its log.

Usage::

    from tests.worker_process import WorkerProcess, worker_config

    # tests/apps/my_app.py builds its broker from the config the test passes:
    #     broker = ListQueueBroker(**worker_config())

    with WorkerProcess("tests.apps.my_app:broker", config={"url": url}) as worker:
        worker.wait_ready()                   # the log says "Listening started."
        worker.wait_for_line("some marker")   # anything the app or a task logs
        seconds = worker.stop(signal.SIGTERM) # signal, then seconds until every process exited
    assert seconds < 5, worker.output()

- ``config``: any JSON-able dict, handed to the app through the environment; the app module
  reads it back with :func:`worker_config` (a tuple arrives as a list).
- ``args``: more ``taskiq worker`` arguments (e.g. ``["--max-async-tasks", "1"]``); by default
  one worker process runs (``--workers 1``) and the log level is INFO.
- ``wait_ready()`` / ``wait_for_line(text, count=1)``: wait until the log holds ``text``
  (``count`` times); they raise ``WorkerProcessError`` with the log if the worker exits first
  or ``timeout`` (seconds) passes.
- ``stop(sig)``: send ``sig`` to the ``taskiq worker`` main process (which forwards a stop to
  its worker processes, as in production) and return the seconds until the whole process group
  is gone; ``WorkerProcessError`` if it is still there after ``timeout``.
- ``kill()``: SIGKILL the whole process group at once (a crashed or OOM-killed worker).
- Leaving the ``with`` block kills whatever is still running, so no test leaks processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

CONFIG_ENV = "TASKIQ_REDIS_TEST_WORKER_CONFIG"
READY_LINE = "Listening started."
ROOT = Path(__file__).resolve().parent.parent
_POLL = 0.02


class WorkerProcessError(AssertionError):
    """The worker did not do what the test waited for; the message carries its log."""


def worker_config() -> dict[str, Any]:
    """The config the test gave :class:`WorkerProcess`, read inside the app module."""
    config: dict[str, Any] = json.loads(os.environ.get(CONFIG_ENV, "{}"))
    return config


class WorkerProcess:
    """``python -m taskiq worker <app>`` in its own process group, logging to a file."""

    def __init__(
        self,
        app: str,
        config: dict[str, Any] | None = None,
        args: Sequence[str] = (),
    ) -> None:
        self.app = app
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115 (closed in close())
            prefix="taskiq-worker-", suffix=".log", delete=False
        )
        env = dict(os.environ)
        env[CONFIG_ENV] = json.dumps(config or {})
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        command = [sys.executable, "-m", "taskiq", "worker", app, "--workers", "1", *args]
        self.proc = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        """Everything the worker logged so far."""
        return Path(self._log.name).read_text(errors="replace")

    def wait_for_line(self, text: str, count: int = 1, timeout: float = 30.0) -> None:
        """Wait until ``text`` appears ``count`` times in the log."""
        deadline = time.monotonic() + timeout
        while self.output().count(text) < count:
            if self.proc.poll() is not None:
                raise WorkerProcessError(
                    f"worker {self.app} exited with {self.proc.returncode} before logging "
                    f"{text!r}; log:\n{self.output()}"
                )
            if time.monotonic() > deadline:
                raise WorkerProcessError(
                    f"worker {self.app} did not log {text!r} within {timeout}s; "
                    f"log:\n{self.output()}"
                )
            time.sleep(_POLL)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until the worker's broker started up and taskiq began listening."""
        self.wait_for_line(READY_LINE, timeout=timeout)

    def _group_alive(self) -> bool:
        """Whether a live (not zombie) process of the worker's process group remains.

        Orphaned worker processes are reaped by whatever PID 1 is, which in a container may
        never happen, so a zombie counts as gone.
        """
        self.proc.poll()
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[0] != "Z" and int(fields[2]) == self.proc.pid:
                return True
        return False

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> float:
        """Send ``sig`` to the main process; seconds until its whole process group exited."""
        sent = time.monotonic()
        self.proc.send_signal(sig)
        while self._group_alive():
            waited = time.monotonic() - sent
            if waited > timeout:
                raise WorkerProcessError(
                    f"worker {self.app} still running {waited:.1f}s after signal {sig}; "
                    f"log:\n{self.output()}"
                )
            time.sleep(_POLL)
        return time.monotonic() - sent

    def kill(self) -> None:
        """SIGKILL every process of the worker at once, and reap the main one."""
        if self._group_alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        while self._group_alive():
            time.sleep(_POLL)

    def close(self) -> None:
        """Kill what still runs and remove the log file."""
        try:
            self.kill()
        finally:
            self._log.close()
            Path(self._log.name).unlink(missing_ok=True)

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
