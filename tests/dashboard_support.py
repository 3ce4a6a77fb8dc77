"""Running the dashboard for tests: the real command line, or an application that mounts it.

Both run as processes of their own, on a free port of loopback, as an operator runs them; the
tests reach them over HTTP (httpx) or through a real headless Chromium (selenium).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from tests.servers import Topology

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def server_args(topology: Topology) -> list[str]:
    """The command line's options for reaching ``topology``."""
    if topology.name == "sentinel":
        host, port = topology.sentinels[0]
        return ["--sentinel", f"{host}:{port}", "--master-name", topology.master_name]
    return ["--url", topology.url]


def app_options(topology: Topology) -> dict[str, Any]:
    """``create_app`` keyword arguments for reaching ``topology``."""
    if topology.name == "sentinel":
        return {"sentinels": list(topology.sentinels), "master_name": topology.master_name}
    return {"url": topology.url}


class DashboardProcess:
    """``taskiq-redis dashboard`` (or ``uvicorn`` serving ``tests/apps/mounted_dashboard``).

    ``url`` is where the dashboard answers (``/tasks`` included when mounted). Leaving the
    ``with`` block stops the process (SIGTERM, then SIGKILL), so no test leaks one.
    """

    def __init__(self, command: Sequence[str], url: str, env: dict[str, str] | None = None):
        self.command = list(command)
        self.url = url
        self.env = {**os.environ, **(env or {})}
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed by __exit__)
        self.process: subprocess.Popen[bytes] | None = None

    @classmethod
    def cli(cls, topology: Topology, *args: str) -> DashboardProcess:
        port = free_port()
        command = [sys.executable, "-m", "taskiq_redis", "dashboard", *server_args(topology)]
        return cls([*command, "--port", str(port), *args], f"http://127.0.0.1:{port}")

    @classmethod
    def mounted(cls, options: dict[str, Any]) -> DashboardProcess:
        port = free_port()
        command = [sys.executable, "-m", "uvicorn", "tests.apps.mounted_dashboard:app"]
        return cls(
            [*command, "--host", "127.0.0.1", "--port", str(port)],
            f"http://127.0.0.1:{port}/tasks",
            {"TASKIQ_REDIS_DASHBOARD_OPTIONS": json.dumps(options)},
        )

    def __enter__(self) -> DashboardProcess:
        self.process = subprocess.Popen(
            self.command, cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the dashboard exited: {self.output()}")
            try:
                httpx.get(self.url + "/metrics", timeout=5)
            except httpx.TransportError:
                time.sleep(0.1)
                continue
            return self
        raise RuntimeError(f"the dashboard did not answer in 30 s: {self.output()}")

    def __exit__(self, *exc_info: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.log.close()

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")
