"""An application written for taskiq-redis 1.2, importing from 1.2's modules, run unchanged.

Only the Redis address and the queue name come from the test (see ``tests.worker_process``).
"""

from taskiq_redis.redis_backend import RedisAsyncResultBackend
from taskiq_redis.redis_broker import RedisStreamBroker
from tests.worker_process import worker_config

config = worker_config()
result_backend: RedisAsyncResultBackend[int] = RedisAsyncResultBackend(
    redis_url=config["url"], result_ex_time=600
)
broker = RedisStreamBroker(url=config["url"], queue_name=config["queue"]).with_result_backend(
    result_backend
)


@broker.task(task_name="app_1_2.add")
async def add(a: int, b: int) -> int:
    return a + b
