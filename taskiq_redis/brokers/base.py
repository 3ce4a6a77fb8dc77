"""What every broker type shares: a topology-neutral connection and the queue a message goes to."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from types import FrameType
from typing import Any

from redis import exceptions as redis_errors
from taskiq import AsyncBroker, AsyncResultBackend, BrokerMessage

from taskiq_redis import connection
from taskiq_redis.connection import HasConnection, RedisConnection
from taskiq_redis.diagnostics import describe

logger = logging.getLogger("taskiq.redis_broker")

# A listener whose last read or pop came back full (a backlog) starts the next while
# 1/READ_AHEAD_SHARE of it is still to be handed over, so taskiq does not wait for a round
# trip: a stream worker draining a backlog sat 6-8% of its time in reads. The list tops the held
# messages up to batch_size; the stream holds at most xread_count * (1 + 1/READ_AHEAD_SHARE).
READ_AHEAD_SHARE = 4

# Delays between attempts while a worker waits for Redis at start: quick at first (a server
# that is just starting), then at most this far apart, so the wait logs little.
START_WAIT_FIRST = 0.5
START_WAIT_CAP = 10.0

# The options of each broker type of this package beyond what every broker takes (queue_name,
# result_backend, task_id_generator and how to reach Redis). A broker type takes whatever else
# it is given as redis-py connection options, so an option of another type would otherwise
# reach redis-py and fail each time a connection opens; see :func:`refuse_options`.
BROKER_OPTIONS: dict[str, frozenset[str]] = {
    "stream": frozenset(
        {
            "consumer_group_name",
            "consumer_name",
            "consumer_id",
            "mkstream",
            "xread_block",
            "maxlen",
            "approximate",
            "idle_timeout",
            "unacknowledged_batch_size",
            "unacknowledged_lock_timeout",
            "xread_count",
            "additional_streams",
            "max_deliveries",
            "max_priority",
        }
    ),
    "list queue": frozenset({"batch_size", "max_priority"}),
}


def refuse_options(broker: str, connection_kwargs: Mapping[str, Any]) -> None:
    """Refuse, when ``broker`` (a class name) is built, an option of another broker type that
    ended up among its connection options: ``TypeError`` naming it and the types that take it.

    Without this, ``ListQueueBroker(url, max_deliveries=3)`` constructs, and every connection
    it opens fails with redis-py's ``unexpected keyword argument``: a worker that restarts for
    ever. Called by every broker class whose ``__init__`` takes ``**connection_kwargs``.
    """
    for name in connection_kwargs:
        owners = [kind for kind, options in BROKER_OPTIONS.items() if name in options]
        if owners:
            raise TypeError(
                f"{broker} does not take the option {name!r}: it is an option of the "
                f"{' and '.join(owners)} brokers"
            )


def unreachable(error: BaseException) -> bool:
    """Whether ``error`` says the server is not there (yet), which waiting can cure.

    A wrong password or a missing permission is not: waiting would only hide it.
    """
    if isinstance(error, redis_errors.AuthenticationError | redis_errors.AuthorizationError):
        return False
    if isinstance(error, redis_errors.RedisClusterException) and error.__cause__ is not None:
        # "Redis Cluster cannot be connected": why is in its cause.
        return unreachable(error.__cause__)
    return isinstance(error, connection.TRANSIENT_ERRORS)


@contextlib.contextmanager
def _stop_signals(on_stop: Callable[[], object]) -> Iterator[None]:
    """Also call ``on_stop`` on SIGINT/SIGTERM while the block runs, then restore the handlers.

    taskiq's worker handles these signals by setting an event that it checks only once the
    broker started, so a worker waiting for Redis would never stop (and its process manager,
    which does not wait, would leave it running). The previous handler still runs.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, frame: FrameType | None) -> None:
        on_stop()
        earlier = previous[signal.Signals(signum)]
        if callable(earlier):
            earlier(signum, frame)
        elif earlier == signal.SIG_DFL and signum == signal.SIGINT:
            raise KeyboardInterrupt

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, earlier in previous.items():
            signal.signal(sig, earlier)


class BaseRedisBroker(connection.HasConnection, AsyncBroker):
    """A broker over one :class:`RedisConnection`; the topology was chosen by the caller."""

    def __init__(
        self,
        conn: RedisConnection,
        queue_name: str = "taskiq",
        result_backend: AsyncResultBackend[Any] | None = None,
        task_id_generator: Callable[[], str] | None = None,
    ) -> None:
        super().__init__(result_backend=result_backend, task_id_generator=task_id_generator)
        self._conn = conn
        self.queue_name = queue_name

    def queue_of(self, message: BrokerMessage) -> str:
        """The queue a message is sent to: its ``queue_name`` label, else the broker's queue."""
        return str(message.labels.get("queue_name") or self.queue_name)

    async def startup(self) -> None:
        """In a worker, first wait until Redis answers; then start as taskiq does.

        A worker started before its Redis (a host booting, a container order) would otherwise
        die, and taskiq would restart it every two seconds, each time with a long traceback.
        A producer's ``startup()`` raises at once instead, as in taskiq-redis 1.2: the
        application decides what to do. Subclasses call this first, so the wait covers their
        own preparation (scripts, consumer groups) too.
        """
        if self.is_worker_process:
            await self._wait_for(self._conn)
            backend = self.result_backend
            backend_conn = backend.redis_connection if isinstance(backend, HasConnection) else None
            if backend_conn is not None and backend_conn is not self._conn:
                await self._wait_for(backend_conn)
        await super().startup()

    async def _wait_for(self, conn: RedisConnection) -> None:
        """PING until it is answered, one log line per failed attempt, with capped backoff.

        A stop signal ends the wait: the last error is raised, as without the wait.
        """
        backoff = connection.Backoff(first=START_WAIT_FIRST, cap=START_WAIT_CAP)
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        attempt = 0
        with _stop_signals(lambda: loop.call_soon_threadsafe(stopping.set)):
            while True:
                attempt += 1
                try:
                    await conn.execute("PING")
                except Exception as exc:
                    if not unreachable(exc) or stopping.is_set():
                        raise
                    logger.warning(
                        "Redis is not reachable (%s); the worker waits for it (attempt %d)",
                        describe(exc),
                        attempt,
                    )
                    waits = {
                        asyncio.ensure_future(backoff.wait()),
                        asyncio.ensure_future(stopping.wait()),
                    }
                    try:
                        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        for waiting in waits:
                            waiting.cancel()
                    if stopping.is_set():
                        raise
                else:
                    if attempt > 1:
                        logger.info("Redis answers; the worker starts")
                    return

    async def shutdown(self) -> None:
        """Stop taskiq's side first, then close every connection."""
        await super().shutdown()
        await self._conn.close()
