"""The Lua scripts: headers, versions, loading, the ops command line, and the shipped wheel."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
import redis.asyncio

from taskiq_redis import connection, scripts
from taskiq_redis.exceptions import ScriptError
from tests.servers import AsyncRedisClient, RedisServers, Topology

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "lua" / "manifest.tsv"


def manifest() -> dict[tuple[str, int], str]:
    entries = {}
    for line in MANIFEST.read_text().splitlines():
        name, version, sha1 = line.split("\t")
        entries[(name, int(version))] = sha1
    return entries


def test_every_lua_file_is_a_registered_script() -> None:
    files = sorted(path.stem for path in (ROOT / "lua").glob("*.lua"))
    assert files == sorted(scripts.all_scripts())
    assert files, "no scripts found"


@pytest.mark.parametrize("script", scripts.all_scripts().values(), ids=lambda s: s.name)
def test_script_text_matches_its_version_in_the_manifest(script: scripts.Script) -> None:
    """Changing a script's text without a new version would let old and new workers disagree."""
    recorded = manifest().get((script.name, script.version))
    assert recorded is not None, (
        f"{script.name} version {script.version} is not in lua/manifest.tsv: append the line "
        f"from `python -m taskiq_redis scripts manifest`"
    )
    assert recorded == script.sha1, (
        f"lua/{script.name}.lua changed but its version is still {script.version}: bump the "
        "version in its header and append the new manifest line"
    )


@pytest.mark.parametrize("script", scripts.all_scripts().values(), ids=lambda s: s.name)
def test_script_header_documents_arguments_and_return(script: scripts.Script) -> None:
    header = [line for line in script.source.splitlines() if line.startswith("--")]
    assert any(line.startswith("-- purpose:") for line in header)
    assert any(line.startswith("-- returns:") for line in header)
    assert script.num_keys >= 1, "every script names its keys, so it stays in one cluster slot"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("-- name: other\n-- version: 1\n-- KEYS[1]: k\n", "header name"),
        ("-- name: sample\n-- version: one\n-- KEYS[1]: k\n", "version"),
        ("-- name: sample\n-- version: 2\n-- KEYS[2]: k\n", "numbered"),
    ],
)
def test_malformed_header_is_refused_with_the_reason(text: str, problem: str) -> None:
    with pytest.raises(ScriptError, match=problem):
        scripts.parse("sample.lua", text)


def test_call_with_the_wrong_number_of_keys_is_refused() -> None:
    script = scripts.parse("sample.lua", "-- name: sample\n-- version: 1\n-- KEYS[1]: k\n")
    with pytest.raises(ScriptError, match="takes 1 keys, was called with 2"):
        script.check_keys(["a", "b"])


async def test_load_puts_every_script_on_the_server(
    topology: Topology, raw_redis: AsyncRedisClient, redis_servers: RedisServers
) -> None:
    factories: dict[str, Callable[..., connection.RedisConnection]] = {
        "single": connection.single_node,
        "cluster": connection.cluster,
        "sentinel": connection.sentinel,
    }
    conn = factories[topology.name](**topology.kwargs())
    known = list(scripts.all_scripts().values())
    try:
        await raw_redis.script_flush()
        assert await scripts.loaded(conn, known) == [False] * len(known)
        await scripts.load(conn, known)
        assert await scripts.loaded(conn, known) == [True] * len(known)
    finally:
        await conn.close()
    if topology.name == "cluster":  # every primary, not just the one answering
        for port in redis_servers.cluster_ports:
            node = redis.asyncio.Redis(port=port)
            assert await node.script_exists(*(s.sha1 for s in known)) == [True] * len(known)
            await node.aclose()


def run_cli(*args: str, python: str = sys.executable) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [python, "-m", "taskiq_redis", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd="/",
    )


def test_cli_lists_every_script_with_its_sha1() -> None:
    done = run_cli("scripts", "list")
    assert done.returncode == 0, done.stderr
    for script in scripts.all_scripts().values():
        assert script.sha1 in done.stdout
        assert script.name in done.stdout


def test_cli_shows_a_script_source() -> None:
    done = run_cli("scripts", "show", "result_get")
    assert done.returncode == 0
    assert done.stdout.strip() == scripts.get("result_get").source.strip()


@pytest.mark.parametrize("topology", ["single", "cluster"], indirect=True)
def test_cli_loads_and_checks_scripts(topology: Topology) -> None:
    loaded = run_cli("scripts", "load", "--url", topology.url)
    assert loaded.returncode == 0, loaded.stderr
    checked = run_cli("scripts", "check", "--url", topology.url)
    assert checked.returncode == 0
    lines = checked.stdout.strip().splitlines()
    assert len(lines) == len(scripts.all_scripts())
    assert all(line.endswith("\tloaded") for line in lines)


def test_cli_checks_through_a_sentinel(redis_servers: RedisServers) -> None:
    host, port = redis_servers.sentinels[0]
    args = ["--sentinel", f"{host}:{port}", "--master-name", redis_servers.master_name]
    sentinel = redis.Sentinel(redis_servers.sentinels)  # type: ignore[no-untyped-call,unused-ignore]
    primary = sentinel.master_for(redis_servers.master_name)  # type: ignore[no-untyped-call,unused-ignore]
    try:
        primary.script_flush()  # what check says must come from the primary the sentinel names
        before = run_cli("scripts", "check", *args)
        done = run_cli("scripts", "load", *args)
        after = run_cli("scripts", "check", *args)
    finally:
        primary.close()
    assert before.returncode == 1, before.stderr  # missing scripts: a failed health check
    assert done.returncode == 0, done.stderr
    assert after.returncode == 0, after.stderr
    count = len(scripts.all_scripts())
    assert [line.rsplit("\t", 1)[1] for line in before.stdout.splitlines()] == ["missing"] * count
    assert [line.rsplit("\t", 1)[1] for line in after.stdout.splitlines()] == ["loaded"] * count


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["scripts", "check", "--url", "redis://127.0.0.1:1"], 1, "connecting to 127.0.0.1:1"),
        (["scripts", "show", "no_such_script"], 1, "no script named 'no_such_script'"),
        (["scripts", "check", "--sentinel", "127.0.0.1:1"], 2, "needs --master-name"),
        (["scripts", "frobnicate"], 2, "invalid choice"),
    ],
)
def test_cli_failures_are_one_line_without_traceback(
    args: list[str], code: int, message: str
) -> None:
    done = run_cli(*args)
    assert done.returncode == code
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_installed_wheel_ships_and_lists_every_script(tmp_path: Path) -> None:
    """A wheel installed elsewhere loads the same script files as this checkout."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            str(ROOT),
        ],
        check=True,
        timeout=300,
    )
    wheel = next((tmp_path / "dist").glob("*.whl"))
    scratch = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(scratch)], check=True)
    python = str(scratch / "bin" / "python")
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, str(wheel)],
        check=True,
        timeout=300,
    )
    # The dependencies (taskiq, redis) come from this environment, after the wheel's own copy.
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    located = subprocess.run(
        [python, "-c", "import taskiq_redis; print(taskiq_redis.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
        env={**os.environ, "PYTHONPATH": ""},
    ).stdout
    assert located.startswith(site), located
    listed = run_cli("scripts", "list", python=python)
    assert listed.returncode == 0, listed.stderr
    for script in scripts.all_scripts().values():
        assert f"{script.name} " in listed.stdout
        assert script.sha1 in listed.stdout
