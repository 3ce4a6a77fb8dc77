"""Operators' command line: queues, dead letters, and the Lua scripts a deployment runs.

``python -m taskiq_redis`` (also installed as ``taskiq-redis``):

- ``queues [QUEUE ...]``: each queue's length, delayed and dead-letter counts, and per consumer
  group its pending entries, lag and consumers with their idle time (``--json`` for scripts).
- ``dead-letters list|requeue|purge QUEUE``: see, move back or delete a queue's dead letters.
- ``scripts list|show|load|check|manifest``: the Lua scripts.

Failures print one line to stderr and exit 1 (the server or the data) or 2 (bad usage), never
a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence

from redis.exceptions import RedisError

from taskiq_redis import connection, queues, scripts
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
        help="move dead letters back to their queue, oldest first (atomic per batch)",
    )
    requeue.add_argument("queue")
    requeue.add_argument("--limit", type=_whole, help="move at most this many (default all)")
    purge = letters.add_parser(
        "purge", parents=[server], help="delete the dead letters there are now"
    )
    purge.add_argument("queue")

    script_commands = groups.add_parser("scripts", help="the Lua scripts").add_subparsers(
        dest="command", required=True
    )
    script_commands.add_parser("list", help="name, version, sha1 and key count of every script")
    script_commands.add_parser("manifest", help="manifest lines (name, version, sha1)")
    show = script_commands.add_parser("show", help="print a script's source")
    show.add_argument("name")
    script_commands.add_parser("load", parents=[server], help="SCRIPT LOAD every script")
    script_commands.add_parser("check", parents=[server], help="which are loaded")
    return parser


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


async def _on_server(args: argparse.Namespace) -> list[str]:
    redis = await _connect(args)
    try:
        if args.group == "queues":
            return await _queues(redis, args)
        if args.group == "dead-letters":
            return await _dead_letters(redis, args)
        return await _scripts(redis, args)
    finally:
        await redis.close()


def _seconds(milliseconds: int) -> str:
    return f"{milliseconds / 1000:.1f}s"


async def _queues(redis: connection.RedisConnection, args: argparse.Namespace) -> list[str]:
    names, complete = list(args.queue), None
    if not names:
        names, complete = await queues.discover(redis, args.scan_limit)
        if not complete:
            print(
                "taskiq-redis: the scan stopped at --scan-limit on some primary; "
                "the list may miss queues (name them, or raise --scan-limit)",
                file=sys.stderr,
            )
    views = [await queues.inspect(redis, name, strict=complete is None) for name in names]
    if args.json:
        document = {"queues": [view.as_dict() for view in views], "scan_complete": complete}
        return [json.dumps(document, indent=2)]
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
    return lines or ["no queues found"]


async def _dead_letters(redis: connection.RedisConnection, args: argparse.Namespace) -> list[str]:
    if args.command == "requeue":
        moved, skipped = await queues.requeue_dead_letters(redis, args.queue, args.limit)
        note = f" ({skipped} without a data field left in place)" if skipped else ""
        return [f"requeued {moved} dead letters to {args.queue}{note}"]
    if args.command == "purge":
        deleted = await queues.purge_dead_letters(redis, args.queue)
        return [f"purged {deleted} dead letters of {args.queue}"]
    letters = await queues.dead_letters(redis, args.queue, args.count)
    if args.json:
        return [json.dumps([letter.as_dict() for letter in letters], indent=2)]
    return [
        f"{letter.id}  from {letter.stream} {letter.original_id}  group {letter.group}  "
        f"deliveries {letter.deliveries}  reason: {letter.reason}"
        for letter in letters
    ]


async def _scripts(redis: connection.RedisConnection, args: argparse.Namespace) -> list[str]:
    known = list(scripts.all_scripts().values())
    if args.command == "load":
        await scripts.load(redis, known)
    flags = await scripts.loaded(redis, known)
    return [
        f"{script.name}\t{script.version}\t{script.sha1}\t{'loaded' if flag else 'missing'}"
        for script, flag in zip(known, flags, strict=True)
    ]


def _lines(args: argparse.Namespace) -> list[str]:
    if args.group != "scripts":
        return asyncio.run(_on_server(args))
    if args.command == "list":
        rows = [("name", "version", "sha1", "keys")]
        for script in scripts.all_scripts().values():
            count = f"{script.num_keys}+" if script.variadic else str(script.num_keys)
            rows.append((script.name, str(script.version), script.sha1, count))
        width = max(len(row[0]) for row in rows)
        return [f"{row[0]:<{width}}  {row[1]:>7}  {row[2]}  {row[3]}" for row in rows]
    if args.command == "manifest":
        return [f"{s.name}\t{s.version}\t{s.sha1}" for s in scripts.all_scripts().values()]
    if args.command == "show":
        return [scripts.get(args.name).source.rstrip("\n")]
    return asyncio.run(_on_server(args))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; the exit status is 0 on success, 1 on failure, 2 on bad usage."""
    parser = _parser()
    args = parser.parse_args(argv)
    if getattr(args, "sentinel", None) and not args.master_name:
        parser.error("--sentinel needs --master-name")
    try:
        print("\n".join(_lines(args)))
    except (TaskIQRedisError, RedisError, OSError) as error:
        print(f"taskiq-redis: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
