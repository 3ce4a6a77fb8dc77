"""Automatic pipelining in lanes: batching under load, without head-of-line blocking.

Under load a worker issues many small commands at once (acks, results, kicks from many
coroutines). Sent one by one, each waits a full network round trip; gathered into one
non-transactional pipeline they cost one round trip for the batch. Batching must not cost what
a single round trip in flight for everything cost before: a slow reply (a 64 MB GET, a paused
cluster node) stalled every command behind it, a cancelled caller's command was still sent, and
the extra pinned connection deadlocked small pools.

So commands travel in *lanes*. A lane is a task that sends, over one pooled connection at a
time, every command queued so far for its server (one alone, several as one pipeline), hands
each caller its own reply or error, and repeats while commands are queued. A command issued
while no lane runs for its server goes straight out in its caller's task (the cost of plain
redis-py); one issued while lanes run waits for the next lane to come back, and if none is
back within PATIENCE a new lane takes it, as far as the lane cap and the pool's free
connections allow. So a slow round trip delays only its own lane, and the lanes never hold
more connections than the pool has free.

Servers are the single node or sentinel primary, or each cluster node for commands whose keys
name one slot. A command redis-py sends to several nodes (SCRIPT LOAD, SCRIPT EXISTS, anything
routed to all primaries), or without a key, never joins a batch: redis-py refuses a cluster
pipeline holding one, failing every command beside it. Blocking commands (BRPOP, XREADGROUP)
never join one either: they would hold the batch until they return.

A lane packs its commands with hiredis where it is installed (redis-py's asyncio connections
pack every command in Python, 10.5 us for an EVALSHA against 1.3 us), writes them with the
connection's ``send_packed_command`` and reads each reply with the client's ``parse_response``:
only redis-py's public API, so a redis-py release that reworks its parsers, writers or pool
bookkeeping cannot break the batches. A connection lost mid-batch has its unanswered commands
sent again one by one through redis-py, with its reconnect retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MaxConnectionsError,
    MovedError,
    RedisError,
    TryAgainError,
)

from taskiq_redis import wire
from taskiq_redis.pools import CountsHandedOut

if TYPE_CHECKING:
    from redis.asyncio.cluster import ClusterNode


_Command = tuple[tuple[Any, ...], dict[str, Any]]  # a command's arguments and redis-py options
_Waiter = tuple[tuple[Any, ...], dict[str, Any], "asyncio.Future[Any]"]

BLOCKING_COMMANDS = frozenset(
    {"BLPOP", "BRPOP", "BLMOVE", "BRPOPLPUSH", "BLMPOP", "BZPOPMIN", "BZPOPMAX", "BZMPOP"}
    | {"XREAD", "XREADGROUP", "WAIT", "WAITAOF"}
)

# Lanes per server at most, and how long a round trip may take before commands queued behind
# it start another lane. Under load each extra lane costs throughput (more, smaller round
# trips on a CPU-bound client: stream receive+ack at concurrency 50 ran at 1.19x redis-py with
# one lane, 0.67x with up to four started freely), so a second lane starts only for a slow
# round trip (a 64 MB reply, a paused server). See docs/design.md, "Design: lanes".
LANE_CAP = 4
PATIENCE = 0.02

# A lane that takes at least 2 * SPLIT_AT commands sends them as two halves on two connections
# (when the pool has two free): the server runs the second half while the client reads the
# first's replies and its callers go on, instead of each side waiting for the other. Result
# get+del at concurrency 50 went from 2.37x to 2.80x plain redis-py (A/B, 4 rounds).
SPLIT_AT = 16

# How long a single node's lanes keep a connection with no command before it goes back to the
# pool (only while the pool has others free; see AutoPipeline.__init__).
KEEP_IDLE = 0.05

# How long a cluster command waits for a free connection to its node before redis-py's
# "Too many connections" reaches the caller (BlockingConnectionPool's default wait).
POOL_WAIT = 20.0

# Errors after which a cluster node's batch is resent one command at a time through
# RedisCluster.execute_command, which follows redirections and refreshes the slot table.
_REROUTE = (MovedError, AskError, TryAgainError, ClusterDownError)


class _Server:
    """The commands queued for one server and the lanes sending them."""

    __slots__ = ("collecting", "lanes", "latest", "node", "timer", "waiting")

    def __init__(self, node: ClusterNode | None) -> None:
        self.node = node
        self.waiting: list[_Waiter] = []
        self.lanes = 0  # lanes running, including callers sending their own command
        self.collecting = False  # a lane is started and has not taken the queue yet
        self.latest = 0.0  # when the most recent round trip began
        self.timer: asyncio.TimerHandle | None = None  # to start a lane if none comes back


class AutoPipeline:
    """Sends one client's commands in lanes (see the module docstring)."""

    def __init__(self, client: Redis | RedisCluster) -> None:
        self._client = client
        self._cluster = client if isinstance(client, RedisCluster) else None
        self._single = _Server(None)
        self._nodes: dict[str, _Server] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        # A single node's or sentinel primary's lanes keep one connection between commands:
        # taking one from a BlockingConnectionPool and giving it back costs ~50 us (lock, timer,
        # a task). It is kept while the pool could still hand another one out at once, and goes
        # back after KEEP_IDLE without a command, or as soon as the event loop gets round to it
        # when it was the pool's last: so nobody ever waits on an idle kept connection for long.
        self._kept: Any = None
        self._kept_used = 0.0  # when the kept connection last came back from a command
        self._idle_timer: asyncio.TimerHandle | None = None

    async def execute(self, *args: Any, **options: Any) -> Any:
        """Send one command; its reply, or its error, is this call's alone."""
        server = await self._server_for(args)
        if server is None:
            return await self._direct(args, options)
        if server.lanes == 0 and self._free(server) > 0:
            server.lanes += 1
            server.latest = time.monotonic()
            try:
                return await self._send_one(server, args, options)
            finally:
                server.lanes -= 1
                self._pick_up(server)
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Any] = loop.create_future()
        server.waiting.append((args, options, waiter))
        if not server.collecting:
            if server.lanes == 0:
                self._start_lane(server)
            elif server.lanes < LANE_CAP and server.timer is None:
                # A lane that began its round trip just now picks this up when it is back;
                # one that began PATIENCE ago may be stuck, so another lane starts then.
                wait = max(0.0, server.latest + PATIENCE - time.monotonic())
                server.timer = loop.call_later(wait, self._overdue, server)
        return await waiter

    def _overdue(self, server: _Server) -> None:
        """Commands have waited PATIENCE with no lane back to take them: start another."""
        server.timer = None
        if (
            server.waiting
            and not server.collecting
            and server.lanes < LANE_CAP
            and self._free(server) > 0
        ):
            self._start_lane(server)

    async def _server_for(self, args: tuple[Any, ...]) -> _Server | None:
        """The server whose lanes send this command; None for one sent on its own."""
        name = str(args[0]).upper()
        if name in BLOCKING_COMMANDS:
            return None
        cluster = self._cluster
        if cluster is None:
            return self._single
        if cluster.command_flags.get(name):
            return None  # redis-py sends it to a group of nodes
        try:
            node = await _node_for(cluster, name, args)
        except (RedisError, ValueError, IndexError, TypeError):  # no slot table yet, bad args
            return None
        if node is None:
            return None
        server = self._nodes.get(node.name)
        if server is None:
            server = self._nodes[node.name] = _Server(node)
        server.node = node
        return server

    def _free(self, server: _Server) -> int:
        """How many connections the server's lanes may take without waiting (at least).

        A single node's or sentinel primary's pool is one of this package's, which counts what
        it handed out (:mod:`taskiq_redis.pools`); the kept connection is handed out by that
        count but ours to take. A cluster node's pool has no public count of what is in use:
        the lanes count what they take themselves, and a node whose connections others hold (a
        blocking read) makes a lane wait for one, as redis-py's own cluster commands do.
        """
        node = server.node
        if node is None:
            assert isinstance(self._client, Redis)  # a cluster's servers are its nodes
            pool = self._client.connection_pool
            kept = self._kept is not None
            if isinstance(pool, CountsHandedOut):
                return pool.free_now() + kept
            can_get = getattr(pool, "can_get_connection", None)  # a pool we did not make
            return (1 if can_get is None or can_get() else 0) + kept
        return int(node.max_connections) - server.lanes

    def _start_lane(self, server: _Server) -> None:
        server.lanes += 1
        server.collecting = True
        task = asyncio.ensure_future(self._lane(server))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _pick_up(self, server: _Server) -> None:
        """After a lane ends: start one for commands that queued with no lane to take them."""
        if server.waiting and not server.collecting:
            self._start_lane(server)

    async def _lane(self, server: _Server) -> None:
        """Send what is queued, round trip after round trip, until nothing is."""
        try:
            while server.waiting:
                # A caller cancelled before its command was sent never has it sent.
                batch = [waiter for waiter in server.waiting if not waiter[2].done()]
                server.waiting = []
                server.collecting = False
                if len(batch) >= 2 * SPLIT_AT and self._free(server) > 1:
                    # Two halves on two connections: the server works on the second while this
                    # client takes the first's replies (and its callers send their next ones).
                    half = len(batch) // 2
                    server.latest = time.monotonic()
                    await asyncio.gather(
                        self._round_trip(server, batch[:half]),
                        self._round_trip(server, batch[half:]),
                    )
                elif batch:
                    server.latest = time.monotonic()
                    await self._round_trip(server, batch)
        finally:
            server.collecting = False
            server.lanes -= 1
            self._pick_up(server)

    async def _round_trip(self, server: _Server, batch: list[_Waiter]) -> None:
        """One round trip for the batch; every caller gets its reply or its own error."""
        replies: list[Any]
        try:
            if len(batch) == 1:
                args, options, _ = batch[0]
                try:
                    replies = [await self._send_one(server, args, options)]
                except Exception as error:  # a reply error belongs to its caller alone
                    replies = [error]
            else:
                replies = await self._send_many(server, batch)
        except BaseException as error:  # the lane itself was cancelled or failed
            replies = [error] * len(batch)
            if not isinstance(error, Exception):
                _deliver(batch, replies)
                raise
        _deliver(batch, replies)

    async def _direct(self, args: tuple[Any, ...], options: dict[str, Any]) -> Any:
        """A command sent on its own, waiting for a cluster connection like a blocking pool."""
        deadline = time.monotonic() + POOL_WAIT
        while True:
            try:
                return await self._client.execute_command(*args, **options)
            except MaxConnectionsError:
                if self._cluster is None or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.005)

    async def _send_one(
        self, server: _Server, args: tuple[Any, ...], options: dict[str, Any]
    ) -> Any:
        if server.node is not None:
            return await self._direct(args, options)
        [reply] = await self._send_on_single([(args, options)])
        if isinstance(reply, BaseException):
            raise reply
        return reply

    async def _send_on_single(self, commands: list[_Command]) -> list[Any]:
        """One round trip on the single node's kept connection, or one from its pool."""
        client = self._client
        assert isinstance(client, Redis)  # a cluster's commands go to its nodes
        connection, self._kept = self._kept, None  # taken before any await: one user at a time
        if connection is None:
            connection = await client.connection_pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            replies = await wire.exchange(connection, commands, client.parse_response)
        finally:
            self._keep(connection)
        return await self._resend_unanswered(commands, replies)

    def _keep(self, connection: Any) -> None:
        """Keep a connection back from a command, or give it back to the pool (see __init__)."""
        if self._kept is not None:
            self._release(connection)
            return
        loop = asyncio.get_running_loop()
        self._kept = connection
        self._kept_used = loop.time()
        if self._free(self._single) <= 1:  # the pool's last free connection: not for long
            loop.call_soon(self._give_back, connection)
        elif self._idle_timer is None:
            self._idle_timer = loop.call_later(KEEP_IDLE, self._give_back_if_idle)

    def _give_back_if_idle(self) -> None:
        self._idle_timer = None
        if self._kept is None:
            return
        loop = asyncio.get_running_loop()
        idle = loop.time() - self._kept_used
        if idle >= KEEP_IDLE:
            self._give_back(self._kept)
        else:
            self._idle_timer = loop.call_later(KEEP_IDLE - idle, self._give_back_if_idle)

    def _give_back(self, connection: Any) -> None:
        """Return the kept connection to the pool unless a command took it meanwhile."""
        if self._kept is connection:
            self._kept = None
            self._release(connection)

    def _release(self, connection: Any) -> None:
        task = asyncio.ensure_future(self._put_back(connection))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _put_back(self, connection: Any) -> None:
        assert isinstance(self._client, Redis)
        # KeyError: the pool was reset (closed) meanwhile and forgot the connection.
        with contextlib.suppress(KeyError):
            await self._client.connection_pool.release(connection)

    async def close(self) -> None:
        """Give the kept connection back before the pool closes."""
        for server in (self._single, *self._nodes.values()):
            if server.timer is not None:
                server.timer.cancel()
                server.timer = None
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        connection, self._kept = self._kept, None
        if connection is not None:
            await self._put_back(connection)

    async def _send_many(self, server: _Server, batch: list[_Waiter]) -> list[Any]:
        """Several commands as one non-transactional pipeline to the batch's server."""
        node = server.node
        if node is not None:
            return await self._send_to_node(node, batch)
        return await self._send_on_single(_commands(batch))

    async def _send_to_node(self, node: ClusterNode, batch: list[_Waiter]) -> list[Any]:
        """A batch for one cluster node on one of its connections.

        redis-py's cluster pipeline closes every connection of the client when one node fails,
        which would fail the other nodes' lanes too; here a batch whose connection failed is
        resent command by command through ``RedisCluster.execute_command`` (redirections, slot
        refresh, retries).
        """
        commands = _commands(batch)
        connection = await self._acquire(node)
        try:
            replies = await wire.exchange(connection, commands, node.parse_response)
        finally:
            node.release(connection)
        return await self._resend_unanswered(commands, replies)

    async def _resend_unanswered(self, batch: list[_Command], replies: list[Any]) -> list[Any]:
        """Send on its own each command of the batch left without a reply, or redirected.

        A batch ends early only on a connection error (see :func:`_exchange`), after which
        redis-py's own retry would also send again; a command that timed out is not resent.
        """
        for index, (args, options) in enumerate(batch):
            if index >= len(replies) or isinstance(replies[index], _REROUTE):
                try:
                    reply = await self._direct(args, options)
                except Exception as error:
                    reply = error
                if index >= len(replies):
                    replies.append(reply)
                else:
                    replies[index] = reply
        return replies

    async def _acquire(self, node: ClusterNode) -> Any:
        """A connection to ``node``, waiting while its pool is exhausted."""
        deadline = time.monotonic() + POOL_WAIT
        while True:
            try:
                return node.acquire_connection()
            except MaxConnectionsError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.005)


# Script calls name their keys by count; redis-py's command table cannot tell them apart.
_SCRIPT_CALLS = frozenset({"EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "FCALL", "FCALL_RO"})


async def _node_for(cluster: RedisCluster, name: str, args: tuple[Any, ...]) -> ClusterNode | None:
    """The primary that owns every key of the command; None when it names no key or several slots.

    Through the cluster client's public calls: ``initialize`` (returns at once once the slot
    table is known, and refreshes it when redis-py asked for that after a redirection), its
    command parser for the keys of plain commands, and ``keyslot`` / ``get_node_from_key``.
    """
    await cluster.initialize()
    if name in _SCRIPT_CALLS:
        keys: Any = args[3 : 3 + int(args[2])]
    else:
        keys = await cluster.commands_parser.get_keys(*args)
    if not keys or len({cluster.keyslot(key) for key in keys}) != 1:
        return None
    return cluster.get_node_from_key(keys[0])


def _commands(batch: list[_Waiter]) -> list[_Command]:
    return [(args, options) for args, options, _ in batch]


def _deliver(batch: list[_Waiter], replies: list[Any]) -> None:
    for (_, _, waiter), reply in zip(batch, replies, strict=True):
        if waiter.done():
            continue
        if isinstance(reply, BaseException):
            waiter.set_exception(reply)
        else:
            waiter.set_result(reply)
