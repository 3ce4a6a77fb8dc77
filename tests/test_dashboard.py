"""The dashboard over plain HTTP, against real servers of every topology.

The application runs in the test's process (httpx's ASGI transport), reaching Redis as an
operator's would; what Redis holds is put there by the package's own brokers and sources, and
what the pages say is compared with it. The browser tests are in test_dashboard_browser.py.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
import redis.asyncio
from taskiq import ScheduledTask

import taskiq_redis
from taskiq_redis import delays, keys, scripts
from taskiq_redis.dashboard import connect_to, create_app
from tests.command_counts import commands_during
from tests.dashboard_support import app_options, server_args
from tests.queue_kinds import KINDS, make_broker
from tests.queue_kinds import message as queue_message
from tests.servers import StandaloneServer, Topology
from tests.test_queues_cli import dead_letter_fields, five_kicked_two_held, kick, stream_broker
from tests.test_task_ids import waiting as waiting_count

TOKEN = re.compile(r'name="token" value="([^"]+)"')


class Client:
    """An HTTP client of one dashboard application, closed with its Redis connection."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://dashboard",
            follow_redirects=True,
        )

    async def close(self) -> None:
        await self.http.aclose()
        await self.app.state.dashboard.monitor.close()


@pytest.fixture
async def board(topology: Topology) -> AsyncIterator[Any]:
    """A factory of dashboards on ``topology``: ``await board(queue_names=[...], ...)``."""
    made: list[Client] = []

    async def make(**options: Any) -> httpx.AsyncClient:
        client = Client(create_app(**app_options(topology), **options))
        made.append(client)
        return client.http

    yield make
    for client in made:
        await client.close()


def message(task_name: str, task_id: str = "id-1") -> bytes:
    """A taskiq message as the JSON a broker sends."""
    return (
        b'{"task_id":"%s","task_name":"%s","labels":{},"labels_types":{},"args":[],"kwargs":{}}'
        % (task_id.encode(), task_name.encode())
    )


async def test_queues_metrics_and_json_show_what_is_in_redis(
    topology: Topology, raw_redis: Any, board: Any, unique: str
) -> None:
    queue, plain = f"view{unique}", f"plain{unique}"
    broker, listener = await five_kicked_two_held(topology, queue)
    await raw_redis.xadd(keys.dead_letter_key(queue), dead_letter_fields(b"x", queue, "1-1"))
    await raw_redis.lpush(plain, "a", "b", "c")
    http = await board(queue_names=[queue, plain])
    try:
        page = await http.get("/")
        assert page.status_code == 200
        row = re.search(rf'<tr data-queue="{queue}">(.*?)</tr>', page.text, re.S)
        assert row is not None, page.text
        assert '<td class="n" data-field="length">5</td>' in row.group(1)
        assert '<td class="n" data-field="dead">1</td>' in row.group(1)
        assert 'pending <span data-field="pending">2</span>' in row.group(1), row.group(1)
        assert 'lag <span data-field="lag">3</span>' in row.group(1)
        assert f"{broker.consumer_name}: pending 2, idle " in row.group(1)

        metrics = (await http.get("/metrics")).text
        expected = [
            "taskiq_redis_up 1",
            f'taskiq_redis_queue_length{{queue="{queue}",kind="stream",priority="0"}} 5',
            f'taskiq_redis_queue_length{{queue="{plain}",kind="list",priority="0"}} 3',
            f'taskiq_redis_queue_delayed{{queue="{queue}"}} 0',
            f'taskiq_redis_queue_dead_letters{{queue="{queue}"}} 1',
            f'taskiq_redis_group_pending{{queue="{queue}",group="taskiq"}} 2',
            f'taskiq_redis_group_lag{{queue="{queue}",group="taskiq"}} 3',
            f'taskiq_redis_group_consumers{{queue="{queue}",group="taskiq"}} 1',
        ]
        for line in expected:
            assert line in metrics.splitlines(), (line, metrics)

        document = (await http.get("/api/queues")).json()
        assert [view["name"] for view in document["queues"]] == [queue, plain]
        assert document["error"] is None
        # The last sample: (time, length, entries ever added, which Redis counts for a group).
        assert document["history"][queue][-1][1:] == [5, 5]
        assert document["history"][plain][-1][1:] == [3, None]
    finally:
        await listener.aclose()
        await broker.shutdown()


async def test_queue_page_lists_pending_delayed_and_dead_letters_as_text(
    topology: Topology, raw_redis: Any, board: Any, unique: str
) -> None:
    """Names from Redis are shown as the characters they are, markup included, in cells and in
    the cancel buttons' fields."""
    queue = f"<i>q{unique}</i>"
    hostile = "<script>alert(1)</script>"
    broker = stream_broker(topology, queue, xread_count=1)
    await broker.startup()
    await raw_redis.xadd(queue, {"data": message(hostile, "pending-id")})
    listener = broker.listen()
    await asyncio.wait_for(anext(listener), 10)
    await raw_redis.xadd(queue, {"data": message(hostile, "<b>waiting-id</b>")})
    due = await delays.add(
        broker.redis_connection, queue, message("later.task", "late-id"), 3_600_000
    )
    await raw_redis.xadd(
        keys.dead_letter_key(queue),
        {**dead_letter_fields(message(hostile, "dead-id"), queue, "1-1"), "reason": "<b>bad</b>"},
    )
    http = await board(queue_names=[queue])
    try:
        overview = (await http.get("/")).text
        assert "&lt;i&gt;q" in overview
        assert "<i>q" not in overview
        assert f'href="/queues/%3Ci%3Eq{unique}%3C%2Fi%3E"' in overview

        page = await http.get(f"/queues/%3Ci%3Eq{unique}%3C%2Fi%3E")
        assert page.status_code == 200
        assert "<script>alert" not in page.text
        escaped = "&lt;script&gt;alert(1)&lt;/script&gt;"
        pending = re.search(r'<table id="pending">(.*?)</table>', page.text, re.S)
        assert pending is not None
        assert escaped in pending.group(1)
        assert "pending-id" in pending.group(1)
        assert broker.consumer_name in pending.group(1)
        waiting = re.search(r'<table id="waiting">(.*?)</table>', page.text, re.S)
        assert waiting is not None
        assert f"<td>{escaped}</td><td>&lt;b&gt;waiting-id&lt;/b&gt;</td>" in waiting.group(1)
        delayed = re.search(r'<table id="delayed">(.*?)</table>', page.text, re.S)
        assert delayed is not None
        due_text = datetime.fromtimestamp(due / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        assert due_text in delayed.group(1)
        assert "later.task" in delayed.group(1)
        dead = re.search(r'<table id="dead-letters">(.*?)</table>', page.text, re.S)
        assert dead is not None
        assert escaped in dead.group(1)
        assert '<td data-field="reason">&lt;b&gt;bad&lt;/b&gt;</td>' in dead.group(1)
        # Read-only by default: no form, no token.
        assert "<form" not in page.text
        assert "start the dashboard with --allow-actions" in page.text
        assert "script-src 'nonce-" in page.headers["content-security-policy"]

        acting = await board(queue_names=[queue], allow_actions=True)
        page = await acting.get(f"/queues/%3Ci%3Eq{unique}%3C%2Fi%3E")
        assert "<b>waiting" not in page.text
        assert '<input type="hidden" name="task_id" value="&lt;b&gt;waiting-id&lt;/b&gt;">' in (
            page.text
        )
        assert 'data-confirm="Cancel task &lt;b&gt;waiting-id&lt;/b&gt;? It will never run."' in (
            page.text
        )
    finally:
        await listener.aclose()
        await broker.shutdown()


async def test_actions_are_refused_unless_allowed_and_with_the_token(
    topology: Topology, raw_redis: Any, board: Any, unique: str
) -> None:
    queue = f"act{unique}"
    dead_key = keys.dead_letter_key(queue)
    await raw_redis.xadd(queue, {"data": b"m"})
    first = await raw_redis.xadd(dead_key, dead_letter_fields(message("a.task"), queue, "1-1"))
    await raw_redis.xadd(dead_key, dead_letter_fields(message("b.task"), queue, "2-1"))
    await raw_redis.xadd(dead_key, dead_letter_fields(message("c.task"), queue, "3-1"))
    first_id = first.decode()

    read_only = await board(queue_names=[queue])
    refused = await read_only.post(
        "/actions/purge", data={"queue": queue, "token": "anything"}, follow_redirects=False
    )
    assert refused.status_code == 403
    assert "Refused: this dashboard is read-only" in refused.text
    assert (await read_only.get("/actions/purge")).status_code == 405  # never by GET

    http = await board(queue_names=[queue], allow_actions=True)
    page = await http.get(f"/queues/{queue}")
    token_match = TOKEN.search(page.text)
    assert token_match is not None
    token = token_match.group(1)
    wrong = await http.post(
        "/actions/purge", data={"queue": queue, "token": token + "x"}, follow_redirects=False
    )
    assert wrong.status_code == 403
    assert "the form&#x27;s token is not this dashboard&#x27;s" in wrong.text
    assert await raw_redis.xlen(dead_key) == 3  # nothing was done by refused requests

    purged = await http.post(
        "/actions/purge", data={"queue": queue, "token": token, "id": first_id}
    )
    assert purged.status_code == 200
    assert f"Purged 1 dead letters of {queue}." in purged.text
    assert await raw_redis.xlen(dead_key) == 2

    missing = await http.post(
        "/actions/requeue", data={"queue": queue, "token": token, "id": first_id}
    )
    assert f"Not dead letters of {queue}, left alone: {first_id}." in missing.text
    assert 'class="banner error"' in missing.text

    requeued = await http.post("/actions/requeue", data={"queue": queue, "token": token})
    assert f"Requeued 2 dead letters to {queue}." in requeued.text
    assert (await raw_redis.xlen(dead_key), await raw_redis.xlen(queue)) == (0, 3)
    assert "No dead letters." in requeued.text

    failed = await http.post("/actions/requeue", data={"queue": f"nothing{unique}", "token": token})
    assert f"Requeue failed: no queue &#x27;nothing{unique}&#x27;" in failed.text


@pytest.mark.filterwarnings("ignore:RedisScheduleSource is deprecated")
async def test_schedules_of_both_sources_with_their_next_run(
    topology: Topology, board: Any, unique: str
) -> None:
    prefix = f"sched{unique}"
    suffix = topology.pick(single="", cluster="Cluster", sentinel="Sentinel")
    listed = getattr(taskiq_redis, f"ListRedis{suffix}ScheduleSource")(
        **topology.kwargs(), prefix=prefix
    )
    keyed = getattr(taskiq_redis, f"Redis{suffix}ScheduleSource")(
        **topology.kwargs(), prefix=prefix
    )
    at = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(days=2)
    try:
        await listed.startup()
        await keyed.startup()
        await listed.add_schedule(
            ScheduledTask(
                task_name="<b>nightly</b>",
                labels={},
                args=[],
                kwargs={},
                schedule_id="nightly",
                cron="30 2 * * *",
            )
        )
        await listed.add_schedule(
            ScheduledTask(
                task_name="once", labels={}, args=[], kwargs={}, schedule_id="once", time=at
            )
        )
        await keyed.add_schedule(
            ScheduledTask(
                task_name="often",
                labels={},
                args=[],
                kwargs={},
                schedule_id="often",
                interval=timedelta(seconds=30),
            )
        )
        http = await board(schedule_prefix=prefix)
        page = (await http.get("/schedules")).text
        rows = dict(re.findall(r'<tr data-schedule="([^"]+)">(.*?)</tr>', page, re.S))
        assert set(rows) == {"nightly", "once", "often"}
        assert (
            "<td>list</td><td>&lt;b&gt;nightly&lt;/b&gt;</td><td>30 2 * * *</td>" in rows["nightly"]
        )
        next_nightly = datetime.now(timezone.utc).replace(hour=2, minute=30, second=0)
        if next_nightly <= datetime.now(timezone.utc):
            next_nightly += timedelta(days=1)
        assert next_nightly.strftime("%Y-%m-%d 02:30:00 UTC") in rows["nightly"]
        assert at.strftime("%Y-%m-%d %H:%M:%S UTC") in rows["once"]
        assert "<td>key</td><td>often</td>" in rows["often"]
        assert "interval: the scheduler counts from its own start" in rows["often"]
    finally:
        await listed.shutdown()
        await keyed.shutdown()


async def test_scripts_page_shows_each_primary(topology: Topology, board: Any) -> None:
    http = await board(queue_names=["unused"])
    known = scripts.all_scripts()
    options = app_options(topology)
    conn = await connect_to(
        options.get("url"), options.get("sentinels"), options.get("master_name")
    )
    try:
        await scripts.load(conn, list(known.values()))  # on every primary of a cluster
    finally:
        await conn.close()
    page = (await http.get("/scripts")).text
    columns = re.findall(r"<th>([^<]+)</th>", page)[3:]
    assert len(columns) == topology.pick(single=1, cluster=3, sentinel=1)
    for name in known:
        row = re.search(rf'<tr data-script="{name}">(.*?)</tr>', page, re.S)
        assert row is not None, name
        assert row.group(1).count("<td>loaded</td>") == len(columns), row.group(1)


async def test_a_refresh_costs_no_more_than_the_queues_command_and_never_keys(
    unique: str,
) -> None:
    """INFO commandstats of a server of this test's own: one refresh of the page costs what
    ``taskiq-redis queues`` costs, a second one within the refresh interval costs nothing."""
    with StandaloneServer() as server:
        server.start()
        raw = redis.asyncio.Redis.from_url(server.url)
        topology = server.topology()
        broker = stream_broker(topology, f"cost{unique}")
        await broker.startup()
        await kick(broker, "one")
        await raw.lpush(f"list{unique}", "m")

        async def spent(action: Any) -> dict[str, int]:
            return (await commands_during(raw, action()))[0]

        app = create_app(url=server.url, refresh=30)
        client = Client(app)
        try:
            await client.http.get("/fragments/queues")  # connected, as after the first look

            async def cli() -> None:
                done = await asyncio.to_thread(
                    subprocess.run,
                    [sys.executable, "-m", "taskiq_redis", "queues", *server_args(topology)],
                    capture_output=True,
                    check=True,
                )
                assert f"cost{unique}" in done.stdout.decode()

            command = await spent(cli)
            app.state.dashboard.monitor.invalidate()  # as when the refresh interval has passed
            page = await spent(lambda: client.http.get("/fragments/queues"))
            again = await spent(lambda: client.http.get("/"))
        finally:
            await client.close()
            await broker.shutdown()
            await raw.aclose()
    assert sum(page.values()) <= sum(command.values()), (page, command)
    assert "cmdstat_keys" not in page
    assert again == {}


def test_the_command_says_in_one_line_when_the_extra_is_missing() -> None:
    blocked = (
        "import sys; sys.modules['starlette'] = None; "
        "from taskiq_redis.__main__ import main; "
        "sys.exit(main(['dashboard', '--url', 'redis://127.0.0.1:1']))"
    )
    done = subprocess.run(
        [sys.executable, "-c", blocked], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 1
    assert done.stderr == (
        "taskiq-redis: the dashboard needs starlette, which is not installed: "
        "pip install 'taskiq-redis[dashboard]'\n"
    )


@pytest.mark.parametrize("kind", KINDS)
async def test_cancel_by_button_or_id_says_what_it_did_and_is_refused_without_leave(
    kind: str, topology: Topology, raw_redis: Any, board: Any, unique: str
) -> None:
    """Waiting tasks (level 0 and above) and a delayed one are cancelled (their rows and
    counts go); a task a worker took, an unknown id, an empty id or a group the queue lacks
    are not, and say so."""
    queue = f"cancel{kind}{unique}"
    broker = make_broker(kind, topology, queue)
    await broker.startup()
    for name in ("taken", "target", "other"):
        await broker.kick(queue_message(name))
    await broker.kick(queue_message("parked", delay=3600))
    await broker.kick(queue_message("urgent", priority=2))
    # A worker takes the oldest: a stream entry delivered and not acknowledged; a list
    # message popped.
    if kind == "stream":
        await raw_redis.xreadgroup("taskiq", "worker-1", {queue: ">"}, count=1)
    else:
        assert b'"task_id":"taken"' in await raw_redis.rpop(queue)
    held = 1 if kind == "stream" else 0  # still in the stream, which XLEN counts
    try:
        read_only = await board(queue_names=[queue])
        page = (await read_only.get(f"/queues/{queue}")).text
        assert 'data-task="target"' in page
        assert "<form" not in page
        assert "to cancel waiting tasks" in page
        refused = await read_only.post(
            "/actions/cancel", data={"queue": queue, "token": "t", "task_id": "target"}
        )
        assert refused.status_code == 403
        assert "Refused: this dashboard is read-only" in refused.text

        http = await board(queue_names=[queue], allow_actions=True)
        page = (await http.get(f"/queues/{queue}")).text
        waiting = re.search(r'<table id="waiting">(.*?)</table>', page, re.S)
        assert waiting is not None, page
        listed = re.findall(r'data-task="([^"]*)"', waiting.group(1))
        assert listed == ["urgent", "target", "other"]
        assert 'name="task_id" value="target"' in waiting.group(1)
        delayed = re.search(r'<table id="delayed">(.*?)</table>', page, re.S)
        assert delayed is not None
        assert 'name="task_id" value="parked"' in delayed.group(1)
        assert '<form method="post" action="/actions/cancel" id="cancel-by-id">' in page
        token_match = TOKEN.search(page)
        assert token_match is not None
        token = token_match.group(1)

        async def cancel(task_id: str, token: str = token, **more: str) -> httpx.Response:
            fields = {"queue": queue, "token": token, "task_id": task_id, **more}
            answer: httpx.Response = await http.post("/actions/cancel", data=fields)
            return answer

        wrong = await cancel("target", token + "x")
        assert wrong.status_code == 403
        assert "the form&#x27;s token is not this dashboard&#x27;s" in wrong.text
        assert await waiting_count(raw_redis, kind, queue) == 3 + held

        urgent = await cancel("urgent")  # by id, as the form sends it: found at its level
        assert "urgent: cancelled" in urgent.text
        assert await waiting_count(raw_redis, kind, queue) == 2 + held

        done = await cancel("target")
        assert f"target: cancelled; it was waiting in {queue} and will never run." in done.text
        assert 'class="banner ok"' in done.text
        assert 'data-task="target"' not in done.text
        assert await waiting_count(raw_redis, kind, queue) == 1 + held

        parked = await cancel("parked")
        assert "parked: cancelled" in parked.text
        assert '<td data-field="delayed">0</td>' in parked.text
        assert await raw_redis.zcard(keys.delayed_key(queue)) == 0

        for task_id in ("taken", "nobody", "target"):  # held by a worker, unknown, gone
            answer = await cancel(task_id)
            assert f"{task_id}: not queued in {queue} (a worker holds it or ran it" in answer.text
            assert 'class="banner error"' in answer.text
        assert "Cancel refused: give the id" in (await cancel(" ")).text
        if kind == "stream":
            other = await cancel("other", group="elsewhere")
            assert f"Cancel failed: &#x27;{queue}&#x27; has no consumer group" in other.text
        assert await waiting_count(raw_redis, kind, queue) == 1 + held
    finally:
        await broker.shutdown()
