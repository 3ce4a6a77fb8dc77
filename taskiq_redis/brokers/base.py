"""What every broker type shares: a topology-neutral connection and the queue a message goes to."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from taskiq import AsyncBroker, AsyncResultBackend, BrokerMessage

from taskiq_redis.connection import RedisConnection


class BaseRedisBroker(AsyncBroker):
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

    async def shutdown(self) -> None:
        """Stop taskiq's side first, then close every connection."""
        await super().shutdown()
        await self._conn.close()
