"""Automatic pipelining: commands issued in the same event-loop tick share one round trip.

Under load a worker issues many small commands at once (acks, results, kicks from many
coroutines). Sent one by one, each waits a full network round trip; gathered into one
non-transactional pipeline they cost one round trip for the batch. A lone command (the usual
case at low load) goes straight out: batching only ever waits for the current tick to end.

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
    """Sends the commands of one client, batching those that arrive in the same tick.

    ``lone`` sends commands that travel alone (a client pinned to one connection, where the
    topology allows it); ``client`` sends blocking commands and batches.
    """

    def __init__(self, client: Redis | RedisCluster, lone: Redis | RedisCluster) -> None:
        self._client = client
        self._lone = lone
        self._gathering: list[_Waiter] | None = None
        self._sending: set[asyncio.Future[None]] = set()
        self._in_flight = 0

    async def execute(self, *args: Any, **options: Any) -> Any:
        """Send one command; its reply, or its error, is this call's alone.

        With nothing in flight the command goes straight out, so a lone caller pays nothing
        for batching; while a round trip is under way, the commands of one tick are gathered
        and sent together.
        """
        if str(args[0]).upper() in BLOCKING_COMMANDS:
            return await self._client.execute_command(*args, **options)
        if self._gathering is not None:
            waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._gathering.append((args, options, waiter))
            return await waiter
        if not self._in_flight:
            self._in_flight += 1
            try:
                return await self._lone.execute_command(*args, **options)
            finally:
                self._in_flight -= 1
        batch = self._gathering = []
        try:
            await asyncio.sleep(0)  # let the other coroutines of this tick join the batch
        except asyncio.CancelledError:
            self._gathering = None
            self._send_soon(batch)
            raise
        self._gathering = None
        own: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        batch.insert(0, (args, options, own))
        self._send_soon(batch)
        return await own

    def _send_soon(self, batch: list[_Waiter]) -> None:
        """Send in a task of its own, so cancelling one caller never strands the others."""
        if batch:
            task = asyncio.ensure_future(self._send(batch))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[_Waiter]) -> None:
        """One round trip for the batch; every waiter gets its reply or its own error."""
        self._in_flight += 1
        try:
            replies = await self._round_trip(batch)
        except BaseException as error:  # the connection failed: every waiter learns why
            replies = [error] * len(batch)
            if not isinstance(error, Exception):
                raise
        finally:
            self._in_flight -= 1
            for (_, _, waiter), reply in zip(batch, replies, strict=True):
                if waiter.done():
                    continue
                if isinstance(reply, BaseException):
                    waiter.set_exception(reply)
                else:
                    waiter.set_result(reply)

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
