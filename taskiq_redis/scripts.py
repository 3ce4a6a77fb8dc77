"""The Lua script registry: finds the shipped ``.lua`` files, reads their headers, runs them.

Scripts are data files of the package (``taskiq_redis/lua`` in a wheel, a link to the top-level
``lua/`` folder in a checkout), read through :mod:`importlib.resources` so both load the same
text. Calls go out as EVALSHA; a server that does not know the script (restart, failover,
SCRIPT FLUSH) answers NOSCRIPT, and the script is then loaded and the call retried once. No
"already loaded" flag is kept: the server's answer is the only truth.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from typing import TYPE_CHECKING, Any

from redis.exceptions import NoScriptError, ResponseError

from taskiq_redis.diagnostics import server_message
from taskiq_redis.exceptions import ScriptError

if TYPE_CHECKING:
    from redis.typing import EncodableT

    from taskiq_redis.connection import RedisConnection

_HEADER_FIELD = re.compile(r"^--\s*(name|version):\s*(\S+)\s*$")
_KEY_LINE = re.compile(r"^--\s*KEYS\[(\d+)(\.\.\.)?\]:")


@dataclass(frozen=True)
class Script:
    """One Lua script file, with what its header promises about the keys it takes."""

    name: str
    version: int
    source: str
    sha1: str
    num_keys: int
    variadic: bool

    def check_keys(self, keys: Sequence[object]) -> None:
        """Refuse a call whose key count differs from the header's, before Redis sees it."""
        if len(keys) == self.num_keys or (self.variadic and len(keys) >= self.num_keys):
            return
        wanted = f"at least {self.num_keys}" if self.variadic else str(self.num_keys)
        raise ScriptError(
            description=f"script {self.name} takes {wanted} keys, was called with {len(keys)}",
        )


def parse(file_name: str, source: str) -> Script:
    """Build a :class:`Script` from a file's text, checking that its header is complete.

    The header (leading ``--`` comment lines) must give ``name`` (equal to the file name),
    ``version`` (a whole number) and one ``KEYS[i]`` line per key, numbered from 1; a last line
    ``KEYS[i...]`` says that key ``i`` and any number after it may be passed.
    """
    fields: dict[str, str] = {}
    key_numbers: list[int] = []
    variadic = False
    for line in source.splitlines():
        if not line.startswith("--"):
            break
        if field := _HEADER_FIELD.match(line):
            fields[field.group(1)] = field.group(2)
        elif key := _KEY_LINE.match(line):
            key_numbers.append(int(key.group(1)))
            variadic = variadic or key.group(2) is not None
    expected_name = file_name.removesuffix(".lua")
    problem = None
    if fields.get("name") != expected_name:
        problem = f"header name is {fields.get('name')!r}, the file is {file_name}"
    elif not fields.get("version", "").isdigit():
        problem = f"header version is {fields.get('version')!r}, not a whole number"
    elif key_numbers != list(range(1, len(key_numbers) + 1)):
        problem = f"KEYS lines are numbered {key_numbers}, not 1..n"
    if problem:
        raise ScriptError(description=f"lua/{file_name}: {problem}")
    return Script(
        name=expected_name,
        version=int(fields["version"]),
        source=source,
        sha1=hashlib.sha1(source.encode()).hexdigest(),
        num_keys=len(key_numbers),
        variadic=variadic,
    )


@cache
def all_scripts() -> dict[str, Script]:
    """Every shipped script by name, read once per process."""
    folder = files("taskiq_redis") / "lua"
    found = {}
    for entry in sorted(folder.iterdir(), key=lambda item: item.name):
        if entry.name.endswith(".lua"):
            script = parse(entry.name, entry.read_text(encoding="utf-8"))
            found[script.name] = script
    return found


def get(name: str) -> Script:
    """The script called ``name``, or a :class:`ScriptError` listing those that exist."""
    try:
        return all_scripts()[name]
    except KeyError:
        known = ", ".join(all_scripts())
        raise ScriptError(description=f"no script named {name!r}; known: {known}") from None


async def run(
    connection: RedisConnection,
    script: Script,
    keys: Sequence[str | bytes],
    args: Sequence[EncodableT] = (),
) -> Any:
    """Run ``script`` by EVALSHA, loading it and retrying once when the server answers NOSCRIPT.

    An error the server reports for the script keeps its class (callers catch ResponseError or
    look for NOGROUP), and reads ``script <name>: <the server's message>``, without the sha and
    line that Redis wraps around it.
    """
    script.check_keys(keys)
    command = ("EVALSHA", script.sha1, len(keys), *keys, *args)
    try:
        try:
            return await connection.execute(*command)
        except NoScriptError:
            await load(connection, [script])
            return await connection.execute(*command)
    except ResponseError as error:
        error.args = (f"script {script.name}: {server_message(error)}", *error.args[1:])
        raise


async def load(connection: RedisConnection, scripts: Iterable[Script]) -> None:
    """SCRIPT LOAD each script on the server, or on every primary of a cluster."""
    for script in scripts:
        await connection.execute("SCRIPT LOAD", script.source)


async def loaded(connection: RedisConnection, scripts: Sequence[Script]) -> list[bool]:
    """Whether each script is known to the server (to every primary, on a cluster)."""
    if not scripts:
        return []
    answer = await connection.execute("SCRIPT EXISTS", *(script.sha1 for script in scripts))
    return [bool(flag) for flag in answer]
