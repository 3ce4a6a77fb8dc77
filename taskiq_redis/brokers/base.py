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
from taskiq import AsyncBroker, AsyncResultBackend, BrokerMessage, TaskiqResult
from taskiq.result_backends.dummy import DummyResultBackend

from taskiq_redis import connection, delays, task_ids
from taskiq_redis.connection import HasConnection, RedisConnection
from taskiq_redis.diagnostics import describe
from taskiq_redis.exceptions import TaskCancelledError

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

    async def store_error_result(self, task_id: str, error: BaseException) -> None:
        """Store ``error`` as the task's result, so ``wait_result()`` returns at once.

        Only with a result backend. A failure is logged: the news is lost, not the task.
        """
        backend = self.result_backend
        if isinstance(backend, DummyResultBackend):
            return
        result: TaskiqResult[Any] = TaskiqResult(
            is_err=True, return_value=None, execution_time=0.0, error=error
        )
        try:
            await backend.set_result(task_id, result)
        except Exception as exc:
            logger.warning("Storing the result of task %s failed: %s", task_id, describe(exc))

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


class QueueBroker(BaseRedisBroker):
    """The list and stream brokers: queues a task waits in, so it can be found by its id.

    Unique and cancellable kicks and :meth:`cancel` (see :mod:`taskiq_redis.task_ids`) are
    written once here for both; each broker says what its queues are (:meth:`task_queue`).
    """

    max_priority: int

    def task_queue(self, queue_name: str | None = None) -> task_ids.Queue:
        """The queue ``queue_name`` (the broker's own by default), as the scripts see it."""
        raise NotImplementedError

    async def kick_recorded(
        self, message: BrokerMessage, level: int, trim: tuple[Any, ...] = ()
    ) -> None:
        """Queue or delay a message labelled ``unique`` or ``cancellable``, recorded in the task
        index; a unique one only unless its task id already waits."""
        queue = self.task_queue(self.queue_of(message))
        delay = delays.delay_ms(message.labels)
        unique = task_ids.is_unique(message.labels)
        added = await task_ids.kick_recorded(
            self._conn, queue, message.task_id, message.message, level, delay, trim, unique
        )
        if not added:
            logger.info(
                "Task %s is already queued in %r; the unique kick is dropped",
                message.task_id,
                queue.name,
            )

    async def cancel(self, task_id: str, queue_name: str | None = None) -> bool:
        """Take back a task no worker has taken yet, so it never runs.

        True when it was queued or delayed (at any priority level) and is now deleted; its
        waiters then get a :class:`~taskiq_redis.exceptions.TaskCancelledError` result, when
        the broker has a result backend. False when it is not waiting: a worker holds it or ran
        it (a running task is not interrupted), or the id is unknown.
        """
        cancelled = await task_ids.cancel(self._conn, self.task_queue(queue_name), task_id)
        if cancelled:
            await self.store_error_result(task_id, TaskCancelledError(task_id=task_id))
        return cancelled
