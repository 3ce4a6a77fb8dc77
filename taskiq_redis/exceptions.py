"""Errors the package raises; the names and bases are those of taskiq-redis 1.2."""

from taskiq.exceptions import ResultBackendError, ResultGetError, TaskiqError


class TaskIQRedisError(TaskiqError):
    """Base of every error raised by this package."""


class DuplicateExpireTimeSelectedError(ResultBackendError, TaskIQRedisError):
    """Both result_ex_time and result_px_time were given; only one can decide the expiry."""

    __template__ = "Choose either result_ex_time or result_px_time."


class ExpireTimeMustBeMoreThanZeroError(ResultBackendError, TaskIQRedisError):
    """An expiry of zero or less would delete a result the moment it is written."""

    __template__ = "You must select one expire time param and it must be more than zero."


class ResultIsMissingError(TaskIQRedisError, ResultGetError):
    """No result is stored for the task (not finished, expired, or already read and deleted)."""


class ScriptError(TaskIQRedisError):
    """A Lua script is missing, malformed, or called with the wrong keys."""

    __template__ = "{description}"
    description: str


class TaskDeadLetteredError(TaskIQRedisError):
    """The task's message went to the dead-letter stream: it will not run unless requeued.

    Stored as the task's result, so whoever waits for it (``wait_result()``) learns at once
    instead of waiting for ever.
    """

    __template__ = "Task {task_id} was dead-lettered after {deliveries} deliveries: {reason}"
    task_id: str
    deliveries: int
    reason: str


class TaskCancelledError(TaskIQRedisError):
    """The task was cancelled before any worker took it: it will not run.

    Stored as the task's result, so whoever waits for it (``wait_result()``) learns at once.
    """

    __template__ = "Task {task_id} was cancelled before it ran"
    task_id: str
