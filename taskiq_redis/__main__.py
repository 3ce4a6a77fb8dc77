"""Operators' command line: see, load and check the Lua scripts a deployment runs.

``python -m taskiq_redis scripts list|show|load|check|manifest`` (also ``taskiq-redis``).
Failures print one line to stderr and exit non-zero, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from redis.exceptions import RedisError

from taskiq_redis import connection, scripts
from taskiq_redis.exceptions import TaskIQRedisError


def _sentinel_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taskiq-redis", description=__doc__.splitlines()[0])
    groups = parser.add_subparsers(dest="group", required=True)
    script_commands = groups.add_parser("scripts", help="the Lua scripts").add_subparsers(
        dest="command", required=True
    )
    script_commands.add_parser("list", help="name, version, sha1 and key count of every script")
    script_commands.add_parser("manifest", help="manifest lines (name, version, sha1)")
    show = script_commands.add_parser("show", help="print a script's source")
    show.add_argument("name")
    for name, text in (("load", "SCRIPT LOAD every script"), ("check", "which are loaded")):
        command = script_commands.add_parser(name, help=text)
        target = command.add_mutually_exclusive_group(required=True)
        target.add_argument("--url", help="redis:// URL of a server or of any cluster node")
        target.add_argument(
            "--sentinel",
            type=_sentinel_address,
            action="append",
            metavar="HOST:PORT",
            help="a sentinel (repeat for several); needs --master-name",
        )
        command.add_argument("--master-name", help="the sentinel's name for the primary")
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
    known = list(scripts.all_scripts().values())
    redis = await _connect(args)
    try:
        if args.command == "load":
            await scripts.load(redis, known)
        flags = await scripts.loaded(redis, known)
    finally:
        await redis.close()
    return [
        f"{script.name}\t{script.version}\t{script.sha1}\t{'loaded' if flag else 'missing'}"
        for script, flag in zip(known, flags, strict=True)
    ]


def _lines(args: argparse.Namespace) -> list[str]:
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
