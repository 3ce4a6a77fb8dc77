"""A web dashboard for operators: queues, dead letters, schedules, scripts and metrics.

Installed with an extra, so the library itself keeps its few dependencies::

    pip install 'taskiq-redis[dashboard]'
    taskiq-redis dashboard --url redis://localhost:6379 [--allow-actions]

or mounted in an application of its own (FastAPI, Starlette, any ASGI router)::

    from taskiq_redis.dashboard import create_app

    app.mount("/tasks", create_app(url="redis://localhost:6379"))

``docs/dashboard.md`` describes the views, the safety defaults and the metrics.
"""

from taskiq_redis.dashboard.app import connect_to, create_app, serve

__all__ = ["connect_to", "create_app", "serve"]
