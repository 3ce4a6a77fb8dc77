"""Error text in log lines: the message itself, without Redis' script wrapping."""

from __future__ import annotations

from redis.exceptions import ConnectionError, ResponseError

from taskiq_redis.diagnostics import describe, server_message


def test_describe_names_the_class_and_the_message() -> None:
    error = ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value")
    assert describe(error) == (
        "ResponseError: WRONGTYPE Operation against a key holding the wrong kind of value"
    )
    assert describe(ConnectionError()) == "ConnectionError"


def test_script_wrapping_is_removed() -> None:
    sha = "0123456789abcdef0123456789abcdef01234567"
    wrapped = ResponseError(
        f"Error running script (call to f_{sha}): @user_script:12: "
        f"WRONGTYPE Operation against a key holding the wrong kind of value script: {sha}, "
        "on @user_script:12."
    )
    assert server_message(wrapped) == (
        "WRONGTYPE Operation against a key holding the wrong kind of value"
    )
