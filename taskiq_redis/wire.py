"""One batch of commands on one connection: packed, written, and its replies read.

What a lane does with the connection it holds (see :mod:`taskiq_redis.pipelining`), through
redis-py's public calls only: ``send_packed_command`` and the client's ``parse_response``.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from redis.exceptions import ConnectionError as LostConnection
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

_Command = tuple[tuple[Any, ...], dict[str, Any]]  # a command's arguments and redis-py options

_pack_in_c: Callable[[tuple[Any, ...]], bytes] | None
try:  # redis-py's asyncio connections pack commands in Python; hiredis packs them in C
    from hiredis import pack_command as _pack_in_c
except ImportError:  # no hiredis (PyPy): redis-py packs
    _pack_in_c = None


_PACKED_IN_C = (str, bytes, int, float)  # exact types: a bool is refused by redis-py


def packed(connection: Any, commands: list[tuple[Any, ...]]) -> Any:
    """The commands in the Redis protocol, byte for byte as redis-py's ``pack_commands``.

    redis-py's asyncio connections pack in Python (10.5 us for an EVALSHA with two keys; its
    sync ones use hiredis); hiredis' ``pack_command`` makes the same bytes in 1.3 us. It packs
    what it packs as redis-py does: str (with redis-py's default strict UTF-8), bytes, int and
    float; anything else (a bool, which redis-py refuses, a memoryview, another encoding) goes
    to redis-py's packer.
    """
    encoder = connection.encoder
    if (
        _pack_in_c is None
        or encoder.encoding.lower().replace("_", "-") not in ("utf-8", "utf8")
        or encoder.encoding_errors != "strict"
    ):
        return connection.pack_commands(commands)
    pieces = []
    for args in commands:
        name = args[0]
        if isinstance(name, str):  # as redis-py: "SCRIPT LOAD" goes as two words
            args = (*name.encode().split(), *args[1:])
        elif isinstance(name, bytes) and b" " in name:
            args = (*name.split(), *args[1:])
        if not all(type(arg) in _PACKED_IN_C for arg in args):
            return connection.pack_commands(commands)
        pieces.append(_pack_in_c(args))
    return b"".join(pieces)


async def exchange(connection: Any, batch: list[_Command], parse: Any) -> list[Any]:
    """Send the batch on ``connection`` in one write and read the replies, in order.

    Everything goes through the connection's public calls (``send_packed_command``, and the
    client's ``parse_response``, which reads with the connection's ``read_response`` and applies
    redis-py's reply callbacks), so redis-py's push handling and reply forms hold. The
    connection's ``socket_timeout`` holds for the batch as a whole: redis-py arms a timer for
    every reply it reads and a ``wait_for`` for every write (4 us of the 10.7 us a reply of a
    batch of 50 costs the client), so for the batch the connection has none, and one deadline
    of ``socket_timeout`` covers the write and every reply; a stuck server fails the batch as
    it failed its first reply. An error reply is that command's own. A connection error ends
    the exchange: the replies read so far are returned (the rest are the caller's to resend)
    and the connection is closed, as redis-py does. Any other failure (a timeout) is every
    unanswered command's reply.
    """
    replies: list[Any] = []
    timeout = connection.socket_timeout
    connection.socket_timeout = None  # the batch's deadline stands in for the per-call ones
    try:
        await _within(timeout, _talk(connection, batch, parse, replies))
    except LostConnection:
        with contextlib.suppress(Exception):
            await connection.disconnect()
    except Exception as error:
        with contextlib.suppress(Exception):
            await connection.disconnect()
        replies += [error] * (len(batch) - len(replies))
    except BaseException:  # cancelled: a reply may be on its way, so the socket cannot be reused
        with contextlib.suppress(Exception):
            await connection.disconnect(nowait=True)
        raise
    finally:
        connection.socket_timeout = timeout
    return replies


async def _talk(connection: Any, batch: list[_Command], parse: Any, replies: list[Any]) -> None:
    """Write the batch and read its replies into ``replies``, as they come."""
    if getattr(connection, "should_reconnect", _never)():
        await connection.disconnect()
    await connection.send_packed_command(packed(connection, [args for args, _ in batch]))
    for args, options in batch:
        try:
            replies.append(await parse(connection, args[0], **options))
        except ResponseError as error:  # this command's own error
            replies.append(error)


async def _within(seconds: float | None, work: Coroutine[Any, Any, None]) -> None:
    """Await ``work``, failing with redis-py's TimeoutError after ``seconds`` (None: no limit)."""
    if seconds is None:
        await work
        return
    try:
        if sys.version_info >= (3, 11):
            async with asyncio.timeout(seconds):
                await work
        else:
            await asyncio.wait_for(work, seconds)
    except asyncio.TimeoutError:
        raise RedisTimeoutError(f"Timeout after {seconds} s sending or reading a batch") from None


def _never() -> bool:
    """Stands in for ``should_reconnect`` on a redis-py that has none (before 8.0)."""
    return False
