"""Issue 24: the operators' command line on real servers, as an operator runs it.

Every command runs as ``python -m taskiq_redis`` in a subprocess, so the exit status, stdout
and stderr asserted are what a shell sees. Keys are written the way the package's brokers write
them (tests/test_queues_cli.py checks that the brokers do).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
from taskiq import TaskiqMessage
from taskiq.formatters.json_formatter import JSONFormatter
from taskiq.kicker import AsyncKicker

import taskiq_redis
from taskiq_redis import keys, scripts
from tests.servers import Topology
from tests.test_queues_cli import dead_letter_fields, run_cli, server_args, stream_class

ENTRY_ID = re.compile(r"\d+-\d+")


def one_line_error(done: subprocess.CompletedProcess[str], code: int, *parts: str) -> str:
    """The single stderr line of a failed command, checked for its status and contents."""
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    [line] = [line for line in done.stderr.splitlines() if line.strip()]
    assert line.startswith("taskiq-redis: "), line
    for part in parts:
        assert part in line, line
    return line


@pytest.fixture
async def odd_keys(raw_redis: Any) -> AsyncIterator[list[str]]:
    """Keys a test adds that make the database's queues unreadable: deleted after the test, so
    a scan of the shared servers by a later test (tests/test_queues_cli.py) finds none."""
    made: list[str] = []
    yield made
    for key in made:  # one by one: on a cluster they live in different slots
        await raw_redis.delete(key)


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def kick_to_level(topology: Topology, queue: str, level: int, name: str) -> None:
    """A task kicked by a producer whose max_priority is 20."""
    broker = getattr(taskiq_redis, stream_class(topology))(
        **topology.kwargs(), queue_name=queue, max_priority=20
    )
    await broker.startup()
    try:
        kicker: AsyncKicker[[str], None] = AsyncKicker("ops_app.record", broker, {})
        await kicker.with_labels(priority=level).kiq(name)
    finally:
        await broker.shutdown()


# ---------------------------------------------------------------- 1: levels above 9


async def test_levels_above_nine_are_counted_and_requeued_onto_their_level(
    topology: Topology, raw_redis: Any, unique: str
) -> None:
    queue = f"high{unique}"
    level_15 = keys.priority_key(queue, 15)
    await kick_to_level(topology, queue, 15, "urgent")
    await kick_to_level(topology, queue, 0, "plain")
    dead = keys.dead_letter_key(queue)
    for number in range(2):
        await raw_redis.xadd(dead, dead_letter_fields(f"m{number}".encode(), level_15, "1-1"))

    shown = run_cli("queues", queue, *server_args(topology))
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[0] == (
        f"{queue}  stream  length 2 (by priority 15: 1, 0: 1)  delayed 0  dead letters 2"
    )
    document = json.loads(run_cli("queues", queue, "--json", *server_args(topology)).stdout)
    assert document["queues"][0]["levels"] == {"15": 1}
    capped = run_cli("queues", queue, "--max-priority", "9", *server_args(topology))
    assert capped.stdout.splitlines()[0].startswith(f"{queue}  stream  length 1  ")

    requeued = run_cli("dead-letters", "requeue", queue, "--limit", "1", *server_args(topology))
    assert requeued.stdout.strip() == f"requeued 1 dead letters to {queue}", requeued.stderr
    assert [fields[b"data"] for _, fields in (await raw_redis.xrange(level_15))[-1:]] == [b"m0"]
    assert await raw_redis.xlen(queue) == 1  # level 0 got nothing

    # --max-priority 12: a dead letter from level 15 goes to level 12, the highest allowed.
    lowered = run_cli(
        "dead-letters", "requeue", queue, "--max-priority", "12", *server_args(topology)
    )
    assert lowered.stdout.strip() == f"requeued 1 dead letters to {queue}", lowered.stderr
    level_12 = await raw_redis.xrange(keys.priority_key(queue, 12))
    assert [fields[b"data"] for _, fields in level_12] == [b"m1"]


# ---------------------------------------------------------------- 2: malformed URLs


@pytest.mark.parametrize(
    "args",
    [
        ["queues", "--url", "localhost:7000"],
        ["scripts", "check", "--url", "http://127.0.0.1:7000"],
        ["scripts", "load", "--url", "redis://127.0.0.1:port"],
        ["dead-letters", "list", "q", "--url", "http://x"],
        ["dead-letters", "requeue", "q", "--url", "x"],
        ["dead-letters", "purge", "q", "--url", "127.0.0.1:6379"],
    ],
)
def test_a_malformed_url_is_a_one_line_usage_error(args: list[str]) -> None:
    url = args[args.index("--url") + 1]
    done = run_cli(*args)
    one_line_error(done, 2, "--url", repr(url))
    assert done.stdout == ""


# ---------------------------------------------------------------- 3: a stray key


async def test_a_stray_key_is_reported_beside_the_queues_it_does_not_hide(
    topology: Topology, raw_redis: Any, unique: str, odd_keys: list[str]
) -> None:
    odd, fine, listed = f"odd{unique}", f"fine{unique}", f"listed{unique}"
    stray = keys.priority_key(odd, 3)
    odd_keys.append(stray)
    await raw_redis.xadd(odd, {"data": "x"})
    await raw_redis.lpush(stray, "stray")  # a list beside a stream queue
    await raw_redis.xadd(fine, {"data": "y"})
    await raw_redis.lpush(listed, "z")

    for args in (["queues"], ["queues", fine, odd, listed]):
        done = run_cli(*args, *server_args(topology))
        assert done.returncode == 1, done.stderr
        assert "Traceback" not in done.stderr
        assert f"{fine}  stream  length 1  delayed 0  dead letters 0" in done.stdout
        assert f"{listed}  list  length 1  delayed 0  dead letters 0" in done.stdout
        assert f"taskiq-redis: priority level 3 of {odd!r} ({stray!r}) is a Redis list" in (
            done.stderr
        )
    as_json = run_cli("queues", fine, odd, "--json", *server_args(topology))
    assert as_json.returncode == 1
    document = json.loads(as_json.stdout)
    assert [view["name"] for view in document["queues"]] == [fine]
    [problem] = document["problems"]
    assert stray in problem


# ---------------------------------------------------------------- 4: mistakes are loud


@pytest.mark.parametrize("command", ["list", "requeue", "purge"])
async def test_dead_letter_commands_refuse_what_is_no_queue(
    topology: Topology, raw_redis: Any, unique: str, command: str, odd_keys: list[str]
) -> None:
    typo, text_key, broken = f"typo{unique}", f"str{unique}", f"broken{unique}"
    odd_keys.append(keys.dead_letter_key(broken))
    await raw_redis.set(text_key, "value")
    await raw_redis.xadd(broken, {"data": "x"})
    await raw_redis.set(keys.dead_letter_key(broken), "not a stream")

    missing = run_cli("dead-letters", command, typo, *server_args(topology))
    one_line_error(missing, 1, f"no queue {typo!r}", keys.dead_letter_key(typo))
    assert missing.stdout == ""
    a_string = run_cli("dead-letters", command, text_key, *server_args(topology))
    one_line_error(a_string, 1, f"{text_key!r} is a Redis string, not a stream or list queue")
    wrong_dead = run_cli("dead-letters", command, broken, *server_args(topology))
    one_line_error(wrong_dead, 1, repr(keys.dead_letter_key(broken)), "are a Redis string")


async def test_queues_name_a_delayed_key_of_the_wrong_type(
    topology: Topology, raw_redis: Any, unique: str, odd_keys: list[str]
) -> None:
    queue = f"wd{unique}"
    odd_keys.append(keys.delayed_key(queue))
    await raw_redis.lpush(queue, "x")
    await raw_redis.set(keys.delayed_key(queue), "not a sorted set")
    done = run_cli("queues", queue, *server_args(topology))
    one_line_error(done, 1, repr(keys.delayed_key(queue)), "are a Redis string, not a sorted set")


async def test_scripts_check_fails_while_a_script_is_missing(
    topology: Topology, raw_redis: Any
) -> None:
    await raw_redis.script_flush()  # on a cluster: every primary
    total = len(scripts.all_scripts())
    missing = run_cli("scripts", "check", *server_args(topology))
    one_line_error(missing, 1, f"{total} of {total} scripts are not loaded")
    assert missing.stdout.count("\tmissing") == total
    loaded = run_cli("scripts", "load", *server_args(topology))
    assert loaded.returncode == 0, loaded.stderr
    checked = run_cli("scripts", "check", *server_args(topology))
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.count("\tloaded") == total
    assert checked.stderr == ""


def run_into_a_closed_pipe(*args: str) -> tuple[int, str]:
    """Run the command with its stdout a pipe whose reader is gone (``| head`` that quit)."""
    reader, writer = os.pipe()
    os.close(reader)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "taskiq_redis", *args],
            stdout=writer,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(writer)
    return done.returncode, done.stderr


async def test_a_closed_pipe_ends_the_output_quietly(
    topology: Topology, raw_redis: Any, unique: str
) -> None:
    names = [f"pipe{unique}{number}" for number in range(3)]
    for name in names:
        await raw_redis.lpush(name, "x")
    for args in (["scripts", "list"], ["queues", *names, *server_args(topology)]):
        status, stderr = run_into_a_closed_pipe(*args)
        assert status == 141, stderr  # as a shell reports a program SIGPIPE stopped
        assert stderr == ""


# ---------------------------------------------------------------- 8: one dead letter at a time


def taskiq_message(task_name: str, task_id: str) -> bytes:
    """A message as taskiq's default formatter writes it."""
    message = TaskiqMessage(task_id=task_id, task_name=task_name, labels={}, args=[], kwargs={})
    return JSONFormatter().dumps(message).message


async def test_dead_letters_list_shows_task_deliveries_reason_and_age(
    topology: Topology, raw_redis: Any, unique: str
) -> None:
    queue = f"show{unique}"
    dead = keys.dead_letter_key(queue)
    await raw_redis.xadd(queue, {"data": "x"})
    with_task = text(
        await raw_redis.xadd(
            dead, dead_letter_fields(taskiq_message("app.send_mail", "t-42"), queue, "5-1")
        )
    )
    bare = text(await raw_redis.xadd(dead, {"reason": "no data"}))
    not_json = text(await raw_redis.xadd(dead, {"data": b"\xff\x00"}))

    done = run_cli("dead-letters", "list", queue, *server_args(topology))
    assert done.returncode == 0, done.stderr
    first, second, third = done.stdout.splitlines()
    assert re.fullmatch(
        rf"{with_task}  task app\.send_mail t-42  deliveries 3  age \d+s  from {queue} 5-1  "
        r"group g  reason: test",
        first,
    ), first
    assert re.fullmatch(
        rf"{bare}  task - -  deliveries -  age \d+s  from - -  group -  reason: no data", second
    ), second
    assert third.startswith(f"{not_json}  task - -  deliveries -  ")
    assert "None" not in done.stdout

    letters = json.loads(
        run_cli("dead-letters", "list", queue, "--json", *server_args(topology)).stdout
    )
    assert (letters[0]["task_name"], letters[0]["task_id"]) == ("app.send_mail", "t-42")
    assert letters[0]["age_ms"] >= 0
    assert (letters[1]["task_name"], letters[1]["deliveries"]) == (None, None)

    empty = f"empty{unique}"
    await raw_redis.xadd(empty, {"data": "x"})
    nothing = run_cli("dead-letters", "list", empty, *server_args(topology))
    assert (nothing.returncode, nothing.stdout.strip()) == (0, f"no dead letters in {empty}")


async def test_requeue_and_purge_take_entry_ids(
    topology: Topology, raw_redis: Any, unique: str
) -> None:
    queue = f"ids{unique}"
    dead = keys.dead_letter_key(queue)
    ids = [
        text(await raw_redis.xadd(dead, dead_letter_fields(f"m{n}".encode(), queue, f"{n}-1")))
        for n in range(5)
    ]

    requeued = run_cli("dead-letters", "requeue", queue, ids[3], ids[1], *server_args(topology))
    assert (requeued.returncode, requeued.stdout.strip()) == (
        0,
        f"requeued 2 dead letters to {queue}",
    ), requeued.stderr
    assert sorted(fields[b"data"] for _, fields in await raw_redis.xrange(queue)) == [b"m1", b"m3"]

    purged = run_cli("dead-letters", "purge", queue, ids[0], *server_args(topology))
    assert (purged.returncode, purged.stdout.strip()) == (0, f"purged 1 dead letters of {queue}")
    left = [text(entry_id) for entry_id, _ in await raw_redis.xrange(dead)]
    assert left == [ids[2], ids[4]]

    # An id that is no dead letter (a typo, or one already requeued) is named; the rest is done.
    again = run_cli("dead-letters", "requeue", queue, ids[1], ids[2], *server_args(topology))
    assert again.stdout.strip() == f"requeued 1 dead letters to {queue}"
    one_line_error(again, 1, f"not dead letters of {queue!r}", ids[1])
    gone = run_cli("dead-letters", "purge", queue, "1-1", ids[4], *server_args(topology))
    assert gone.stdout.strip() == f"purged 1 dead letters of {queue}"
    one_line_error(gone, 1, "1-1")
    assert await raw_redis.xlen(dead) == 0

    both = run_cli("dead-letters", "purge", queue, ids[0], "--limit", "1", *server_args(topology))
    one_line_error(both, 2, "entry ids or --limit, not both")
    bad = run_cli("dead-letters", "requeue", queue, "yesterday", *server_args(topology))
    assert bad.returncode == 2
    assert "entry id like 1712345678901-0, got 'yesterday'" in bad.stderr


async def test_purge_the_oldest_n(topology: Topology, raw_redis: Any, unique: str) -> None:
    queue = f"oldest{unique}"
    dead = keys.dead_letter_key(queue)
    ids = [text(await raw_redis.xadd(dead, {"data": f"m{n}"})) for n in range(4)]
    done = run_cli("dead-letters", "purge", queue, "--limit", "3", *server_args(topology))
    assert (done.returncode, done.stdout.strip()) == (0, f"purged 3 dead letters of {queue}")
    assert [text(entry_id) for entry_id, _ in await raw_redis.xrange(dead)] == [ids[3]]
