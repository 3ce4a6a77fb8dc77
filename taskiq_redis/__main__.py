"""Operators' command line: queues, dead letters, and the Lua scripts a deployment runs.

``python -m taskiq_redis`` (also installed as ``taskiq-redis``):

- ``queues [QUEUE ...]``: each queue's length, delayed and dead-letter counts, and per consumer
  group its pending entries, lag and consumers with their idle time (``--json`` for scripts).
- ``dead-letters list|requeue|purge QUEUE [ID ...]``: see, move back or delete a queue's dead
  letters, all of them, the oldest N, or those named by entry id.
- ``scripts list|show|load|check|manifest``: the Lua scripts.
- ``dashboard``: the same views (and the dead-letter actions, with ``--allow-actions``) in a web
  page, with Prometheus metrics; needs the ``dashboard`` extra (``docs/dashboard.md``).

Failures print one line to stderr and exit 1 (the server or the data) or 2 (bad usage), never
a traceback; ``docs/operations.md`` says what each command prints and exits with.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from redis.exceptions import RedisError

from taskiq_redis import connection, dead_letters, priorities, queues, scripts, task_ids
from taskiq_redis.exceptions import TaskIQRedisError


def _sentinel_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def _whole(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def _level(text: str) -> int:
    if not text.isdigit() or int(text) > priorities.MAX_PRIORITY_LIMIT:
        raise argparse.ArgumentTypeError(
            f"expected a priority level from 0 to {priorities.MAX_PRIORITY_LIMIT}, got {text!r}"
        )
    return int(text)


def _entry_id(text: str) -> str:
    try:
        return dead_letters.check_entry_id(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


URL_SCHEMES = ("redis", "rediss", "unix")


def url_problem(url: str) -> str | None:
    """Why redis-py would refuse ``url``, or None."""
    parts = urlsplit(url)
    if parts.scheme not in URL_SCHEMES:
        return f"expected a redis://, rediss:// or unix:// URL, got {url!r}"
    try:
        parts.port  # noqa: B018 (reading it checks it)
    except ValueError:
        return f"the port of {url!r} is not a number from 0 to 65535"
    return None


@dataclass
class Outcome:
    """What a command prints: ``lines`` on stdout, then each of ``errors`` and ``warnings`` as
    one line on stderr; an error makes the exit status 1."""

    lines: list[str]
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # printed like errors; exit status 0


def _server_options() -> argparse.ArgumentParser:
    """--url, or --sentinel with --master-name: the options of every command that connects."""
    options = argparse.ArgumentParser(add_help=False)
    target = options.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="redis:// URL of a server or of any cluster node")
    target.add_argument(
        "--sentinel",
        type=_sentinel_address,
        action="append",
        metavar="HOST:PORT",
        help="a sentinel (repeat for several); needs --master-name",
    )
    options.add_argument("--master-name", help="the sentinel's name for the primary")
    return options


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taskiq-redis", description=__doc__.splitlines()[0])
    groups = parser.add_subparsers(dest="group", required=True)
    server = _server_options()
    view = groups.add_parser(
        "queues",
        parents=[server],
        help="length, delayed, dead letters, groups and consumers of queues",
        description="Without QUEUE names, queues are found with SCAN ... TYPE on every primary: "
        "every stream and list (dead-letter streams count for their queue) and every sorted set "
        "named *:delayed; each scan stops after about --scan-limit keys. Name the queues to "
        "skip the scan, or when other data shares the database.",
    )
    view.add_argument("queue", nargs="*", help="queue names (default: found by scanning)")
    view.add_argument("--json", action="store_true", help="one JSON document")
    view.add_argument(
        "--scan-limit",
        type=_whole,
        default=queues.DEFAULT_SCAN_LIMIT,
        metavar="N",
        help=f"keys a scan examines per primary and type (default {queues.DEFAULT_SCAN_LIMIT})",
    )
    view.add_argument(
        "--max-priority",
        type=_level,
        default=queues.ALL_LEVELS,
        metavar="N",
        help="the highest priority level looked at (default: every level, "
        f"{queues.ALL_LEVELS}); the levels whose key exists are counted",
    )
    letters = groups.add_parser("dead-letters", help="a queue's dead letters").add_subparsers(
        dest="command", required=True
    )
    listing = letters.add_parser("list", parents=[server], help="the oldest dead letters")
    listing.add_argument("queue")
    listing.add_argument("--count", type=_whole, default=100, help="how many (default 100)")
    listing.add_argument("--json", action="store_true", help="one JSON document")
    requeue = letters.add_parser(
        "requeue",
        parents=[server],
        help="move dead letters back to their queue and level: all, the oldest N, or by id",
    )
    requeue.add_argument("queue")
    requeue.add_argument("ids", nargs="*", metavar="ID", type=_entry_id, help="entry ids")
    requeue.add_argument("--limit", type=_whole, help="the oldest N only (default all)")
    requeue.add_argument(
        "--max-priority",
        type=_level,
        default=queues.ALL_LEVELS,
        metavar="N",
        help="the highest level to requeue onto: a dead letter from a level above it goes to "
        "level N (default: every letter to its own level)",
    )
    purge = letters.add_parser(
        "purge",
        parents=[server],
        help="delete dead letters: those there are now, the oldest N, or by id",
    )
    purge.add_argument("queue")
    purge.add_argument("ids", nargs="*", metavar="ID", type=_entry_id, help="entry ids")
    purge.add_argument("--limit", type=_whole, help="the oldest N only (default all)")

    take_back = groups.add_parser(
        "cancel",
        parents=[server],
        help="delete queued or delayed tasks by id, so they never run",
        description="Each task that waits in QUEUE (queued at any priority level, or delayed) "
        "is deleted; one a worker holds or ran is left alone. Exits 1 when none was cancelled.",
    )
    take_back.add_argument("queue")
    take_back.add_argument("task_ids", nargs="+", metavar="TASK_ID")
    take_back.add_argument(
        "--consumer-group",
        default="",
        help="a stream queue's consumer group (default: its one group, else taskiq)",
    )
    take_back.add_argument(
        "--max-priority",
        type=_level,
        default=queues.ALL_LEVELS,
        metavar="N",
        help=f"the highest priority level looked at (default {queues.ALL_LEVELS})",
    )

    script_commands = groups.add_parser("scripts", help="the Lua scripts").add_subparsers(
        dest="command", required=True
    )
    script_commands.add_parser("list", help="name, version, sha1 and key count of every script")
    script_commands.add_parser("manifest", help="manifest lines (name, version, sha1)")
    show = script_commands.add_parser("show", help="print a script's source")
    show.add_argument("name")
    script_commands.add_parser("load", parents=[server], help="SCRIPT LOAD every script")
    script_commands.add_parser("check", parents=[server], help="which are loaded")

    board = groups.add_parser(
        "dashboard",
        parents=[server],
        help="a web page of queues, dead letters, schedules and scripts, and /metrics",
        description="Serves the dashboard (pip install 'taskiq-redis[dashboard]'); read-only "
        "unless --allow-actions. See docs/dashboard.md.",
    )
    board.add_argument("queue", nargs="*", help="queue names (default: found by scanning)")
    board.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    board.add_argument("--port", type=_port, default=8080, help="port to listen on (8080)")
    board.add_argument(
        "--allow-actions",
        action="store_true",
        help="show the buttons that requeue and purge dead letters and cancel waiting tasks "
        "(default: read-only)",
    )
    board.add_argument(
        "--schedule-prefix",
        default="schedule",
        help="the schedule sources' prefix (default: schedule, as theirs)",
    )
    board.add_argument(
        "--refresh",
        type=_whole,
        default=3,
        metavar="SECONDS",
        help="seconds between two refreshes of the queues and queue pages (default 3)",
    )
    board.add_argument(
        "--scan-limit",
        type=_whole,
        default=queues.DEFAULT_SCAN_LIMIT,
        metavar="N",
        help=f"keys a scan examines per primary and type (default {queues.DEFAULT_SCAN_LIMIT})",
    )
    return parser


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"expected a port from 1 to 65535, got {text!r}")
    return int(text)


# What the dashboard needs beyond the library: the packages of the ``dashboard`` extra.
DASHBOARD_PACKAGES = ("starlette", "uvicorn")


def _dashboard(args: argparse.Namespace) -> int:
    """Serve the dashboard until interrupted; one line and status 1 without the extra."""
    try:
        from taskiq_redis import dashboard
    except ImportError as error:
        missing = (error.name or "").split(".")[0]
        if missing not in DASHBOARD_PACKAGES:
            raise
        print(
            f"taskiq-redis: the dashboard needs {missing}, which is not installed: "
            "pip install 'taskiq-redis[dashboard]'",
            file=sys.stderr,
        )
        return 1
    app = dashboard.create_app(
        url=args.url,
        sentinels=args.sentinel,
        master_name=args.master_name,
        queue_names=args.queue,
        allow_actions=args.allow_actions,
        schedule_prefix=args.schedule_prefix,
        refresh=args.refresh,
        scan_limit=args.scan_limit,
    )
    dashboard.serve(app, args.host, args.port)
    return 0


async def _connect(args: argparse.Namespace) -> connection.RedisConnection:
    """A connection of the server's own topology: a cluster node answers with cluster_enabled."""
    if args.sentinel:
        return connection.sentinel(args.sentinel, args.master_name)
    probe = connection.single_node(args.url)
    try:
        info = await probe.execute("INFO", "cluster")
    finally:
        await probe.close()
    if info.get("cluster_enabled"):
        return connection.cluster(args.url)
    return connection.single_node(args.url)


async def _on_server(args: argparse.Namespace) -> Outcome:
    redis = await _connect(args)
    try:
        if args.group == "queues":
            return await _queues(redis, args)
        if args.group == "dead-letters":
            return await _dead_letters(redis, args)
        if args.group == "cancel":
            return await _cancel(redis, args)
        return await _scripts(redis, args)
    finally:
        await redis.close()


def _seconds(milliseconds: int) -> str:
    return f"{milliseconds / 1000:.1f}s"


async def _queues(redis: connection.RedisConnection, args: argparse.Namespace) -> Outcome:
    found = await queues.survey(
        redis, list(args.queue), args.scan_limit, args.max_priority, (queues.QueueError, RedisError)
    )
    views, problems, complete = found.views, found.problems, found.complete
    warnings = []
    if complete is False:
        warnings.append(
            "the scan stopped at --scan-limit on some primary; "
            "the list may miss queues (name them, or raise --scan-limit)"
        )
    if args.json:
        document = {
            "queues": [view.as_dict() for view in views],
            "scan_complete": complete,
            "problems": problems,
        }
        return Outcome([json.dumps(document, indent=2)], problems, warnings)
    lines = []
    for view in views:
        by_level = ""
        if view.levels and view.length is not None:
            counts = {**view.levels, 0: view.length - sum(view.levels.values())}
            by_level = (
                " (by priority "
                + ", ".join(f"{level}: {counts[level]}" for level in sorted(counts, reverse=True))
                + ")"
            )
        lines.append(
            f"{view.name}  {view.kind}  length {'-' if view.length is None else view.length}"
            f"{by_level}  delayed {view.delayed}  "
            f"dead letters {view.dead_letters}"
        )
        for group in view.groups:
            lag = "unknown" if group.lag is None else str(group.lag)
            lines.append(
                f"  group {group.name}  pending {group.pending}  lag {lag}  "
                f"consumers {len(group.consumers)}"
            )
            lines += [
                f"    consumer {c.name}  pending {c.pending}  idle {_seconds(c.idle_ms)}"
                for c in group.consumers
            ]
    if not lines and not problems:
        lines = ["no queues found"]
    return Outcome(lines, problems, warnings)


def _missing(queue: str, ids: list[str]) -> list[str]:
    if not ids:
        return []
    return [f"not dead letters of {queue!r}, left alone: {', '.join(ids)}"]


def _or(value: object) -> str:
    return "-" if value is None or value == "" else str(value)


async def _dead_letters(redis: connection.RedisConnection, args: argparse.Namespace) -> Outcome:
    if args.command == "requeue":
        missing: list[str] = []
        if args.ids:
            moved, skipped, missing = await dead_letters.requeue_dead_letter_ids(
                redis, args.queue, args.ids, args.max_priority
            )
        else:
            moved, skipped = await dead_letters.requeue_dead_letters(
                redis, args.queue, args.limit, args.max_priority
            )
        note = f" ({skipped} without a data field left in place)" if skipped else ""
        return Outcome(
            [f"requeued {moved} dead letters to {args.queue}{note}"], _missing(args.queue, missing)
        )
    if args.command == "purge":
        missing = []
        if args.ids:
            deleted, missing = await dead_letters.purge_dead_letter_ids(redis, args.queue, args.ids)
        else:
            deleted = await dead_letters.purge_dead_letters(redis, args.queue, args.limit)
        return Outcome(
            [f"purged {deleted} dead letters of {args.queue}"], _missing(args.queue, missing)
        )
    letters = await dead_letters.dead_letters(redis, args.queue, args.count)
    if args.json:
        return Outcome([json.dumps([letter.as_dict() for letter in letters], indent=2)])
    if not letters:
        return Outcome([f"no dead letters in {args.queue}"])
    return Outcome(
        [
            f"{letter.id}  task {_or(letter.task_name)} {_or(letter.task_id)}  "
            f"deliveries {_or(letter.deliveries)}  age {queues.age_text(letter.age_ms)}  "
            f"from {_or(letter.stream)} {_or(letter.original_id)}  group {_or(letter.group)}  "
            f"reason: {_or(letter.reason)}"
            for letter in letters
        ]
    )


async def _cancel(redis: connection.RedisConnection, args: argparse.Namespace) -> Outcome:
    view = await queues.inspect(redis, args.queue, max_priority=args.max_priority)
    queue = queues.cancel_queue(view, args.consumer_group)
    done = await task_ids.cancel_many(redis, queue, args.task_ids)
    lines = [f"{task_id}: {'cancelled' if ok else 'not queued'}" for task_id, ok in done.items()]
    return Outcome(lines, [] if any(done.values()) else ["no task was cancelled"])


async def _scripts(redis: connection.RedisConnection, args: argparse.Namespace) -> Outcome:
    known = list(scripts.all_scripts().values())
    if args.command == "load":
        await scripts.load(redis, known)
    flags = await scripts.loaded(redis, known)
    lines = [
        f"{script.name}\t{script.version}\t{script.sha1}\t{'loaded' if flag else 'missing'}"
        for script, flag in zip(known, flags, strict=True)
    ]
    missing = flags.count(False)
    errors = [
        f"{missing} of {len(known)} scripts are not loaded (`taskiq-redis scripts load` loads "
        "them; a worker loads those it uses at startup)"
    ]
    return Outcome(lines, errors if missing else [])


def _run(args: argparse.Namespace) -> Outcome:
    if args.group != "scripts":
        return asyncio.run(_on_server(args))
    if args.command == "list":
        rows = [("name", "version", "sha1", "keys")]
        for script in scripts.all_scripts().values():
            count = f"{script.num_keys}+" if script.variadic else str(script.num_keys)
            rows.append((script.name, str(script.version), script.sha1, count))
        width = max(len(row[0]) for row in rows)
        return Outcome([f"{row[0]:<{width}}  {row[1]:>7}  {row[2]}  {row[3]}" for row in rows])
    if args.command == "manifest":
        return Outcome([f"{s.name}\t{s.version}\t{s.sha1}" for s in scripts.all_scripts().values()])
    if args.command == "show":
        return Outcome([scripts.get(args.name).source.rstrip("\n")])
    return asyncio.run(_on_server(args))


def _usage_error(message: str) -> int:
    print(f"taskiq-redis: {message}", file=sys.stderr)
    return 2


def _print(lines: list[str]) -> bool:
    """Print the lines; False when the reader went away (``| head``): nothing is left to say."""
    try:
        if lines:
            print("\n".join(lines))
        sys.stdout.flush()
    except BrokenPipeError:
        # Python would report the pipe again when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return False
    return True


# The status of a program a closed pipe stopped (128 + SIGPIPE), as a shell reports it.
CLOSED_PIPE_STATUS = 141


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; the exit status is 0 on success, 1 on failure, 2 on bad usage.

    A reader that stops reading (``taskiq-redis queues | head -1``) ends it quietly with
    :data:`CLOSED_PIPE_STATUS`.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if getattr(args, "sentinel", None) and not args.master_name:
        parser.error("--sentinel needs --master-name")
    if getattr(args, "url", None) is not None and (problem := url_problem(args.url)):
        return _usage_error(f"--url: {problem}")
    if getattr(args, "ids", None) and args.limit is not None:
        return _usage_error(f"dead-letters {args.command}: give entry ids or --limit, not both")
    if args.group == "dashboard":
        return _dashboard(args)
    try:
        outcome = _run(args)
    except (TaskIQRedisError, RedisError, OSError, ValueError) as error:
        print(f"taskiq-redis: {error}", file=sys.stderr)
        return 1
    printed = _print(outcome.lines)
    for line in [*outcome.errors, *outcome.warnings]:
        print(f"taskiq-redis: {line}", file=sys.stderr)
    if not printed:
        return CLOSED_PIPE_STATUS
    return 1 if outcome.errors else 0


if __name__ == "__main__":
    sys.exit(main())
