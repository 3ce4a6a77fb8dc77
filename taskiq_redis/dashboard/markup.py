"""The HTML pieces every page of the dashboard shares: escaping, layout, tables, forms, scripts.

Everything that comes from Redis (queue, group, consumer and task names, reasons, ids) goes
through :func:`e` (``html.escape``) before it reaches a page: Redis holds what any producer
wrote, and a task named ``<script>`` must show as those characters. Pages carry one inline
script, allowed by a per-response nonce in the Content-Security-Policy, so even markup that
slipped through could not run a script. No template engine and no build step: the pages are
Python strings, the refresh is a few lines of plain JavaScript.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from urllib.parse import quote

from taskiq_redis import queues


def e(value: object) -> str:
    """Text for HTML, quotes included (it also goes into attribute values)."""
    return html.escape(str(value), quote=True)


def queue_path(name: str) -> str:
    """The queue page's path: the name percent-encoded, slashes and all."""
    return "/queues/" + quote(name, safe="")


def clock(at: datetime | float | None) -> str:
    """A time in UTC, to the second."""
    if at is None:
        return "-"
    if isinstance(at, float | int):
        at = datetime.fromtimestamp(at, timezone.utc)
    return at.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def dash(value: object) -> str:
    return "-" if value is None or value == "" else e(value)


STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1d2733;background:#f6f7f9}
header{background:#1d2733;color:#fff;padding:.6em 1.2em;display:flex;gap:1.4em;align-items:center}
header a{color:#cfe3ff;text-decoration:none}header a:hover{text-decoration:underline}
header strong{margin-right:1em}main{padding:1em 1.2em}
table{border-collapse:collapse;background:#fff;margin:.5em 0 1.2em;min-width:40em}
th,td{border:1px solid #d8dde3;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#eef1f4}td.n{text-align:right;font-variant-numeric:tabular-nums}
.banner{padding:.6em 1em;margin:0 0 1em;border-radius:4px}
.error{background:#fde2e1;border:1px solid #e0a5a2}.ok{background:#e3f4e1;border:1px solid #a9d5a3}
.warn{background:#fff4d6;border:1px solid #e6cf8a}.muted{color:#6b7785}
.groups{font-size:12px}svg.spark{vertical-align:middle}form{display:inline}
button{cursor:pointer}code{background:#eef1f4;padding:0 .2em}
"""

# Refreshes the element marked data-live in place from the address it names, every
# data-refresh seconds of the body. What stops a refresh shows in the #offline banner: the
# server's own words when it answers in plain text (set as text, never as markup), else the
# HTTP status or the network error; the page keeps what it last showed and keeps trying.
REFRESH_SCRIPT = """
const live = document.querySelector("[data-live]");
const offline = document.getElementById("offline");
const every = Number(document.body.dataset.refresh) * 1000;
async function refresh() {
  let why = null;
  try {
    const answer = await fetch(live.dataset.live, {cache: "no-store"});
    const body = await answer.text();
    const plain = (answer.headers.get("content-type") || "").startsWith("text/plain");
    if (answer.ok) live.innerHTML = body;
    else why = plain && body ? body : "HTTP " + answer.status;
  } catch (error) {
    why = "the dashboard does not answer (" + error.message + ")";
  }
  offline.textContent = why ? "Not refreshed: " + why + "; retrying." : "";
  offline.hidden = !why;
  setTimeout(refresh, every);
}
setTimeout(refresh, every);
"""

# Asks before a form marked data-confirm is sent (a purge or a cancel cannot be undone).
# Listening on the document, so forms a refresh puts in the page ask too.
CONFIRM_SCRIPT = """
document.addEventListener("submit", (event) => {
  const ask = event.target.dataset.confirm;
  if (ask && !confirm(ask)) event.preventDefault();
});
"""


def layout(
    base: str, title: str, body: str, nonce: str, script: str = "", refresh: float = 0
) -> str:
    """A whole page: the navigation (links under ``base``, the mount path), then ``body``."""
    links = [("/", "Queues"), ("/schedules", "Schedules"), ("/scripts", "Scripts")]
    nav = "".join(f'<a href="{e(base + path)}">{name}</a>' for path, name in links)
    nav += f'<a href="{e(base + "/metrics")}">Metrics</a>'
    code = f'<script nonce="{e(nonce)}">{script}</script>' if script else ""
    return (
        "<!doctype html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{e(title)} - taskiq-redis</title>'
        f'<meta name="viewport" content="width=device-width"><style>{STYLE}</style></head>'
        f'<body data-base="{e(base)}" data-refresh="{e(refresh)}">'
        f"<header><strong>taskiq-redis</strong>{nav}</header>"
        f"<main><h1>{e(title)}</h1>{body}</main>{code}</body></html>"
    )


def live(element_id: str, source: str, content: str) -> str:
    """The part of a page that :data:`REFRESH_SCRIPT` replaces from ``source`` (a full path),
    after the banner that says when it cannot."""
    return (
        '<div id="offline" class="banner error" role="alert" hidden></div>'
        f'<div id="{e(element_id)}" data-live="{e(source)}">{content}</div>'
    )


def banner(kind: str, message: str, role: str = "status") -> str:
    return f'<div class="banner {kind}" role="{role}">{e(message)}</div>'


def levels_text(view: queues.QueueView) -> str:
    """``p3: 4, p0: 10`` for a queue with priority levels; empty without."""
    if not view.levels or view.length is None:
        return ""
    counts = {**view.levels, 0: view.length - sum(view.levels.values())}
    return ", ".join(f"p{level}: {counts[level]}" for level in sorted(counts, reverse=True))


def table(headers: Iterable[str], rows: list[str], empty: str, table_id: str) -> str:
    if not rows:
        return f'<p class="muted" id="{table_id}">{e(empty)}</p>'
    head = "".join(f"<th>{e(header)}</th>" for header in headers)
    return (
        f'<table id="{table_id}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def hidden(fields: Mapping[str, str]) -> str:
    """Hidden form fields."""
    return "".join(
        f'<input type="hidden" name="{e(name)}" value="{e(value)}">'
        for name, value in fields.items()
    )


def action_form(
    base: str,
    action: str,
    queue: str,
    token: str,
    label: str,
    fields: Mapping[str, str] | None = None,
    confirm: str | None = None,
) -> str:
    """A POST form for one action, with the process's token and ``fields`` hidden in it."""
    ask = f' data-confirm="{e(confirm)}"' if confirm else ""
    return (
        f'<form method="post" action="{e(base + "/actions/" + action)}"{ask}>'
        f"{hidden({'token': token, 'queue': queue, **(fields or {})})}"
        f'<button type="submit" data-action="{e(action)}">{e(label)}</button></form>'
    )
