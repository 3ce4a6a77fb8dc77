"""The dashboard's HTML and metrics text, rendered on the server from plain data.

Everything that comes from Redis (queue, group, consumer and task names, reasons, ids) goes
through :func:`e` (``html.escape``) before it reaches a page: Redis holds what any producer
wrote, and a task named ``<script>`` must show as those characters. Pages carry one inline
script, allowed by a per-response nonce in the Content-Security-Policy, so even markup that
slipped through could not run a script. No template engine and no build step: the pages are
Python strings, the refresh is a few lines of plain JavaScript.
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from urllib.parse import quote

from taskiq_redis import queues, scripts
from taskiq_redis.dashboard.monitor import (
    NodeScripts,
    Overview,
    QueueDetail,
    Sample,
    ScheduleRow,
    rates,
)
from taskiq_redis.queues import age_text as age


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

# Refreshes the queues fragment in place; a failed fetch shows a banner and keeps trying.
REFRESH_SCRIPT = """
const board = document.getElementById("queues");
const offline = document.getElementById("offline");
const every = Number(document.body.dataset.refresh) * 1000;
async function refresh() {
  try {
    const answer = await fetch(document.body.dataset.base + "/fragments/queues",
                               {cache: "no-store"});
    if (!answer.ok) throw new Error("HTTP " + answer.status);
    board.innerHTML = await answer.text();
    offline.hidden = true;
  } catch (error) {
    offline.textContent = "The dashboard does not answer (" + error.message + "); retrying.";
    offline.hidden = false;
  } finally {
    setTimeout(refresh, every);
  }
}
setTimeout(refresh, every);
"""

# Asks before a form marked data-confirm is sent (purging cannot be undone).
CONFIRM_SCRIPT = """
for (const form of document.querySelectorAll("form[data-confirm]")) {
  form.addEventListener("submit", (event) => {
    if (!confirm(form.dataset.confirm)) event.preventDefault();
  });
}
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


def banner(kind: str, message: str, role: str = "status") -> str:
    return f'<div class="banner {kind}" role="{role}">{e(message)}</div>'


def sparkline(values: Sequence[float], title: str, width: int = 120, height: int = 24) -> str:
    """An inline SVG line over ``values`` (oldest first), scaled to its own maximum."""
    if len(values) < 2:
        return (
            f'<svg class="spark" width="{width}" height="{height}"><title>{e(title)}</title></svg>'
        )
    top = max(values) or 1.0
    step = width / (len(values) - 1)
    points = " ".join(
        f"{index * step:.1f},{height - 2 - (value / top) * (height - 4):.1f}"
        for index, value in enumerate(values)
    )
    return (
        f'<svg class="spark" width="{width}" height="{height}" role="img">'
        f"<title>{e(title)}</title>"
        f'<polyline fill="none" stroke="#2f6fb3" stroke-width="1.5" points="{points}"/></svg>'
    )


def levels_text(view: queues.QueueView) -> str:
    """``p3: 4, p0: 10`` for a queue with priority levels; empty without."""
    if not view.levels or view.length is None:
        return ""
    counts = {**view.levels, 0: view.length - sum(view.levels.values())}
    return ", ".join(f"p{level}: {counts[level]}" for level in sorted(counts, reverse=True))


def groups_cell(view: queues.QueueView) -> str:
    """Each consumer group: pending, lag, and its consumers with their idle time."""
    parts = []
    for group in view.groups:
        lag = "unknown" if group.lag is None else str(group.lag)
        consumers = "".join(
            f"<li>{e(c.name)}: pending {c.pending}, idle {e(age(c.idle_ms))}</li>"
            for c in group.consumers
        )
        parts.append(
            f'<div class="group" data-group="{e(group.name)}"><b>{e(group.name)}</b> '
            f'pending <span data-field="pending">{group.pending}</span>, '
            f'lag <span data-field="lag">{e(lag)}</span>, '
            f"{len(group.consumers)} consumers<ul>{consumers}</ul></div>"
        )
    return f'<div class="groups">{"".join(parts)}</div>' if parts else "-"


def queues_fragment(base: str, overview: Overview, history: Mapping[str, Sequence[Sample]]) -> str:
    """The part of the queues page that refreshes: banners and the table."""
    out = []
    if overview.error is not None:
        since = f" The figures below are from {clock(overview.taken_at)}." if overview.views else ""
        out.append(
            banner(
                "error",
                f"Redis cannot be read: {overview.error}. Retrying at each refresh.{since}",
                "alert",
            )
        )
    out += [banner("warn", problem) for problem in overview.problems]
    if not overview.views:
        if overview.error is None:
            out.append('<p class="muted">No queues found.</p>')
        return "".join(out)
    rows = []
    for view in overview.views:
        samples = list(history.get(view.name, ()))
        lengths = [float(sample.length) for sample in samples]
        added = rates(samples)
        rate = f"{added[-1][1]:.1f}/s" if added else "-"
        charts = (
            sparkline(lengths, f"length of {view.name}, last {len(samples)} samples")
            + f" {e(view.length if view.length is not None else '-')}<br>"
            + sparkline([r for _, r in added], f"messages added per second to {view.name}")
            + f' <span data-field="rate">{e(rate)}</span>'
        )
        length = "-" if view.length is None else str(view.length)
        by_level = levels_text(view)
        rows.append(
            f'<tr data-queue="{e(view.name)}">'
            f'<td><a href="{e(base + queue_path(view.name))}">{e(view.name)}</a></td>'
            f"<td>{e(view.kind)}</td>"
            f'<td class="n" data-field="length">{e(length)}</td>'
            f'<td data-field="levels">{e(by_level) or "-"}</td>'
            f'<td class="n" data-field="delayed">{view.delayed}</td>'
            f'<td class="n" data-field="dead">{view.dead_letters}</td>'
            f"<td>{groups_cell(view)}</td><td>{charts}</td></tr>"
        )
    out.append(
        '<table id="queue-table"><thead><tr><th>Queue</th><th>Kind</th><th>Length</th>'
        "<th>By priority</th><th>Delayed</th><th>Dead letters</th><th>Groups</th>"
        "<th>Last minutes: length, added/s</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
        f'<p class="muted">Read at {e(clock(overview.taken_at))}.</p>'
    )
    return "".join(out)


def queues_page(
    base: str,
    overview: Overview,
    history: Mapping[str, Sequence[Sample]],
    nonce: str,
    refresh: float,
) -> str:
    body = (
        '<div id="offline" class="banner error" role="alert" hidden></div>'
        f'<div id="queues">{queues_fragment(base, overview, history)}</div>'
    )
    return layout(base, "Queues", body, nonce, REFRESH_SCRIPT, refresh)


def action_form(
    base: str,
    action: str,
    queue: str,
    token: str,
    label: str,
    entry_id: str | None = None,
    confirm: str | None = None,
) -> str:
    """A POST form for one action, with the process's token as a hidden field."""
    fields = (
        f'<input type="hidden" name="token" value="{e(token)}">'
        f'<input type="hidden" name="queue" value="{e(queue)}">'
    )
    if entry_id is not None:
        fields += f'<input type="hidden" name="id" value="{e(entry_id)}">'
    ask = f' data-confirm="{e(confirm)}"' if confirm else ""
    return (
        f'<form method="post" action="{e(base + "/actions/" + action)}"{ask}>{fields}'
        f'<button type="submit" data-action="{e(action)}">{e(label)}</button></form>'
    )


def table(headers: Iterable[str], rows: list[str], empty: str, table_id: str) -> str:
    if not rows:
        return f'<p class="muted" id="{table_id}">{e(empty)}</p>'
    head = "".join(f"<th>{e(header)}</th>" for header in headers)
    return (
        f'<table id="{table_id}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def queue_page(
    base: str,
    detail: QueueDetail,
    nonce: str,
    allow_actions: bool,
    token: str,
    outcome: tuple[str, bool] | None,
) -> str:
    """A queue: figures, pending entries, delayed messages, dead letters and their actions."""
    view = detail.view
    now_ms = int(time.time() * 1000)
    out = []
    if outcome is not None:
        message, ok = outcome
        out.append(banner("ok" if ok else "error", message, "status" if ok else "alert"))
    lag = ", ".join(
        f"{group.name}: pending {group.pending}, "
        f"lag {'unknown' if group.lag is None else group.lag}"
        for group in view.groups
    )
    out.append(
        '<table id="summary"><tbody>'
        f"<tr><th>Kind</th><td>{e(view.kind)}</td></tr>"
        f'<tr><th>Length</th><td data-field="length">{dash(view.length)}</td></tr>'
        f"<tr><th>By priority</th><td>{dash(levels_text(view))}</td></tr>"
        f'<tr><th>Delayed</th><td data-field="delayed">{view.delayed}</td></tr>'
        f'<tr><th>Dead letters</th><td data-field="dead">{view.dead_letters}</td></tr>'
        f"<tr><th>Groups</th><td>{dash(lag)}</td></tr></tbody></table>"
    )
    out.append("<h2>Pending</h2>")
    out.append(
        table(
            ["Entry", "Task", "Task id", "Group", "Consumer", "Deliveries", "Idle"],
            [
                f"<tr><td>{e(p.id)}</td><td>{dash(p.task_name)}</td><td>{dash(p.task_id)}</td>"
                f"<td>{e(p.group)}</td><td>{e(p.consumer)}</td><td class=n>{p.deliveries}</td>"
                f"<td>{e(age(p.idle_ms))}</td></tr>"
                for p in detail.pending
            ],
            "No pending entries (taken by a consumer and not acknowledged)."
            if view.kind == "stream"
            else "A list queue keeps no pending entries: a message leaves it when taken.",
            "pending",
        )
    )
    out.append("<h2>Delayed</h2>")
    out.append(
        table(
            ["Due", "In", "Task", "Task id", "Priority"],
            [
                f"<tr><td>{e(clock(d.due_ms / 1000))}</td><td>{e(age(d.due_ms - now_ms))}</td>"
                f"<td>{dash(d.task_name)}</td><td>{dash(d.task_id)}</td><td>{dash(d.level)}</td></tr>"
                for d in detail.delayed
            ],
            "No delayed messages.",
            "delayed",
        )
    )
    out.append("<h2>Dead letters</h2>")
    if detail.dead_letters and allow_actions:
        out.append(
            '<div class="actions">'
            + action_form(base, "requeue", view.name, token, "Requeue all dead letters")
            + " "
            + action_form(
                base,
                "purge",
                view.name,
                token,
                "Purge all dead letters",
                confirm=f"Delete every dead letter of {view.name}? This cannot be undone.",
            )
            + "</div>"
        )
    elif detail.dead_letters:
        out.append(
            '<p class="muted">Read-only: start the dashboard with --allow-actions to requeue '
            "or purge dead letters.</p>"
        )
    letter_rows = []
    for letter in detail.dead_letters:
        buttons = ""
        if allow_actions:
            buttons = (
                action_form(base, "requeue", view.name, token, "Requeue", letter.id)
                + " "
                + action_form(
                    base,
                    "purge",
                    view.name,
                    token,
                    "Purge",
                    letter.id,
                    confirm=f"Delete dead letter {letter.id}?",
                )
            )
        letter_rows.append(
            f'<tr data-letter="{e(letter.id)}"><td>{e(letter.id)}</td>'
            f'<td data-field="task">{dash(letter.task_name)}</td><td>{dash(letter.task_id)}</td>'
            f"<td class=n>{dash(letter.deliveries)}</td><td>{e(age(letter.age_ms))}</td>"
            f"<td>{dash(letter.group)}</td>"
            f'<td data-field="reason">{dash(letter.reason)}</td><td>{buttons}</td></tr>'
        )
    out.append(
        table(
            ["Entry", "Task", "Task id", "Deliveries", "Age", "Group", "Reason", ""],
            letter_rows,
            "No dead letters.",
            "dead-letters",
        )
    )
    if view.dead_letters > len(detail.dead_letters):
        out.append(
            f'<p class="muted">The oldest {len(detail.dead_letters)} of {view.dead_letters} '
            "are listed; the buttons for all act on every one.</p>"
        )
    return layout(base, f"Queue {view.name}", "".join(out), nonce, CONFIRM_SCRIPT)


def schedules_page(base: str, rows: list[ScheduleRow], prefix: str, nonce: str) -> str:
    body = [
        f'<p class="muted">Schedules stored under the prefix <code>{e(prefix)}</code> by the '
        "list-based (ListRedisScheduleSource) and key-based (RedisScheduleSource) sources.</p>"
    ]
    lines = []
    for row in sorted(rows, key=lambda r: (r.source, r.schedule.schedule_id)):
        s = row.schedule
        interval = getattr(s, "interval", None)
        lines.append(
            f'<tr data-schedule="{e(s.schedule_id)}"><td>{e(s.schedule_id)}</td>'
            f"<td>{e(row.source)}</td><td>{e(s.task_name)}</td><td>{dash(s.cron)}</td>"
            f"<td>{dash(s.cron_offset)}</td><td>{dash(interval)}</td>"
            f"<td>{e(clock(s.time)) if s.time else '-'}</td>"
            f"<td>{e(clock(row.next_run)) if row.next_run else dash(row.note)}</td></tr>"
        )
    body.append(
        table(
            ["Id", "Source", "Task", "Cron", "Cron offset", "Interval", "Time", "Next run"],
            lines,
            "No schedules.",
            "schedules",
        )
    )
    return layout(base, "Schedules", "".join(body), nonce)


def scripts_page(base: str, nodes: list[NodeScripts], nonce: str) -> str:
    known = list(scripts.all_scripts().values())
    head = "".join(f"<th>{e(node.node)}</th>" for node in nodes)
    rows = []
    for index, script in enumerate(known):
        cells = "".join(
            f"<td>{e(node.error)}</td>"
            if node.loaded is None
            else f"<td>{'loaded' if node.loaded[index] else 'missing'}</td>"
            for node in nodes
        )
        rows.append(
            f'<tr data-script="{e(script.name)}"><td>{e(script.name)}</td>'
            f"<td>{script.version}</td><td><code>{e(script.sha1)}</code></td>{cells}</tr>"
        )
    missing = sum(flags.count(False) for flags in (n.loaded for n in nodes) if flags)
    note = (
        banner(
            "warn",
            f"{missing} script copies are missing: `taskiq-redis scripts load` loads them; a "
            "worker loads those it uses at startup, and a call loads a missing one when needed.",
        )
        if missing
        else ""
    )
    body = (
        f'{note}<table id="scripts"><thead><tr><th>Script</th><th>Version</th><th>SHA1</th>'
        f"{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )
    return layout(base, "Scripts", body, nonce)


def message_page(base: str, title: str, message: str, nonce: str, back: str) -> str:
    """A page that says why something was refused or failed, with a way back."""
    body = banner("error", message, "alert") + f'<p><a href="{e(base + back)}">Back</a></p>'
    return layout(base, title, body, nonce)


def label(value: str) -> str:
    """A Prometheus label value: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


METRICS = {
    "up": "Whether the dashboard's last read of Redis succeeded (1) or not (0).",
    "queue_length": "Messages waiting in a queue, per priority level.",
    "queue_delayed": "Delayed messages of a queue, not yet due.",
    "queue_dead_letters": "Dead letters of a queue.",
    "group_pending": "Entries a consumer group has taken and not acknowledged.",
    "group_lag": "Entries a consumer group has not read yet.",
    "group_consumers": "Consumers of a consumer group.",
}


def metrics(overview: Overview) -> str:
    """Prometheus' text format; the queues' series only when Redis could be read now."""
    series: dict[str, list[str]] = {name: [] for name in METRICS}
    up = overview.error is None
    series["up"].append(f"taskiq_redis_up {int(up)}")
    for view in overview.views if up else []:
        queue = label(view.name)
        if view.length is not None:
            counts = {**view.levels, 0: view.length - sum(view.levels.values())}
            for level in sorted(counts):
                series["queue_length"].append(
                    f'taskiq_redis_queue_length{{queue="{queue}",kind="{label(view.kind)}",'
                    f'priority="{level}"}} {counts[level]}'
                )
        series["queue_delayed"].append(
            f'taskiq_redis_queue_delayed{{queue="{queue}"}} {view.delayed}'
        )
        series["queue_dead_letters"].append(
            f'taskiq_redis_queue_dead_letters{{queue="{queue}"}} {view.dead_letters}'
        )
        for group in view.groups:
            labels = f'queue="{queue}",group="{label(group.name)}"'
            series["group_pending"].append(
                f"taskiq_redis_group_pending{{{labels}}} {group.pending}"
            )
            if group.lag is not None:
                series["group_lag"].append(f"taskiq_redis_group_lag{{{labels}}} {group.lag}")
            series["group_consumers"].append(
                f"taskiq_redis_group_consumers{{{labels}}} {len(group.consumers)}"
            )
    lines = []
    for name, help_text in METRICS.items():
        lines += [
            f"# HELP taskiq_redis_{name} {help_text}",
            f"# TYPE taskiq_redis_{name} gauge",
            *series[name],
        ]
    return "\n".join(lines) + "\n"
