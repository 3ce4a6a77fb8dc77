"""Real Redis servers for the test suite.

The package's behaviour lives in Lua scripts, key hashing and connection
handling, none of which a fake Redis reproduces faithfully, so every test talks
to real ``redis-server`` processes started here: a standalone server, a
three-primary cluster and a primary watched by a sentinel.

This module deliberately does not import pytest: it can be driven from a REPL
or a benchmark script as well as from ``conftest.py``.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeAlias, TypeVar, cast

import redis
import redis.asyncio
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.retry import Retry

HOST = "127.0.0.1"
MASTER_NAME = "mymaster"
# The server programs, so that the same suite runs on Valkey (valkey-server, valkey-sentinel).
SERVER_ENV = "TASKIQ_REDIS_TEST_SERVER"
SENTINEL_ENV = "TASKIQ_REDIS_TEST_SENTINEL"
CLUSTER_SLOTS = 16384
CLUSTER_SIZE = 3

TopologyName: TypeAlias = Literal["single", "cluster", "sentinel"]
TOPOLOGIES: tuple[TopologyName, ...] = ("single", "cluster", "sentinel")

AsyncRedisClient: TypeAlias = redis.asyncio.Redis | redis.asyncio.RedisCluster

# Debian packages that ship each program, so a missing one can be named precisely.
_DEBIAN_PACKAGES = {
    "redis-server": "redis-server",
    "redis-sentinel": "redis-sentinel",
    "redis-cli": "redis-tools",
    "valkey-server": "valkey-server",
    "valkey-sentinel": "valkey-sentinel",
}

_START_TIMEOUT = 15.0
_CLUSTER_TIMEOUT = 30.0
_START_ATTEMPTS = 5
_POLL_INTERVAL = 0.01
_LOG_TAIL_LINES = 40

T = TypeVar("T")


class RedisServerError(RuntimeError):
    """A test Redis server could not be started, stopped or reached."""


class MissingRedisProgramError(RedisServerError):
    """A Redis program is not installed.

    This is an error rather than a skip on purpose: a suite that silently skips
    every Redis test when Redis is absent looks green while testing nothing.
    """


class _PortClashError(RedisServerError):
    """Someone else bound the port between our probe and the server's bind."""


def find_program(name: str) -> str:
    """Locate a Redis program, failing with the install command if it is missing."""
    path = shutil.which(name)
    if path is None:
        package = _DEBIAN_PACKAGES.get(Path(name).name, Path(name).name)
        raise MissingRedisProgramError(
            f"{name!r} was not found on PATH, and the taskiq-redis tests need real Redis "
            f"servers. Install the Debian package {package!r} "
            f"(apt-get install {package})."
        )
    return path


def server_program() -> str:
    """The server program: ``$TASKIQ_REDIS_TEST_SERVER``, else ``redis-server``."""
    return find_program(os.environ.get(SERVER_ENV) or "redis-server")


def sentinel_program() -> str:
    """The sentinel program: ``$TASKIQ_REDIS_TEST_SENTINEL``, else ``redis-sentinel``."""
    return find_program(os.environ.get(SENTINEL_ENV) or "redis-sentinel")


# --------------------------------------------------------------------------- ports

_ports_lock = threading.Lock()
_ports_handed_out: set[int] = set()


def _free_ports(count: int) -> list[int]:
    """Return ``count`` distinct loopback ports that were free a moment ago.

    Every probe socket stays bound until the whole batch is chosen, which is
    what makes the ports of one batch distinct.  Ports already handed out by
    this process are never returned again, so a port left free while the
    standalone server is down for a restart cannot be given to another server.
    Another program may still grab a port before Redis binds it; the caller
    detects that from the server log and retries with fresh ports.
    """
    with _ports_lock:
        probes: list[socket.socket] = []
        ports: list[int] = []
        try:
            while len(ports) < count:
                probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                probes.append(probe)
                probe.bind((HOST, 0))
                port = int(probe.getsockname()[1])
                if port not in _ports_handed_out:
                    ports.append(port)
        finally:
            for probe in probes:
                probe.close()
        _ports_handed_out.update(ports)
        return ports


# ------------------------------------------------------------------------ watchdog

# Runs in its own session so that neither a Ctrl-C on the terminal nor a kill
# of pytest's process group takes it down together with pytest.  It learns the
# pid of every server through its stdin ("+pid" / "-pid"); when stdin reaches
# EOF while pids are still registered, the test process died without cleaning
# up (SIGKILL, os._exit from a timeout, a segfault), so it kills the servers and
# removes their directory.
_WATCHDOG_SOURCE = r"""
import os, shutil, signal, sys, time

def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False

def main():
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pids = set()
    try:
        for line in sys.stdin:
            line = line.strip()
            if line.startswith("+"):
                pids.add(int(line[1:]))
            elif line.startswith("-"):
                pids.discard(int(line[1:]))
    finally:
        if pids:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and any(alive(pid) for pid in pids):
                time.sleep(0.05)
            shutil.rmtree(sys.argv[1], ignore_errors=True)

main()
"""


class _Watchdog:
    """Kills the servers if the test process dies without running ``atexit``."""

    def __init__(self, tmpdir: Path) -> None:
        self._lock = threading.Lock()
        self._proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _WATCHDOG_SOURCE, str(tmpdir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            text=True,
        )

    def watch(self, pid: int) -> None:
        self._send(f"+{pid}")

    def forget(self, pid: int) -> None:
        self._send(f"-{pid}")

    def _send(self, line: str) -> None:
        with self._lock:
            stdin = self._proc.stdin
            if stdin is None or stdin.closed:
                return
            # A dead watchdog must not break the tests; atexit still cleans up.
            with contextlib.suppress(OSError):
                stdin.write(line + "\n")
                stdin.flush()

    def close(self) -> None:
        """Stop the watchdog; call only after every watched pid was forgotten."""
        with self._lock:
            if self._proc.stdin is not None:
                with contextlib.suppress(OSError):
                    self._proc.stdin.close()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


# ------------------------------------------------------------------ one process


def _probe_client(port: int, timeout: float) -> redis.Redis:
    """A client that fails fast: start-up polling needs an answer, not retries."""
    return redis.Redis(
        host=HOST,
        port=port,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        decode_responses=True,
    )


class _RedisProcess:
    """One ``redis-server`` or ``redis-sentinel`` with its own directory and log."""

    def __init__(
        self,
        name: str,
        program: str,
        workdir: Path,
        watchdog: _Watchdog,
        settings: Iterable[str] = (),
        cluster: bool = False,
    ) -> None:
        self.name = name
        self.program = program
        self.workdir = workdir
        self.settings = list(settings)
        self.cluster = cluster
        self.port = 0
        self.bus_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._watchdog = watchdog
        self._log_offset = 0
        self.allocate_ports()

    @property
    def config_path(self) -> Path:
        return self.workdir / "redis.conf"

    @property
    def log_path(self) -> Path:
        return self.workdir / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def allocate_ports(self) -> None:
        if self.cluster:
            # An explicit bus port: the default port+10000 may be out of range
            # or taken, and nothing checked it when the port was chosen.
            self.port, self.bus_port = _free_ports(2)
        else:
            (self.port,) = _free_ports(1)

    def _config(self) -> str:
        lines = [
            f"bind {HOST}",
            f"port {self.port}",
            "daemonize no",
            "protected-mode no",
            f'dir "{self.workdir}"',
            # Log to stdout, which goes to the log file together with stderr,
            # so that config errors printed before logging starts are kept.
            'logfile ""',
        ]
        if self.cluster:
            lines += [
                "cluster-enabled yes",
                "cluster-config-file nodes.conf",
                f"cluster-port {self.bus_port}",
                # Makes CLUSTER SLOTS report 127.0.0.1 even before a peer told
                # the node which address it is reachable on.
                f"cluster-announce-ip {HOST}",
            ]
        return "\n".join(lines + self.settings) + "\n"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self._config())
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [self.program, str(self.config_path)],
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Keeps a Ctrl-C meant for pytest from reaching the servers
                # before the fixtures had a chance to tear down in order.
                start_new_session=True,
            )
        self._watchdog.watch(self.proc.pid)

    def log_tail(self) -> str:
        """The end of what this process logged since its latest start."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_offset)
                text = log.read().decode(errors="replace")
        except OSError as exc:
            return f"<cannot read {self.log_path}: {exc}>"
        lines = text.splitlines()[-_LOG_TAIL_LINES:]
        return "\n".join(lines) if lines else "<empty log>"

    def describe(self) -> str:
        return f"{self.name} ({Path(self.program).name} on {HOST}:{self.port})"

    def _answers_ping(self) -> bool:
        assert self.proc is not None
        client = _probe_client(self.port, timeout=0.5)
        try:
            # Another program could own the port while our process is about to
            # fail its bind; only our own pid counts as "up".
            info = client.info("server")
            if info.get("process_id") != self.proc.pid:
                return False
            # Raises BusyLoadingError while the append-only file is replayed.
            return bool(client.ping())
        except (redis.RedisError, OSError):
            return False
        finally:
            client.close()

    def wait_ready(self, timeout: float = _START_TIMEOUT) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                self._watchdog.forget(self.proc.pid)
                tail = self.log_tail()
                message = (
                    f"{self.describe()} exited with code {code} while starting; "
                    f"last lines of {self.log_path}:\n{tail}"
                )
                if "Address already in use" in tail:
                    raise _PortClashError(message)
                raise RedisServerError(message)
            if self._answers_ping():
                return
            if time.monotonic() > deadline:
                raise RedisServerError(
                    f"{self.describe()} did not answer PING within {timeout:.0f}s; "
                    f"last lines of {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(_POLL_INTERVAL)

    def launch(self) -> None:
        """Start on fresh ports, moving to other ports if one was taken meanwhile."""
        for attempt in range(1, _START_ATTEMPTS + 1):
            self.start()
            try:
                self.wait_ready()
            except _PortClashError:
                if attempt == _START_ATTEMPTS:
                    raise
                self.allocate_ports()
            else:
                return

    def relaunch_same_port(self) -> None:
        """Start again on the port clients already know, for restart tests."""
        for attempt in range(1, _START_ATTEMPTS + 1):
            self.start()
            try:
                self.wait_ready()
            except _PortClashError:
                if attempt == _START_ATTEMPTS:
                    raise
                time.sleep(0.2 * attempt)
            else:
                return

    def shutdown(self) -> None:
        """Stop through SHUTDOWN so Redis flushes its append-only file first."""
        if not self.running:
            return
        assert self.proc is not None
        client = _probe_client(self.port, timeout=5)
        try:
            client.shutdown()
        except redis.RedisError:
            # SIGTERM makes Redis run the same orderly shutdown.
            self.proc.terminate()
        finally:
            client.close()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._watchdog.forget(self.proc.pid)

    def kill(self) -> None:
        """Stop at once; used at teardown, when the data is of no further use."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._watchdog.forget(self.proc.pid)


# ------------------------------------------------------------------- topologies


def _slot_ranges(nodes: int) -> list[tuple[int, int]]:
    bounds = [round(i * CLUSTER_SLOTS / nodes) for i in range(nodes + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(nodes)]


def _cluster_problem(node: _RedisProcess, expected_nodes: int, primaries: int) -> str | None:
    """Why ``node`` does not yet see a healthy cluster, or None once it does."""
    client = _probe_client(node.port, timeout=2)
    try:
        info = client.cluster("INFO")
        peers = client.cluster("NODES")
    except (redis.RedisError, OSError) as exc:
        return f"{node.describe()}: {exc!r}"
    finally:
        client.close()
    wanted = {
        "cluster_state": "ok",
        "cluster_slots_assigned": str(CLUSTER_SLOTS),
        "cluster_known_nodes": str(expected_nodes),
        "cluster_size": str(primaries),
    }
    wrong = {key: info.get(key) for key, value in wanted.items() if info.get(key) != value}
    if wrong:
        return f"{node.describe()}: CLUSTER INFO has {wrong}"
    for address, peer in peers.items():
        flags = set(peer["flags"].split(","))
        if flags & {"handshake", "noaddr", "fail", "fail?"} or not peer["connected"]:
            return f"{node.describe()}: CLUSTER NODES has {address} {peer}"
    return None


def _form_cluster(nodes: list[_RedisProcess], replicas: Sequence[_RedisProcess] = ()) -> None:
    """Join running cluster-enabled servers into a cluster; ``replicas[i]`` follows ``nodes[i]``.

    Done with plain commands instead of ``redis-cli --cluster create``, which
    polls the join only once per second and cannot be told the bus ports.
    """
    everyone = [*nodes, *replicas]
    clients = [_probe_client(node.port, timeout=5) for node in nodes]
    try:
        for epoch, (client, (first, last)) in enumerate(
            zip(clients, _slot_ranges(len(nodes)), strict=True), start=1
        ):
            client.cluster("ADDSLOTSRANGE", first, last)
            # Distinct epochs up front spare the nodes resolving a collision.
            client.cluster("SET-CONFIG-EPOCH", epoch)
        for node in everyone[1:]:
            clients[0].cluster("MEET", HOST, node.port, node.bus_port)
    finally:
        for client in clients:
            client.close()
    for primary, replica in zip(nodes, replicas, strict=False):
        _replicate_in_cluster(replica, primary)

    # A fresh primary keeps reporting cluster_state:fail for its first two
    # seconds (CLUSTER_WRITABLE_DELAY), so this wait is never instant.
    deadline = time.monotonic() + _CLUSTER_TIMEOUT
    while True:
        problems = [
            p for p in (_cluster_problem(n, len(everyone), len(nodes)) for n in everyone) if p
        ]
        problems += [p for p in (_replication_problem(r) for r in replicas) if p]
        if not problems:
            return
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {n.log_path}:\n{n.log_tail()}" for n in everyone)
            raise RedisServerError(
                f"cluster not healthy after {_CLUSTER_TIMEOUT:.0f}s: "
                + "; ".join(problems)
                + "\n"
                + logs
            )
        time.sleep(0.05)


def _node_id(node: _RedisProcess) -> str:
    client = _probe_client(node.port, timeout=5)
    try:
        return str(client.cluster("MYID"))
    finally:
        client.close()


def _replicate_in_cluster(replica: _RedisProcess, primary: _RedisProcess) -> None:
    """CLUSTER REPLICATE, once the replica has learnt of the primary through the bus."""
    primary_id = _node_id(primary)
    client = _probe_client(replica.port, timeout=5)
    deadline = time.monotonic() + _CLUSTER_TIMEOUT
    try:
        while True:
            try:
                client.cluster("REPLICATE", primary_id)
                return
            except redis.ResponseError as exc:  # "Unknown node" until the MEET spread
                if time.monotonic() > deadline:
                    raise RedisServerError(
                        f"{replica.describe()} cannot replicate {primary.describe()}: {exc}"
                    ) from exc
            time.sleep(_POLL_INTERVAL)
    finally:
        client.close()


def _replication_problem(replica: _RedisProcess) -> str | None:
    """Why ``replica`` is not yet a replica in sync with its primary, or None once it is."""
    client = _probe_client(replica.port, timeout=2)
    try:
        info = client.info("replication")
    except (redis.RedisError, OSError) as exc:
        return f"{replica.describe()}: {exc}"
    finally:
        client.close()
    if info.get("role") != "slave" or info.get("master_link_status") != "up":
        return (
            f"{replica.describe()}: role {info.get('role')}, link {info.get('master_link_status')}"
        )
    return None


def _wait_for_sentinel(sentinel: _RedisProcess, primary: _RedisProcess) -> None:
    """Wait until the sentinel has a live link to the primary.

    ``get-master-addr-by-name`` answers from the config file at once, so it is
    checked together with the master's flags, which lose ``disconnected`` only
    once the sentinel actually talks to the primary.
    """
    deadline = time.monotonic() + _START_TIMEOUT
    state = "no answer yet"
    while True:
        client = _probe_client(sentinel.port, timeout=1)
        try:
            address = client.sentinel_get_master_addr_by_name(MASTER_NAME)
            master = client.sentinel_master(MASTER_NAME)
            flags = master.get("flags") if isinstance(master, dict) else master
            state = f"address {address!r}, flags {flags!r}"
            if address == (HOST, primary.port) and flags == "master":
                return
        except (redis.RedisError, OSError) as exc:
            state = repr(exc)
        finally:
            client.close()
        if time.monotonic() > deadline:
            raise RedisServerError(
                f"{sentinel.describe()} does not report {MASTER_NAME!r} at "
                f"{HOST}:{primary.port} after {_START_TIMEOUT:.0f}s ({state}); "
                f"last lines of {sentinel.log_path}:\n{sentinel.log_tail()}"
            )
        time.sleep(_POLL_INTERVAL)


_DATA_SETTINGS = [
    'save ""',
    # Any local test may need DEBUG (e.g. DEBUG SLEEP to provoke timeouts).
    "enable-debug-command local",
]


@dataclass
class RedisServers:
    """Addresses of the running test servers, and control over their lifetime.

    Fields of a topology left out of ``start_servers(which=...)`` stay empty;
    ``topologies`` says which ones are running.
    """

    tmpdir: Path
    topologies: frozenset[TopologyName]
    standalone_url: str = ""
    cluster_url: str = ""
    cluster_ports: list[int] = field(default_factory=list)
    sentinels: list[tuple[str, int]] = field(default_factory=list)
    master_name: str = MASTER_NAME
    sentinel_primary_url: str = ""
    _watchdog: _Watchdog | None = field(default=None, repr=False)
    _processes: list[_RedisProcess] = field(default_factory=list, repr=False)
    _standalone: _RedisProcess | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _stopped: bool = field(default=False, repr=False)

    def _adopt(self, process: _RedisProcess) -> _RedisProcess:
        """Remember a process before it starts, so stop() can always reach it."""
        with self._lock:
            self._processes.append(process)
        return process

    def _standalone_process(self) -> _RedisProcess:
        if self._stopped:
            raise RedisServerError("the test servers were already stopped")
        if self._standalone is None:
            raise RedisServerError("the standalone server was not started (see which=)")
        return self._standalone

    def pids(self) -> list[int]:
        """Pids of the server processes currently running."""
        with self._lock:
            return [p.proc.pid for p in self._processes if p.proc is not None and p.running]

    def stop_standalone(self) -> None:
        """Shut the standalone server down cleanly, keeping its data on disk."""
        with self._lock:
            self._standalone_process().shutdown()

    def start_standalone(self) -> None:
        """Start the standalone server again on its port, with the data it had."""
        with self._lock:
            process = self._standalone_process()
            if not process.running:
                process.relaunch_same_port()

    def restart_standalone(self, downtime: float = 0.0) -> None:
        """Restart the standalone server, staying down for ``downtime`` seconds.

        Blocks the calling thread; from a test that needs its event loop to run
        meanwhile (to watch clients reconnect), use ``arestart_standalone``.
        """
        self.stop_standalone()
        if downtime > 0:
            time.sleep(downtime)
        self.start_standalone()

    async def arestart_standalone(self, downtime: float = 0.0) -> None:
        """``restart_standalone`` without blocking the event loop."""
        await asyncio.to_thread(self.restart_standalone, downtime)

    def stop(self) -> None:
        """Kill every server and remove the temporary directory; safe to repeat."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            for process in self._processes:
                process.kill()
            if self._watchdog is not None:
                self._watchdog.close()
        atexit.unregister(self.stop)
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def _normalise(which: Iterable[str] | None) -> frozenset[TopologyName]:
    if which is None:
        return frozenset(TOPOLOGIES)
    aliases: dict[str, TopologyName] = {name: name for name in TOPOLOGIES}
    aliases["standalone"] = "single"
    unknown = sorted(set(which) - aliases.keys())
    if unknown:
        raise ValueError(f"unknown topologies {unknown}; choose from {sorted(aliases)}")
    return frozenset(aliases[name] for name in which)


def _start_single(servers: RedisServers, watchdog: _Watchdog, server: str) -> None:
    process = servers._adopt(
        _RedisProcess(
            "standalone",
            server,
            servers.tmpdir / "standalone",
            watchdog,
            # appendfsync always: a restart, or even a kill, loses no write
            # that Redis acknowledged.
            settings=[*_DATA_SETTINGS, "appendonly yes", "appendfsync always"],
        )
    )
    process.launch()
    servers._standalone = process
    servers.standalone_url = process.url


def _start_cluster(servers: RedisServers, watchdog: _Watchdog, server: str) -> None:
    nodes = [
        servers._adopt(
            _RedisProcess(
                f"cluster-{index}",
                server,
                servers.tmpdir / f"cluster-{index}",
                watchdog,
                settings=_DATA_SETTINGS,
                cluster=True,
            )
        )
        for index in range(CLUSTER_SIZE)
    ]
    # Start all nodes before waiting for any, so their start-up overlaps.
    for node in nodes:
        node.start()
    for node in nodes:
        try:
            node.wait_ready()
        except _PortClashError:
            node.allocate_ports()
            node.launch()
    _form_cluster(nodes)
    servers.cluster_ports = [node.port for node in nodes]
    servers.cluster_url = nodes[0].url


def _start_sentinel(
    servers: RedisServers, watchdog: _Watchdog, server: str, sentinel_path: str
) -> None:
    primary = servers._adopt(
        _RedisProcess(
            "sentinel-primary",
            server,
            servers.tmpdir / "sentinel-primary",
            watchdog,
            settings=_DATA_SETTINGS,
        )
    )
    primary.launch()
    sentinel = servers._adopt(
        _RedisProcess(
            "sentinel",
            sentinel_path,
            servers.tmpdir / "sentinel",
            watchdog,
            settings=[f"sentinel monitor {MASTER_NAME} {HOST} {primary.port} 1"],
        )
    )
    sentinel.launch()
    _wait_for_sentinel(sentinel, primary)
    servers.sentinel_primary_url = primary.url
    servers.sentinels = [(HOST, sentinel.port)]


def start_servers(which: Iterable[str] | None = None) -> RedisServers:
    """Start the requested topologies (all by default) side by side.

    ``which`` takes topology names: ``"single"`` (alias ``"standalone"``),
    ``"cluster"`` and ``"sentinel"``.  The servers are killed by ``stop()``,
    at interpreter exit, and by a watchdog process if this process dies
    without either.
    """
    wanted = _normalise(which)
    server = server_program()
    sentinel = sentinel_program() if "sentinel" in wanted else ""

    tmpdir = Path(tempfile.mkdtemp(prefix="taskiq-redis-tests-"))
    watchdog = _Watchdog(tmpdir)
    servers = RedisServers(tmpdir=tmpdir, topologies=wanted, _watchdog=watchdog)
    atexit.register(servers.stop)
    try:
        with ThreadPoolExecutor(max_workers=max(len(wanted), 1)) as pool:
            futures: list[Future[None]] = []
            # The cluster is the slowest, so it goes first.
            if "cluster" in wanted:
                futures.append(pool.submit(_start_cluster, servers, watchdog, server))
            if "single" in wanted:
                futures.append(pool.submit(_start_single, servers, watchdog, server))
            if "sentinel" in wanted:
                futures.append(pool.submit(_start_sentinel, servers, watchdog, server, sentinel))
        errors = [exc for exc in (f.exception() for f in futures) if exc is not None]
        if errors:
            if len(errors) == 1:
                raise errors[0]
            raise RedisServerError(
                "several test servers failed to start:\n\n"
                + "\n\n".join(str(exc) for exc in errors)
            ) from errors[0]
    except BaseException:
        servers.stop()
        raise
    return servers


# ------------------------------------------------------------------ test view


class _SentinelMasterClient(redis.asyncio.Redis):
    """A master client that also closes the connections of its Sentinel.

    ``Sentinel.master_for`` leaves the sentinel's own connections to whoever
    holds the ``Sentinel`` object; the tests only keep the master client, so
    without this they would leak a connection per test.
    """

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        pool = self.connection_pool
        if isinstance(pool, SentinelConnectionPool):
            # Each link, not Sentinel.aclose: that came after redis-py 8.0.0.
            for link in pool.sentinel_manager.sentinels:
                await link.aclose()


@dataclass(frozen=True)
class Topology:
    """One way of deploying Redis, seen from a test.

    Tests are written once and run against every topology; the few places
    where the topologies really differ go through ``pick``.
    """

    name: TopologyName
    url: str
    sentinels: list[tuple[str, int]]
    master_name: str

    @classmethod
    def of(cls, servers: RedisServers, name: TopologyName) -> Topology:
        if name not in servers.topologies:
            raise RedisServerError(f"topology {name!r} is not running")
        url = {
            "single": servers.standalone_url,
            "cluster": servers.cluster_url,
            "sentinel": servers.sentinel_primary_url,
        }[name]
        return cls(name, url, list(servers.sentinels), servers.master_name)

    def pick(self, *, single: T, cluster: T, sentinel: T) -> T:
        return {"single": single, "cluster": cluster, "sentinel": sentinel}[self.name]

    def client(self, **options: Any) -> AsyncRedisClient:
        """A new raw client for assertions; the caller must ``aclose()`` it.

        ``options`` go to redis-py, e.g. ``decode_responses=True``.
        """
        if self.name == "single":
            return redis.asyncio.Redis.from_url(self.url, **options)
        if self.name == "cluster":
            return redis.asyncio.RedisCluster.from_url(self.url, **options)
        # redis-py leaves the Sentinel constructor unannotated.
        sentinel = redis.asyncio.Sentinel(self.sentinels)  # type: ignore[no-untyped-call,unused-ignore]
        return cast(
            redis.asyncio.Redis,
            sentinel.master_for(self.master_name, redis_class=_SentinelMasterClient, **options),
        )

    def kwargs(self, url_param: str = "url") -> dict[str, Any]:
        """Connection arguments for the package's brokers, backends and sources."""
        if self.name == "sentinel":
            return {"sentinels": list(self.sentinels), "master_name": self.master_name}
        return {url_param: self.url}


# ------------------------------------------------------- servers of a few tests only

# A replica syncs the moment it connects, instead of after the default 5 s delay.
_REPLICATION_SETTINGS = ["repl-diskless-sync yes", "repl-diskless-sync-delay 0"]
# Short enough that a failover takes a second or three, long enough that a loaded
# machine's pauses do not look like a dead server.
SENTINEL_DOWN_AFTER_MS = 1000
SENTINEL_FAILOVER_TIMEOUT_MS = 3000
CLUSTER_NODE_TIMEOUT_MS = 3000
_FAILOVER_TIMEOUT = 30.0


def _start_all(processes: Sequence[_RedisProcess]) -> None:
    """Start every process on the ports it already has (clients may know them), in parallel."""
    for process in processes:
        process.start()
    for process in processes:
        try:
            process.wait_ready()
        except _PortClashError:
            process.relaunch_same_port()


def _wait_until(problem: Any, what: str, timeout: float = _FAILOVER_TIMEOUT) -> None:
    """Poll ``problem()`` until it returns None; fail with its last answer after ``timeout``."""
    deadline = time.monotonic() + timeout
    while (reason := problem()) is not None:
        if time.monotonic() > deadline:
            raise RedisServerError(f"{what} not reached after {timeout:.0f}s: {reason}")
        time.sleep(0.02)


def _role(process: _RedisProcess) -> dict[str, Any]:
    """``INFO replication`` of a process, or ``{"role": "unreachable"}``."""
    client = _probe_client(process.port, timeout=2)
    try:
        return dict(client.info("replication"))
    except (redis.RedisError, OSError) as exc:
        return {"role": "unreachable", "error": str(exc)}
    finally:
        client.close()


class ServerGroup:
    """Servers that only some tests need, in a directory of their own, stopped by ``stop()``.

    The ports are chosen when the group is built and kept for its whole life, so a test can
    hand them to a worker before the servers run ("Redis down when the worker starts") and a
    restarted server comes back where its clients look for it.
    """

    def __init__(self, label: str) -> None:
        self.tmpdir = Path(tempfile.mkdtemp(prefix=f"taskiq-redis-{label}-"))
        self._watchdog = _Watchdog(self.tmpdir)
        self.processes: list[_RedisProcess] = []
        self._stopped = False
        atexit.register(self.stop)

    def _process(
        self, name: str, program: str, settings: Iterable[str], cluster: bool = False
    ) -> _RedisProcess:
        process = _RedisProcess(
            name, program, self.tmpdir / name, self._watchdog, settings, cluster=cluster
        )
        self.processes.append(process)
        return process

    def start(self) -> None:
        """Start the servers on the ports chosen when the group was built."""
        raise NotImplementedError

    def topology(self) -> Topology:
        """How the package's classes and the test clients reach these servers."""
        raise NotImplementedError

    def stop(self) -> None:
        """Kill every server and remove the directory; safe to repeat."""
        if self._stopped:
            return
        self._stopped = True
        for process in self.processes:
            process.kill()
        self._watchdog.close()
        atexit.unregister(self.stop)
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def __enter__(self: T) -> T:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class StandaloneServer(ServerGroup):
    """One server without persistence: a restart brings it back empty."""

    def __init__(self, settings: Iterable[str] = ()) -> None:
        super().__init__("standalone")
        self.server = self._process("server", server_program(), [*_DATA_SETTINGS, *settings])

    @property
    def url(self) -> str:
        return self.server.url

    def topology(self) -> Topology:
        return Topology("single", self.url, [], MASTER_NAME)

    def start(self) -> None:
        self.server.relaunch_same_port()

    def kill(self) -> None:
        """kill -9: the data is gone with the process."""
        self.server.kill()

    def restart_empty(self) -> None:
        """kill -9, then start again on the same port, without any of the data it had."""
        self.kill()
        self.start()


class SentinelGroup(ServerGroup):
    """A primary, optionally one replica, and a sentinel (quorum 1) that fails over in seconds."""

    def __init__(self, replica: bool = True) -> None:
        super().__init__("sentinel")
        server = server_program()
        first = self._process("node-a", server, [*_DATA_SETTINGS, *_REPLICATION_SETTINGS])
        self.nodes = [first]
        if replica:
            self.nodes.append(
                self._process(
                    "node-b",
                    server,
                    [*_DATA_SETTINGS, *_REPLICATION_SETTINGS, f"replicaof {HOST} {first.port}"],
                )
            )
        self.sentinel = self._process(
            "sentinel",
            sentinel_program(),
            [
                f"sentinel monitor {MASTER_NAME} {HOST} {first.port} 1",
                f"sentinel down-after-milliseconds {MASTER_NAME} {SENTINEL_DOWN_AFTER_MS}",
                f"sentinel failover-timeout {MASTER_NAME} {SENTINEL_FAILOVER_TIMEOUT_MS}",
            ],
        )

    @property
    def sentinels(self) -> list[tuple[str, int]]:
        return [(HOST, self.sentinel.port)]

    def topology(self) -> Topology:
        return Topology("sentinel", self.nodes[0].url, self.sentinels, MASTER_NAME)

    def start(self) -> None:
        """Start the data nodes, wait for the replica's sync, then the sentinel.

        The sentinel starts last so that its first INFO of the primary already lists the
        replica: otherwise it would learn of it only at its next INFO, ten seconds later.
        """
        _start_all(self.nodes)
        for replica in self.nodes[1:]:
            _wait_until(lambda r=replica: _replication_problem(r), "replica in sync")
        _start_all([self.sentinel])
        _wait_for_sentinel(self.sentinel, self.nodes[0])
        _wait_until(self._replica_problem, "sentinel knows the replica")

    def _ask_sentinel(self, *args: Any) -> Any:
        client = _probe_client(self.sentinel.port, timeout=2)
        try:
            return client.execute_command(*args)  # type: ignore[no-untyped-call]
        finally:
            client.close()

    def named_primary(self) -> _RedisProcess:
        """The node the sentinel names as primary now."""
        host, port = self._ask_sentinel("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
        for node in self.nodes:
            if (HOST, node.port) == (host, int(port)):
                return node
        raise RedisServerError(f"the sentinel names {host}:{port}, which is none of ours")

    def _replica_problem(self) -> str | None:
        """Why the sentinel would not promote the replica yet, or None."""
        primary = self.named_primary()
        wanted = [n.port for n in self.nodes if n is not primary and n.running]
        replicas = self._ask_sentinel("SENTINEL", "REPLICAS", MASTER_NAME)
        ready = []
        for fields in replicas:
            entry = (
                fields
                if isinstance(fields, dict)
                else dict(zip(fields[::2], fields[1::2], strict=True))
            )
            if entry["flags"] == "slave" and entry["master-link-status"] == "ok":
                ready.append(int(entry["port"]))
        if sorted(ready) != sorted(wanted):
            return f"sentinel sees replicas {replicas}, wants {wanted} ready"
        return None

    def _named_problem(self, primary: _RedisProcess) -> str | None:
        """Why ``primary`` is not yet named by the sentinel and serving as a primary, or None."""
        named = self.named_primary()
        if named is not primary:
            return f"sentinel names {named.describe()}"
        if (role := _role(primary))["role"] != "master":
            return f"{primary.describe()} has role {role}"
        return None

    def _demoted_problem(self, primary: _RedisProcess) -> str | None:
        """Why not every other running node is a replica of ``primary`` yet, or None."""
        for node in self.nodes:
            if node is primary or not node.running:
                continue
            role = _role(node)
            if role["role"] != "slave" or int(role.get("master_port", 0)) != primary.port:
                return f"{node.describe()} has role {role}"
        return None

    def failover(self) -> _RedisProcess:
        """SENTINEL FAILOVER; returns the new primary once the sentinel names it and it serves.

        The old primary still serves as a primary for several seconds after that, until the
        sentinel demotes it (it waits about 8 s before it converts a node that reports the
        wrong role); :meth:`wait_demoted` waits for that.
        """
        old = self.named_primary()
        (new,) = [n for n in self.nodes if n is not old]
        self._ask_sentinel("SENTINEL", "FAILOVER", MASTER_NAME)
        _wait_until(lambda: self._named_problem(new), "sentinel failover")
        return new

    def wait_demoted(self) -> None:
        """Wait until every other running node is a replica of the named primary."""
        primary = self.named_primary()
        _wait_until(lambda: self._demoted_problem(primary), "old primary demoted")

    def kill_primary(self) -> _RedisProcess:
        """kill -9 of the primary; returns the replica once the sentinel named it and it serves."""
        old = self.named_primary()
        (new,) = [n for n in self.nodes if n is not old]
        old.kill()
        _wait_until(lambda: self._named_problem(new), "failover after kill -9")
        return new


class ClusterGroup(ServerGroup):
    """Three primaries, optionally one replica each, with a short ``cluster-node-timeout``."""

    def __init__(self, replicas: bool = True) -> None:
        super().__init__("cluster")
        server = server_program()
        settings = [
            *_DATA_SETTINGS,
            *_REPLICATION_SETTINGS,
            f"cluster-node-timeout {CLUSTER_NODE_TIMEOUT_MS}",
            # The layout stays the one the tests built: no replica wanders to another primary.
            "cluster-allow-replica-migration no",
        ]
        self.primaries = [
            self._process(f"primary-{i}", server, settings, cluster=True)
            for i in range(CLUSTER_SIZE)
        ]
        self.replicas = (
            [
                self._process(f"replica-{i}", server, settings, cluster=True)
                for i in range(CLUSTER_SIZE)
            ]
            if replicas
            else []
        )

    @property
    def url(self) -> str:
        return self.primaries[0].url

    def topology(self) -> Topology:
        return Topology("cluster", self.url, [], MASTER_NAME)

    def start(self) -> None:
        _start_all(self.processes)
        _form_cluster(self.primaries, self.replicas)

    def _nodes(self, via: _RedisProcess) -> dict[int, dict[str, Any]]:
        """CLUSTER NODES as ``via`` sees it, by port."""
        client = _probe_client(via.port, timeout=2)
        try:
            nodes = client.cluster("NODES")
        finally:
            client.close()
        return {int(address.rsplit(":", 1)[1]): peer for address, peer in nodes.items()}

    def primary_for(self, key: str) -> _RedisProcess:
        """The node that serves ``key`` now."""
        slot = redis.crc.key_slot(key.encode())
        for port, peer in self._nodes(self.processes[0]).items():
            if "master" not in peer["flags"]:
                continue
            for first, *last in peer["slots"]:
                if int(first) <= slot <= int(last[0] if last else first):
                    return self._by_port(port)
        raise RedisServerError(f"no primary serves slot {slot}")

    def serving(self) -> list[_RedisProcess]:
        """The primaries now."""
        peers = self._nodes(self.processes[0])
        return [self._by_port(port) for port, peer in peers.items() if "master" in peer["flags"]]

    def replica_of(self, primary: _RedisProcess) -> _RedisProcess:
        primary_id = _node_id(primary)
        for port, peer in self._nodes(primary).items():
            if peer["master_id"] == primary_id:
                return self._by_port(port)
        raise RedisServerError(f"{primary.describe()} has no replica")

    def _by_port(self, port: int) -> _RedisProcess:
        (process,) = [p for p in self.processes if p.port == port]
        return process

    def _roles_problem(self, primary: _RedisProcess, replica: _RedisProcess) -> str | None:
        """Why not every node sees ``primary`` serving with ``replica`` in sync, or None."""
        primary_id = _node_id(primary)
        for node in self.processes:
            peers = self._nodes(node)
            if "master" not in peers[primary.port]["flags"]:
                return f"{node.describe()} sees {primary.describe()} as {peers[primary.port]}"
            if peers[replica.port]["master_id"] != primary_id:
                return f"{node.describe()} sees {replica.describe()} as {peers[replica.port]}"
            problem = _cluster_problem(node, len(self.processes), len(self.primaries))
            if problem is not None:
                return problem
        return _replication_problem(replica)

    def failover(self, replica: _RedisProcess) -> None:
        """CLUSTER FAILOVER on ``replica``; returns once every node sees the swapped roles."""
        old = self._by_port(
            next(
                port
                for port, peer in self._nodes(replica).items()
                if peer["node_id"] == self._nodes(replica)[replica.port]["master_id"]
            )
        )
        client = _probe_client(replica.port, timeout=5)
        try:
            client.cluster("FAILOVER")
        finally:
            client.close()
        _wait_until(lambda: self._roles_problem(replica, old), "cluster failover")

    def wait_healthy(self) -> None:
        """Every primary serving, each with its replica in sync, as every node sees it."""

        def problem() -> str | None:
            for node in self.processes:
                reason = _cluster_problem(node, len(self.processes), len(self.primaries))
                if reason is not None:
                    return reason
            for node in self.processes:
                if _role(node)["role"] == "slave" and (reason := _replication_problem(node)):
                    return reason
            return None

        _wait_until(problem, "healthy cluster")
