"""The dashboard as an ASGI application (Starlette), standalone or mounted in another one.

Links are built from the request's ASGI ``root_path``, so the same application works at ``/``
under ``taskiq-redis dashboard`` and under any path of a FastAPI or Starlette application
(``app.mount("/tasks", create_app(url=...))``). A mounted application gets no lifespan events,
so the Redis connection is made by the first request, not at startup.

Safety: read-only unless ``allow_actions=True``; actions are POST only and carry a token made
for this application object (one per process) in a hidden form field, so another site cannot
make an operator's browser requeue, purge or cancel; every answer forbids framing and inline scripts
without this response's nonce.
"""

from __future__ import annotations

import contextlib
import hmac
import secrets
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any
from urllib.parse import parse_qs, quote

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Route
from taskiq.abc.serializer import TaskiqSerializer

from taskiq_redis import connection, dead_letters, queues, task_ids
from taskiq_redis.brokers.base import BaseRedisBroker
from taskiq_redis.dashboard import pages, queue_page
from taskiq_redis.dashboard.markup import queue_path
from taskiq_redis.dashboard.monitor import READ_ERRORS, Monitor, describe_error

ACTIONS = ("requeue", "purge", "cancel")
# A form is a token, a queue name and an id: anything much larger is not one of ours.
MAX_FORM_BYTES = 16_384
# Outcomes of actions kept for the page the browser is sent to after the POST.
KEPT_OUTCOMES = 100
# What an action can fail with: a bad entry id, or what a read of Redis can fail with.
ACTION_ERRORS: tuple[type[BaseException], ...] = (ValueError, *READ_ERRORS)


async def connect_to(
    url: str | None, sentinels: Sequence[tuple[str, int]] | None, master_name: str | None
) -> connection.RedisConnection:
    """A connection of the server's own topology, as ``taskiq-redis queues`` makes it: a node
    that answers ``cluster_enabled`` is reached as a cluster."""
    if sentinels:
        if not master_name:
            raise ValueError("sentinels need a master_name")
        return connection.sentinel(list(sentinels), master_name)
    if url is None:
        raise ValueError("give url, or sentinels and master_name")
    probe = connection.single_node(url)
    try:
        info = await probe.execute("INFO", "cluster")
    finally:
        await probe.close()
    if info.get("cluster_enabled"):
        return connection.cluster(url)
    return connection.single_node(url)


class Dashboard:
    """The request handlers, sharing one :class:`Monitor`, the token and recent outcomes."""

    def __init__(self, monitor: Monitor, allow_actions: bool, refresh: float) -> None:
        self.monitor = monitor
        self.allow_actions = allow_actions
        self.refresh = refresh
        self.token = secrets.token_urlsafe(32)
        self.outcomes: OrderedDict[str, tuple[str, bool]] = OrderedDict()

    @staticmethod
    def base(request: Request) -> str:
        """The path the dashboard is served under ("" at the root, "/tasks" when mounted)."""
        return str(request.scope.get("root_path", "")).rstrip("/")

    @staticmethod
    def html(
        render: Callable[[str], str], status: int = 200, headers: dict[str, str] | None = None
    ) -> HTMLResponse:
        """A page rendered with a fresh script nonce, under a policy that allows only it."""
        nonce = secrets.token_urlsafe(16)
        policy = (
            "default-src 'none'; "
            f"script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; img-src 'self' data:; "
            "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
        )
        return HTMLResponse(
            render(nonce),
            status,
            {
                "Content-Security-Policy": policy,
                "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "same-origin",
                "Cache-Control": "no-store",
                **(headers or {}),
            },
        )

    def failed(
        self, request: Request, title: str, message: str, status: int, back: str
    ) -> Response:
        base = self.base(request)
        return self.html(
            lambda nonce: pages.message_page(base, title, message, nonce, back), status
        )

    def unreadable(self, request: Request, title: str, error: BaseException, back: str) -> Response:
        """A page that says Redis could not be read, and why."""
        message = f"Redis cannot be read: {describe_error(error)}. Reload to try again."
        return self.failed(request, title, message, 503, back)

    async def queues_page(self, request: Request) -> Response:
        overview = await self.monitor.overview()
        base = self.base(request)
        return self.html(
            lambda nonce: pages.queues_page(
                base, overview, self.monitor.history, nonce, self.refresh
            )
        )

    async def queues_fragment(self, request: Request) -> Response:
        overview = await self.monitor.overview()
        return HTMLResponse(
            pages.queues_fragment(self.base(request), overview, self.monitor.history),
            headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"},
        )

    async def queues_json(self, request: Request) -> Response:
        overview = await self.monitor.overview()
        return JSONResponse(
            {
                "queues": [view.as_dict() for view in overview.views],
                "problems": overview.problems,
                "scan_complete": overview.scan_complete,
                "error": overview.error,
                "taken_at": overview.taken_at,
                "history": {
                    name: [[s.at, s.length, s.added] for s in samples]
                    for name, samples in self.monitor.history.items()
                },
            },
            headers={"Cache-Control": "no-store"},
        )

    async def queue_page(self, request: Request) -> Response:
        name = request.path_params["name"]
        outcome = self.outcomes.pop(request.query_params.get("outcome", ""), None)
        try:
            found = await self.monitor.queue(name)
        except queues.QueueError as error:
            return self.failed(request, f"Queue {name}", str(error), 404, "/")
        except READ_ERRORS as error:
            return self.unreadable(request, f"Queue {name}", error, queue_path(name))
        base = self.base(request)
        return self.html(
            lambda nonce: queue_page.queue_page(
                base, found, nonce, self.allow_actions, self.token, outcome, self.refresh
            )
        )

    async def queue_fragment(self, request: Request) -> Response:
        """The refreshing part of a queue's page; when it cannot be read, why, in plain text
        with an error status, so the page keeps what it shows and says why it is not fresh."""
        name = request.path_params["name"]
        headers = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
        try:
            found = await self.monitor.queue(name)
        except queues.QueueError as error:
            return PlainTextResponse(str(error), 404, headers)
        except READ_ERRORS as error:
            return PlainTextResponse(f"Redis cannot be read: {describe_error(error)}", 503, headers)
        fragment = queue_page.queue_fragment(
            self.base(request), found, self.allow_actions, self.token
        )
        return HTMLResponse(fragment, headers=headers)

    async def schedules_page(self, request: Request) -> Response:
        try:
            rows = await self.monitor.schedules()
        except READ_ERRORS as error:
            return self.unreadable(request, "Schedules", error, "/schedules")
        base = self.base(request)
        prefix = self.monitor.schedule_prefix
        return self.html(lambda nonce: pages.schedules_page(base, rows, prefix, nonce))

    async def scripts_page(self, request: Request) -> Response:
        try:
            nodes = await self.monitor.scripts()
        except READ_ERRORS as error:
            return self.unreadable(request, "Scripts", error, "/scripts")
        base = self.base(request)
        return self.html(lambda nonce: pages.scripts_page(base, nodes, nonce))

    async def metrics(self, request: Request) -> Response:
        overview = await self.monitor.overview()
        return PlainTextResponse(
            pages.metrics(overview), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    async def action(self, request: Request) -> Response:
        """Requeue or purge dead letters (all, or one by id) or cancel a waiting task, then
        show the queue page.

        Refused (403, saying why) when actions are off or the form's token is not this
        process's; the outcome of an action that ran, failed or not, is shown on the queue page
        the browser is sent to (303, so reloading it does not repeat the action).
        """
        action = request.path_params["action"]
        form = await self.form(request)
        if form is None:
            return self.failed(
                request,
                "Refused",
                "Refused: an action is a form of the dashboard's own pages "
                "(application/x-www-form-urlencoded, at most 16 KiB).",
                400,
                "/",
            )
        queue = form.get("queue", [""])[0]
        back = queue_path(queue) if queue else "/"
        if not self.allow_actions:
            return self.failed(
                request,
                "Refused",
                "Refused: this dashboard is read-only. Start it with --allow-actions "
                "(create_app(..., allow_actions=True)) to requeue or purge dead letters or to "
                "cancel tasks.",
                403,
                back,
            )
        if not hmac.compare_digest(form.get("token", [""])[0].encode(), self.token.encode()):
            return self.failed(
                request,
                "Refused",
                "Refused: the form's token is not this dashboard's (the page was opened before "
                "the dashboard restarted, or the request did not come from its page). Reload "
                "the page and try again.",
                403,
                back,
            )
        if action not in ACTIONS or not queue:
            return self.failed(
                request, "Refused", f"Refused: no action {action!r} on queue {queue!r}.", 404, back
            )
        if action == "cancel":
            message, ok = await self.cancel(queue, form)
        else:
            message, ok = await self.run(action, queue, form.get("id", []))
        self.monitor.invalidate()
        key = secrets.token_urlsafe(12)
        self.outcomes[key] = (message, ok)
        while len(self.outcomes) > KEPT_OUTCOMES:
            self.outcomes.popitem(last=False)
        target = self.base(request) + queue_path(queue) + "?outcome=" + quote(key)
        return RedirectResponse(target, 303)

    @staticmethod
    async def form(request: Request) -> dict[str, list[str]] | None:
        """The posted form, parsed here (Starlette's own parser needs python-multipart)."""
        kind = request.headers.get("content-type", "").split(";")[0].strip()
        if kind != "application/x-www-form-urlencoded":
            return None
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM_BYTES:
                return None
        return parse_qs(body.decode(errors="replace"))

    async def run(self, action: str, queue: str, ids: list[str]) -> tuple[str, bool]:
        """The action, through the same functions as ``taskiq-redis dead-letters``."""
        try:
            conn = await self.monitor.connection()
            missing: list[str] = []
            if action == "requeue":
                if ids:
                    moved, skipped, missing = await dead_letters.requeue_dead_letter_ids(
                        conn, queue, ids
                    )
                else:
                    moved, skipped = await dead_letters.requeue_dead_letters(conn, queue)
                message = f"Requeued {moved} dead letters to {queue}."
                if skipped:
                    message += f" {skipped} without a data field were left in place."
            else:
                if ids:
                    deleted, missing = await dead_letters.purge_dead_letter_ids(conn, queue, ids)
                else:
                    deleted = await dead_letters.purge_dead_letters(conn, queue)
                message = f"Purged {deleted} dead letters of {queue}."
        except ACTION_ERRORS as error:
            return f"{action.capitalize()} failed: {error}", False
        if missing:
            message += f" Not dead letters of {queue}, left alone: {', '.join(missing)}."
        return message, not missing

    async def cancel(self, queue: str, form: dict[str, list[str]]) -> tuple[str, bool]:
        """Cancel the form's ``task_id`` as ``taskiq-redis cancel`` does (the same queue, the
        same call; no result is stored for its waiters, as the command stores none), for the
        form's ``group``, else the queue's one group."""
        task_id = form.get("task_id", [""])[0].strip()
        if not task_id:
            return "Cancel refused: give the id of the task to cancel.", False
        try:
            conn = await self.monitor.connection()
            view = await queues.inspect(conn, queue, max_priority=self.monitor.max_priority)
            target = queues.cancel_queue(view, form.get("group", [""])[0])
            done = await task_ids.cancel(conn, target, task_id)
        except ACTION_ERRORS as error:
            return f"Cancel failed: {error}", False
        if done:
            return f"{task_id}: cancelled; it was waiting in {queue} and will never run.", True
        return (
            f"{task_id}: not queued in {queue} (a worker holds it or ran it, or the id is "
            "unknown); nothing was cancelled.",
            False,
        )


def create_app(
    target: connection.RedisConnection | BaseRedisBroker | None = None,
    *,
    url: str | None = None,
    sentinels: Sequence[tuple[str, int]] | None = None,
    master_name: str | None = None,
    queue_names: Sequence[str] = (),
    allow_actions: bool = False,
    schedule_prefix: str = "schedule",
    schedule_serializer: TaskiqSerializer | None = None,
    refresh: float = 3.0,
    scan_limit: int = queues.DEFAULT_SCAN_LIMIT,
    max_priority: int = queues.ALL_LEVELS,
) -> Starlette:
    """The dashboard as an ASGI application.

    Reach Redis by ``url`` (a server or any cluster node), by ``sentinels`` and
    ``master_name``, or through ``target``, a connection or a broker of this package already
    in the application (its connection is shared, and not closed by the dashboard).
    ``queue_names`` limits the queues view to those queues (default: found by SCAN, as
    ``taskiq-redis queues`` does). ``refresh`` is the seconds between two refreshes of the
    queues page and of a queue's page. ``schedule_serializer`` must be the schedule sources'
    (they default to pickle, as here).
    """
    if refresh <= 0:
        raise ValueError(f"refresh must be a positive number of seconds, got {refresh!r}")
    if target is not None:
        conn = target.redis_connection if isinstance(target, BaseRedisBroker) else target

        async def connect() -> connection.RedisConnection:
            return conn

    else:
        if url is None and not sentinels:
            raise ValueError("give a connection or broker, url, or sentinels and master_name")
        if sentinels and not master_name:
            raise ValueError("sentinels need a master_name")

        async def connect() -> connection.RedisConnection:
            return await connect_to(url, sentinels, master_name)

    monitor = Monitor(
        connect,
        queue_names,
        scan_limit=scan_limit,
        max_priority=max_priority,
        schedule_prefix=schedule_prefix,
        schedule_serializer=schedule_serializer,
        min_age=max(0.5, min(refresh * 0.8, 10.0)),
        owns_connection=target is None,
    )
    dashboard = Dashboard(monitor, allow_actions, refresh)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await monitor.close()

    routes = [
        Route("/", dashboard.queues_page),
        Route("/fragments/queues", dashboard.queues_fragment),
        Route("/fragments/queues/{name:path}", dashboard.queue_fragment),
        Route("/api/queues", dashboard.queues_json),
        Route("/queues/{name:path}", dashboard.queue_page),
        Route("/actions/{action}", dashboard.action, methods=["POST"]),
        Route("/schedules", dashboard.schedules_page),
        Route("/scripts", dashboard.scripts_page),
        Route("/metrics", dashboard.metrics),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.dashboard = dashboard
    return app


def serve(app: Any, host: str, port: int) -> None:
    """Run ``app`` with uvicorn until interrupted (the ``taskiq-redis dashboard`` command)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info"))
    server.run()
