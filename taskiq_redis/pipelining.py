"""Automatic pipelining: commands issued while a round trip is under way share the next one.

Under load a worker issues many small commands at once (acks, results, kicks from many
coroutines). Sent one by one, each waits a full network round trip; gathered into one
non-transactional pipeline they cost one round trip for the batch. A command issued while
nothing is in flight (the usual case at low load) goes straight out, so batching never adds
latency to a lone caller; under load each round trip carries everything that arrived during
the previous one.

Blocking commands (BRPOP, XREADGROUP ... BLOCK) never join a batch: they would hold every other
command of the batch until they return.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from redis.asyncio import Redis, RedisCluster

_Waiter = tuple[tuple[Any, ...], dict[str, Any], "asyncio.Future[Any]"]

BLOCKING_COMMANDS = frozenset(
    {"BLPOP", "BRPOP", "BLMOVE", "BRPOPLPUSH", "BLMPOP", "BZPOPMIN", "BZPOPMAX", "BZMPOP"}
    | {"XREAD", "XREADGROUP", "WAIT", "WAITAOF"}
)


class AutoPipeline:
    """Sends the commands of one client, one round trip at a time, batching under load.

    ``lone`` sends a command that travels alone (a client pinned to one connection, where the
    topology allows it); ``client`` sends blocking commands and batches.
    """

    def __init__(self, client: Redis | RedisCluster, lone: Redis | RedisCluster) -> None:
        self._client = client
        self._lone = lone
        self._busy = False  # a round trip is under way
        self._waiting: list[_Waiter] = []  # commands for the next round trip
        self._sending: set[asyncio.Future[None]] = set()

    async def execute(self, *args: Any, **options: Any) -> Any:
        """Send one command; its reply, or its error, is this call's alone."""
        if str(args[0]).upper() in BLOCKING_COMMANDS:
            return await self._client.execute_command(*args, **options)
        if self._busy:
            waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._waiting.append((args, options, waiter))
            return await waiter
        self._busy = True
        try:
            return await self._lone.execute_command(*args, **options)
        finally:
            self._next_round_trip()

    def _next_round_trip(self) -> None:
        """Send what gathered during the round trip that just ended, or become idle."""
        if not self._waiting:
            self._busy = False
            return
        batch, self._waiting = self._waiting, []
        # A task of its own, so cancelling one caller never strands the others' replies.
        task = asyncio.ensure_future(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[_Waiter]) -> None:
        """One round trip for the batch; every waiter gets its reply or its own error."""
        try:
            replies = await self._round_trip(batch)
        except BaseException as error:  # the connection failed: every waiter learns why
            replies = [error] * len(batch)
            if not isinstance(error, Exception):
                raise
        finally:
            for (_, _, waiter), reply in zip(batch, replies, strict=True):
                if waiter.done():
                    continue
                if isinstance(reply, BaseException):
                    waiter.set_exception(reply)
                else:
                    waiter.set_result(reply)
            self._next_round_trip()

    async def _round_trip(self, batch: list[_Waiter]) -> list[Any]:
        """A lone command as itself (a pipeline costs more), several as one pipeline."""
        if len(batch) == 1:
            args, options, _ = batch[0]
            try:
                return [await self._lone.execute_command(*args, **options)]
            except Exception as error:  # a reply error belongs to its caller alone
                return [error]
        pipe = self._client.pipeline(transaction=False)
        for args, options, _ in batch:
            pipe.execute_command(*args, **options)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies
