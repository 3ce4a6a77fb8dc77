"""How errors read in logs: the error's own message, never redis-py's bare class tag.

redis-py 8 gives its exceptions a ``repr`` of only their kind (``server:ResponseError``), so a
log line formatted with ``%r`` hides what went wrong (WRONGTYPE, NOPERM, a refused connection).
Every log line of this package about an error formats it with :func:`describe` instead.
"""

from __future__ import annotations

import re

# What Redis wraps around an error raised inside a script: the call, the line and the sha.
_SCRIPT_PREFIX = re.compile(r"^(?:ERR )?Error running script \(call to f_[0-9a-f]+\): @\S+: ")
_SCRIPT_SUFFIX = re.compile(r"\s*script: [0-9a-f]{40}, on @\S+\.?\s*$")
_USER_SCRIPT = re.compile(r"^@user_script:\d+: ")


def server_message(error: BaseException) -> str:
    """The server's own words for ``error``, without the wrapping Redis adds to script errors."""
    text = str(error)
    text = _SCRIPT_PREFIX.sub("", text)
    text = _SCRIPT_SUFFIX.sub("", text)
    return _USER_SCRIPT.sub("", text).strip()


def describe(error: BaseException) -> str:
    """``ClassName: message`` for a log line; the class alone when the error has no message."""
    message = server_message(error)
    name = type(error).__name__
    return f"{name}: {message}" if message else name
