"""The page of one queue: its figures and entries, refreshed in place, and what can be done.

The entries (pending, waiting, delayed, dead letters) are a fragment of their own, served at
``/fragments/queues/NAME`` and swapped in by the same script as the queues page's table. The
outcome of the last action and the form to cancel a task by id stay outside it, so a refresh
neither hides the one nor clears what the operator is typing into the other.
"""

from __future__ import annotations

import time

from taskiq_redis.brokers.stream.claims import RELEASE_IDLE_MS
from taskiq_redis.dashboard.detail import WAITING_ENTRIES, QueueDetail, Waiting
from taskiq_redis.dashboard.markup import (
    CONFIRM_SCRIPT,
    REFRESH_SCRIPT,
    action_form,
    banner,
    clock,
    dash,
    e,
    hidden,
    layout,
    levels_text,
    live,
    queue_path,
    table,
)
from taskiq_redis.queues import age_text as age


def fragment_path(name: str) -> str:
    """Where the refreshing part of a queue's page is served."""
    return "/fragments" + queue_path(name)


def cancel_button(base: str, queue: str, token: str, task_id: str, group: str | None) -> str:
    """The button that cancels one waiting or delayed task (for ``group``, when it waits for
    one), after the browser asked whether to."""
    return action_form(
        base,
        "cancel",
        queue,
        token,
        "Cancel",
        {"task_id": task_id, **({"group": group} if group else {})},
        confirm=f"Cancel task {task_id}? It will never run.",
    )


def summary(detail: QueueDetail) -> str:
    view = detail.view
    lag = ", ".join(
        f"{group.name}: pending {group.pending}, "
        f"lag {'unknown' if group.lag is None else group.lag}"
        for group in view.groups
    )
    return (
        '<table id="summary"><tbody>'
        f"<tr><th>Kind</th><td>{e(view.kind)}</td></tr>"
        f'<tr><th>Length</th><td data-field="length">{dash(view.length)}</td></tr>'
        f"<tr><th>By priority</th><td>{dash(levels_text(view))}</td></tr>"
        f'<tr><th>Delayed</th><td data-field="delayed">{view.delayed}</td></tr>'
        f'<tr><th>Dead letters</th><td data-field="dead">{view.dead_letters}</td></tr>'
        f"<tr><th>Groups</th><td>{dash(lag)}</td></tr></tbody></table>"
    )


def idle_text(idle_ms: int) -> str:
    """How long an entry has waited since its delivery; ``released`` for one a stopping worker
    handed back (its idle time set to :data:`RELEASE_IDLE_MS`, about 31 years, so the next
    reclaim by any consumer takes it): not a stuck entry of 11574 days."""
    return "released, for the next reclaim" if idle_ms >= RELEASE_IDLE_MS else age(idle_ms)


def pending_table(detail: QueueDetail) -> str:
    return table(
        ["Priority", "Entry", "Task", "Task id", "Group", "Consumer", "Deliveries", "Idle"],
        [
            f'<tr data-entry="{e(p.id)}" data-level="{p.level}"><td class=n>{p.level}</td>'
            f"<td>{e(p.id)}</td><td>{dash(p.task_name)}</td><td>{dash(p.task_id)}</td>"
            f"<td>{e(p.group)}</td><td>{e(p.consumer)}</td><td class=n>{p.deliveries}</td>"
            f"<td>{e(idle_text(p.idle_ms))}</td></tr>"
            for p in detail.pending
        ],
        "No pending entries (taken by a consumer and not acknowledged)."
        if detail.view.kind == "stream"
        else "A list queue keeps no pending entries: a message leaves it when taken.",
        "pending",
    )


def waiting_section(base: str, detail: QueueDetail, allow_actions: bool, token: str) -> str:
    """The next messages of each level, highest level first, each with its cancel button."""
    rows, notes = [], []
    for waiting in detail.waiting:
        for entry in waiting.entries:
            button = ""
            if allow_actions and entry.task_id is not None:
                button = cancel_button(base, detail.view.name, token, entry.task_id, waiting.group)
            rows.append(
                f'<tr data-task="{e(entry.task_id or "")}" data-level="{waiting.level}">'
                f"<td class=n>{waiting.level}</td><td>{dash(waiting.group)}</td>"
                f"<td>{dash(entry.id)}</td><td>{dash(entry.task_name)}</td>"
                f"<td>{dash(entry.task_id)}</td><td>{button}</td></tr>"
            )
        shown = len(waiting.entries)
        if waiting.total is not None and waiting.total > shown:
            notes.append(f"{where(waiting)}: the next {shown} of {waiting.total}")
        elif waiting.total is None and shown >= WAITING_ENTRIES:  # e.g. lag after a deletion
            notes.append(f"{where(waiting)}: the next {shown}; more may wait")
    out = table(
        ["Priority", "Group", "Entry", "Task", "Task id", ""],
        rows,
        "No message waits: workers have taken every one.",
        "waiting",
    )
    if notes:
        out += f'<p class="muted" id="waiting-more">Listed: {e("; ".join(notes))}.</p>'
    return out


def where(waiting: Waiting) -> str:
    """``priority 3 (group taskiq)``: which level, and for which group, a list is of."""
    group = f" (group {waiting.group})" if waiting.group is not None else ""
    return f"priority {waiting.level}{group}"


def delayed_table(base: str, detail: QueueDetail, allow_actions: bool, token: str) -> str:
    now_ms = int(time.time() * 1000)
    rows = []
    for d in detail.delayed:
        button = ""
        if allow_actions and d.task_id is not None:
            button = cancel_button(base, detail.view.name, token, d.task_id, None)
        rows.append(
            f'<tr data-task="{e(d.task_id or "")}"><td>{e(clock(d.due_ms / 1000))}</td>'
            f"<td>{e(age(d.due_ms - now_ms))}</td><td>{dash(d.task_name)}</td>"
            f"<td>{dash(d.task_id)}</td><td>{dash(d.level)}</td><td>{button}</td></tr>"
        )
    return table(
        ["Due", "In", "Task", "Task id", "Priority", ""], rows, "No delayed messages.", "delayed"
    )


def requeue_and_purge(
    base: str, queue: str, token: str, what: str, fields: dict[str, str], confirm: str
) -> str:
    """The two dead-letter buttons, for all of a queue's (``what``) or one (``fields``)."""
    return (
        action_form(base, "requeue", queue, token, f"Requeue{what}", fields)
        + " "
        + action_form(base, "purge", queue, token, f"Purge{what}", fields, confirm=confirm)
    )


def dead_letter_section(base: str, detail: QueueDetail, allow_actions: bool, token: str) -> str:
    view = detail.view
    out = []
    if detail.dead_letters and allow_actions:
        out.append(
            '<div class="actions">'
            + requeue_and_purge(
                base,
                view.name,
                token,
                " all dead letters",
                {},
                f"Delete every dead letter of {view.name}? This cannot be undone.",
            )
            + "</div>"
        )
    rows = []
    for letter in detail.dead_letters:
        buttons = ""
        if allow_actions:
            buttons = requeue_and_purge(
                base, view.name, token, "", {"id": letter.id}, f"Delete dead letter {letter.id}?"
            )
        rows.append(
            f'<tr data-letter="{e(letter.id)}"><td>{e(letter.id)}</td>'
            f'<td data-field="task">{dash(letter.task_name)}</td><td>{dash(letter.task_id)}</td>'
            f"<td class=n>{dash(letter.deliveries)}</td><td>{e(age(letter.age_ms))}</td>"
            f"<td>{dash(letter.group)}</td>"
            f'<td data-field="reason">{dash(letter.reason)}</td><td>{buttons}</td></tr>'
        )
    out.append(
        table(
            ["Entry", "Task", "Task id", "Deliveries", "Age", "Group", "Reason", ""],
            rows,
            "No dead letters.",
            "dead-letters",
        )
    )
    if view.dead_letters > len(detail.dead_letters):
        out.append(
            f'<p class="muted">The oldest {len(detail.dead_letters)} of {view.dead_letters} '
            "are listed; the buttons for all act on every one.</p>"
        )
    return "".join(out)


def queue_fragment(base: str, detail: QueueDetail, allow_actions: bool, token: str) -> str:
    """The part of a queue's page that refreshes: figures, then the entries of each kind."""
    return (
        summary(detail)
        + "<h2>Waiting</h2>"
        + waiting_section(base, detail, allow_actions, token)
        + "<h2>Pending</h2>"
        + pending_table(detail)
        + "<h2>Delayed</h2>"
        + delayed_table(base, detail, allow_actions, token)
        + "<h2>Dead letters</h2>"
        + dead_letter_section(base, detail, allow_actions, token)
    )


def cancel_form(base: str, detail: QueueDetail, token: str) -> str:
    """A form to cancel a task by its id, for one of the queue's groups when it has several
    (the group whose delivery counts as taken)."""
    names = [group.name for group in detail.view.groups]
    choice = ""
    if len(names) > 1:
        options = "".join(f'<option value="{e(name)}">{e(name)}</option>' for name in names)
        choice = f' <label>for group <select name="group">{options}</select></label>'
    return (
        f'<form method="post" action="{e(base + "/actions/cancel")}" id="cancel-by-id">'
        f"{hidden({'token': token, 'queue': detail.view.name})}"
        '<label>Cancel a waiting or delayed task by id: <input name="task_id" required '
        f'size="40" autocomplete="off"></label>{choice} '
        '<button type="submit" data-action="cancel">Cancel task</button></form>'
    )


def queue_page(
    base: str,
    detail: QueueDetail,
    nonce: str,
    allow_actions: bool,
    token: str,
    outcome: tuple[str, bool] | None,
    refresh: float,
) -> str:
    """A queue: the last action's outcome, the cancel form (or why there are no buttons),
    then the refreshing figures and entries."""
    out = []
    if outcome is not None:
        message, ok = outcome
        out.append(banner("ok" if ok else "error", message, "status" if ok else "alert"))
    if allow_actions:
        out.append(f'<p id="actions">{cancel_form(base, detail, token)}</p>')
    else:
        out.append(
            '<p class="muted" id="actions">Read-only: start the dashboard with --allow-actions '
            "to cancel waiting tasks and to requeue or purge dead letters.</p>"
        )
    out.append(
        live(
            "queue",
            base + fragment_path(detail.view.name),
            queue_fragment(base, detail, allow_actions, token),
        )
    )
    return layout(
        base,
        f"Queue {detail.view.name}",
        "".join(out),
        nonce,
        REFRESH_SCRIPT + CONFIRM_SCRIPT,
        refresh,
    )
