"""The queues, schedules and scripts pages, the message page and the metrics text.

Rendered on the server from plain data, with the shared pieces of :mod:`.markup` (which says
how text from Redis is kept text); the page of one queue is :mod:`.queue_page`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from taskiq_redis import queues, scripts
from taskiq_redis.dashboard.markup import (
    REFRESH_SCRIPT,
    banner,
    clock,
    dash,
    e,
    layout,
    levels_text,
    live,
    queue_path,
    table,
)
from taskiq_redis.dashboard.monitor import NodeScripts, Overview, Sample, ScheduleRow, rates
from taskiq_redis.queues import age_text as age


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
            f"{len(group.consumers)} {'consumer' if len(group.consumers) == 1 else 'consumers'}"
            f"<ul>{consumers}</ul></div>"
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
    body = live("queues", base + "/fragments/queues", queues_fragment(base, overview, history))
    return layout(base, "Queues", body, nonce, REFRESH_SCRIPT, refresh)


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
