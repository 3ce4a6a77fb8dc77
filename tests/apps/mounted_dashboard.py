"""An application of its own with the dashboard mounted under /tasks, as a FastAPI user does.

FastAPI's ``app.mount`` is Starlette's ``Mount``: this parent is a plain Starlette app so the
test needs no FastAPI. The test passes the dashboard's options as JSON in the environment.
"""

from __future__ import annotations

import json
import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from taskiq_redis.dashboard import create_app

options = json.loads(os.environ["TASKIQ_REDIS_DASHBOARD_OPTIONS"])
if options.get("sentinels"):
    options["sentinels"] = [tuple(address) for address in options["sentinels"]]


async def home(request: Request) -> PlainTextResponse:
    return PlainTextResponse("the application's own home page")


app = Starlette(routes=[Route("/", home), Mount("/tasks", app=create_app(**options))])
