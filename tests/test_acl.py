"""Every part runs as a Redis user granted exactly what the README's ACL section lists for it.

The rules are read from the README itself, so a command or key added to the code without
the README following fails here: Redis answers NOPERM and records the refusal in ACL LOG,
which each test asserts is empty for its user (besides checking that the part did its job).
"""

from __future__ import annotations

import asyncio
import datetime
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.asyncio import Redis
from taskiq import AckableMessage, BrokerMessage, ScheduledTask, TaskiqResult
from taskiq.depends.progress_tracker import TaskProgress, TaskState
from taskiq.serializers import PickleSerializer

import taskiq_redis
from taskiq_redis import connection
from tests.servers import RedisServers

README = Path(__file__).resolve().parent.parent / "README.md"
TITLE = "ACL: what a deployment needs"
PATIENCE = 30.0

# The names the README's rules are written for, as they appear inside key and channel patterns.
DEFAULT_QUEUE = "taskiq"
DEFAULT_SCHEDULE_PREFIX = "schedule"
DEFAULT_RESULT_PREFIX = "results"

# Refusals that are not the part's own: redis-py sends CLIENT SETINFO at connect and ignores
# a refusal (Redis 7.2+ records it).
IGNORED_REFUSALS = {"client|setinfo"}
PICKLE = PickleSerializer()


def readme_rules() -> dict[str, list[str]]:
    """The README's ACL rules by part: the ``text`` block of the ACL section, ``part: rules``."""
    text = README.read_text(encoding="utf-8")
    head = f"\n## {TITLE}\n"
    assert head in text, f"README has no section {TITLE!r}"
    section = text.split(head, 1)[1].split("\n## ", 1)[0]
    block = section.split("```text\n", 1)[1].split("\n```", 1)[0]
    rules = {}
    for line in block.splitlines():
        part, _, rest = line.partition(": ")
        rules[part.strip()] = rest.split()
    return rules


@dataclass
class Names:
    queue: str
    schedule_prefix: str
    result_prefix: str

    def apply(self, rule: str) -> str:
        """A README rule for these names: key (``~``) and channel (``&``) patterns renamed."""
        if not rule.startswith(("~", "&")):
            return rule
        return (
            rule.replace(DEFAULT_QUEUE, self.queue)
            .replace(DEFAULT_SCHEDULE_PREFIX, self.schedule_prefix)
            .replace(DEFAULT_RESULT_PREFIX, self.result_prefix)
        )


@dataclass
class AclUser:
    name: str
    url: str
    admin: Redis
    names: Names

    async def refusals(self) -> list[str]:
        """What the server refused this user (ACL LOG), besides :data:`IGNORED_REFUSALS`."""
        entries = await self.admin.acl_log()
        return [
            f"{entry['reason']} {entry['object']}"
            for entry in entries
            if entry["username"] == self.name and entry["object"] not in IGNORED_REFUSALS
        ]


MakeUser = Callable[[str], Awaitable[AclUser]]


@pytest.fixture
async def make_user(redis_servers: RedisServers, unique: str) -> AsyncIterator[MakeUser]:
    """Makes users with exactly the README's rules for a part, for this test's names."""
    names = Names(f"acl-q-{unique}", f"acl-s-{unique}", f"acl-r-{unique}")
    admin = Redis.from_url(redis_servers.standalone_url, decode_responses=True)
    made: list[str] = []

    async def make(part: str) -> AclUser:
        rules = [names.apply(rule) for rule in readme_rules()[part]]
        name = f"acl-{unique}-{len(made)}"
        await admin.execute_command(  # type: ignore[no-untyped-call]
            "ACL", "SETUSER", name, "reset", "on", ">pw", "resetkeys", "resetchannels", *rules
        )
        made.append(name)
        url = redis_servers.standalone_url.replace("redis://", f"redis://{name}:pw@")
        return AclUser(name, url, admin, names)

    try:
        yield make
    finally:
        for name in made:
            await admin.acl_deluser(name)
        await admin.aclose()


def test_the_readme_lists_every_part() -> None:
    assert set(readme_rules()) == {
        "stream broker",
        "list broker",
        "pub/sub broker",
        "result backend",
        "list schedule source",
        "key schedule source",
        "taskiq-redis queues, dead-letters, cancel",
    }


def test_the_permission_error_names_the_readme_section() -> None:
    advice = connection.explained(
        redis.exceptions.NoPermissionError("this user has no permissions")
    )
    assert f'README section "{TITLE}"' in str(advice)


def message(body: bytes, **labels: Any) -> BrokerMessage:
    return BrokerMessage(task_id=body.decode(), task_name="acl.task", message=body, labels=labels)


async def until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + PATIENCE
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"never happened: {what}")
        await asyncio.sleep(0.05)


async def unique_kicks_and_cancel(producer: Any) -> None:
    """Unique and cancellable kicks (one dropped) and cancels through the index and by looking:
    every command their scripts send is one the part's README line grants."""
    await producer.kick(message(b"u-delayed", delay="60", unique=True))
    await producer.kick(message(b"u-delayed", delay="60", unique=True))  # dropped
    await producer.kick(message(b"u-level", priority=2, unique=True))
    found_by_id = BrokerMessage(  # a list records nothing: looked for as taskiq's JSON has it
        task_id="c-level",
        task_name="acl.task",
        message=b'{"task_id": "c-level"}',
        labels={"priority": 1, "cancellable": True},
    )
    await producer.kick(found_by_id)
    assert await producer.cancel("c-level")
    assert await producer.cancel("u-delayed")
    assert await producer.cancel("u-level")
    assert not await producer.cancel("never-kicked")  # looked for everywhere


async def test_stream_broker(make_user: MakeUser) -> None:
    acl_user = await make_user("stream broker")
    queue = acl_user.names.queue
    producer = taskiq_redis.RedisStreamBroker(acl_user.url, queue_name=queue)
    # A short idle_timeout, so the worker renews the entry it holds and reclaims meanwhile.
    worker = taskiq_redis.RedisStreamBroker(acl_user.url, queue_name=queue, idle_timeout=600)
    worker.is_worker_process = True
    await producer.startup()
    await worker.startup()
    stream = worker.listen()
    try:
        await unique_kicks_and_cancel(producer)
        await producer.kick(message(b"now"))
        await producer.kick(message(b"later", delay="0.2"))
        # An entry no taskiq producer writes: the worker moves it to the dead letters.
        await acl_user.admin.xadd(queue, {"other": "field"})
        got: list[AckableMessage] = []
        for _ in range(2):
            got.append(await asyncio.wait_for(anext(stream), PATIENCE))
        await asyncio.sleep(0.5)  # held past idle_timeout / 3: renewed
        for received in got:
            await received.ack()  # type: ignore[misc]

        async def settled() -> bool:
            pending = await acl_user.admin.xpending(queue, "taskiq")
            return int(pending["pending"]) == 0

        await until(settled, "every entry acknowledged")
    finally:
        await stream.aclose()
        await worker.shutdown()
        await producer.shutdown()
    dead_letters = await acl_user.admin.xlen("{" + queue + "}:dead")
    refusals = await acl_user.refusals()
    await acl_user.admin.delete(
        queue, "{" + queue + "}:dead", "{" + queue + "}:delayed", "{" + queue + "}:priority:2"
    )
    assert sorted(received.data for received in got) == [b"later", b"now"]
    assert dead_letters == 1
    assert refusals == []


async def test_list_broker(make_user: MakeUser) -> None:
    acl_user = await make_user("list broker")
    queue = acl_user.names.queue
    producer = taskiq_redis.ListQueueBroker(acl_user.url, queue_name=queue)
    worker = taskiq_redis.ListQueueBroker(acl_user.url, queue_name=queue)
    worker.is_worker_process = True
    await producer.startup()
    await worker.startup()
    try:
        await unique_kicks_and_cancel(producer)
        stream = worker.listen()
        await producer.kick(message(b"later", delay="0.2"))
        first = await asyncio.wait_for(anext(stream), PATIENCE)  # waits in BRPOP
        for body in (b"a", b"b", b"c"):
            await producer.kick(message(body))
        second = await asyncio.wait_for(anext(stream), PATIENCE)  # one script pop of all three
        await stream.aclose()  # puts "b" and "c" back
        left = await acl_user.admin.lrange(queue, 0, -1)
    finally:
        await worker.shutdown()
        await producer.shutdown()
    refusals = await acl_user.refusals()
    await acl_user.admin.delete(queue, "{" + queue + "}:delayed", "{" + queue + "}:priority:2")
    assert (first, second) == (b"later", b"a")
    assert left == ["c", "b"]
    assert refusals == []


async def test_pubsub_broker(make_user: MakeUser) -> None:
    acl_user = await make_user("pub/sub broker")
    queue = acl_user.names.queue
    producer = taskiq_redis.PubSubBroker(acl_user.url, queue_name=queue)
    worker = taskiq_redis.PubSubBroker(acl_user.url, queue_name=queue)
    worker.is_worker_process = True
    await producer.startup()
    await worker.startup()
    stream = worker.listen()
    receiving = asyncio.ensure_future(anext(stream))
    try:

        async def delivered() -> bool:
            if not receiving.done():
                await producer.kick(message(b"hello"))
            return receiving.done()

        await until(delivered, "a published message received")
        received = receiving.result()
    finally:
        receiving.cancel()
        await asyncio.wait({receiving})
        await stream.aclose()
        await worker.shutdown()
        await producer.shutdown()
    assert received == b"hello"
    assert await acl_user.refusals() == []


async def test_result_backend(make_user: MakeUser, unique: str) -> None:
    acl_user = await make_user("result backend")
    prefix = acl_user.names.result_prefix
    keeping: taskiq_redis.RedisAsyncResultBackend[int] = taskiq_redis.RedisAsyncResultBackend(
        acl_user.url, prefix_str=prefix
    )
    reading_once: taskiq_redis.RedisAsyncResultBackend[int] = taskiq_redis.RedisAsyncResultBackend(
        acl_user.url, prefix_str=prefix, keep_results=False
    )
    result = TaskiqResult(is_err=False, return_value=7, execution_time=0.1)
    await keeping.startup()
    await reading_once.startup()
    try:
        await keeping.set_progress(unique, TaskProgress(state=TaskState.STARTED, meta=None))
        progress = await keeping.get_progress(unique)
        await keeping.set_result(unique, result)
        ready = await keeping.is_result_ready(unique)
        kept = await keeping.get_result(unique)
        taken = await reading_once.get_result(unique)  # the script: GET, then DEL of both
        gone = await keeping.is_result_ready(unique)
    finally:
        await keeping.shutdown()
        await reading_once.shutdown()
    assert progress is not None
    assert progress.state == TaskState.STARTED
    assert ready
    assert not gone
    assert kept.return_value == taken.return_value == 7
    assert await acl_user.admin.exists(f"{{{prefix}:{unique}}}__progress") == 0
    assert await acl_user.refusals() == []


def schedule(schedule_id: str, **when: Any) -> ScheduledTask:
    return ScheduledTask(
        task_name="acl.task", labels={}, args=[], kwargs={}, schedule_id=schedule_id, **when
    )


async def test_key_schedule_source(make_user: MakeUser) -> None:
    acl_user = await make_user("key schedule source")
    prefix = acl_user.names.schedule_prefix
    with pytest.warns(DeprecationWarning, match="deprecated"):
        source = taskiq_redis.RedisScheduleSource(acl_user.url, prefix=prefix)
    await source.startup()
    try:
        await source.add_schedule(schedule("kept", cron="* * * * *"))
        await source.add_schedule(schedule("dropped", cron="* * * * *"))
        await source.delete_schedule("dropped")
        found = [task.schedule_id for task in await source.get_schedules()]
    finally:
        await source.shutdown()
    refusals = await acl_user.refusals()
    await acl_user.admin.delete(f"{prefix}:kept", f"{{{prefix}}}__index")
    assert found == ["kept"]
    assert refusals == []


async def test_list_schedule_source(make_user: MakeUser) -> None:
    acl_user = await make_user("list schedule source")
    old_user = await make_user("key schedule source")
    prefix = acl_user.names.schedule_prefix
    admin = acl_user.admin
    # What taskiq-redis 1.2 leaves: an id in its cron list, taken over into the index at startup.
    legacy = schedule("from-1.2", cron="* * * * *")
    await admin.set(f"{prefix}:data:from-1.2", PICKLE.dumpb(legacy.model_dump(mode="json")))
    await admin.rpush(f"{prefix}:cron", "from-1.2")
    # A key-based source to migrate from, as a user with that source's line of the README.
    with pytest.warns(DeprecationWarning, match="deprecated"):
        old = taskiq_redis.RedisScheduleSource(old_user.url, prefix=prefix)
    await old.startup()
    await old.add_schedule(schedule("migrated", interval=60))
    await old.shutdown()
    with pytest.warns(DeprecationWarning, match="deprecated"):
        old = taskiq_redis.RedisScheduleSource(old_user.url, prefix=prefix)

    source = taskiq_redis.ListRedisScheduleSource(acl_user.url, prefix=prefix)
    source.with_migrate_from(old, delete_schedules=True)
    timed = schedule("timed", time=datetime.datetime.now(datetime.timezone.utc))
    try:
        await source.startup()
        await source.add_schedule(timed)
        await source.add_schedule(schedule("dropped", cron="* * * * *"))
        await source.delete_schedule("dropped")
        found = {task.schedule_id for task in await source.get_schedules()}
        await source.post_send(timed)
        timed_left = await admin.exists(f"{prefix}:data:timed")
    finally:
        await source.shutdown()
        refusals = await acl_user.refusals() + await old_user.refusals()
        leftovers = [key async for key in admin.scan_iter(match=f"*{prefix}*")]
        if leftovers:
            await admin.delete(*leftovers)
    assert {"from-1.2", "migrated"} <= found
    assert "dropped" not in found
    assert timed_left == 0
    assert refusals == []


async def test_ops_cli(make_user: MakeUser) -> None:
    acl_user = await make_user("taskiq-redis queues, dead-letters, cancel")
    queue = acl_user.names.queue
    admin = acl_user.admin
    await admin.xadd(queue, {"data": "queued"})
    await admin.xgroup_create(queue, "taskiq", id="0")
    dead = "{" + queue + "}:dead"
    await admin.xadd(dead, {"data": "back", "reason": "test", "stream": queue, "id": "1-1"})
    await admin.zadd("{" + queue + "}:delayed", {"x": 1})

    def cli(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "taskiq_redis", *args, "--url", acl_user.url],
            capture_output=True,
            text=True,
            timeout=PATIENCE,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    try:
        named = await asyncio.to_thread(cli, "queues", queue)
        listed = await asyncio.to_thread(cli, "dead-letters", "list", queue)
        requeued = await asyncio.to_thread(cli, "dead-letters", "requeue", queue)
        await admin.xadd(dead, {"data": "gone", "reason": "test"})
        purged = await asyncio.to_thread(cli, "dead-letters", "purge", queue)
        await admin.xadd(queue, {"data": '{"task_id":"take-back"}'})
        cancelled = await asyncio.to_thread(cli, "cancel", queue, "take-back")
        length = await admin.xlen(queue)
        refusals = await acl_user.refusals()
    finally:
        await admin.delete(queue, dead, "{" + queue + "}:delayed")
    assert f"{queue}  stream  length 1  delayed 1  dead letters 1" in named
    assert "reason: test" in listed
    assert requeued.strip() == f"requeued 1 dead letters to {queue}"
    assert purged.strip() == f"purged 1 dead letters of {queue}"
    assert cancelled.strip() == "take-back: cancelled"
    assert length == 2
    assert refusals == []
