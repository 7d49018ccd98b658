"""A web page for watching the worker: ``worker dashboard`` (or ``python worker_dashboard.py``).

Standard library only.  Each request opens the database read-only
(``worker.connect_readonly``), so looking never writes.  With
``--allow-actions`` the pages also offer retry and cancel buttons; they POST to
``/jobs/<id>/retry`` and ``/jobs/<id>/cancel`` and need the token printed at
start (as the form field ``token`` or the header ``X-Worker-Token``).

    $ worker dashboard --db app.db                  # http://127.0.0.1:8750/
    $ worker dashboard --db app.db --allow-actions  # prints the URL with its token

Routes: ``/`` (refreshes itself), ``/jobs/<id>``, ``/status.json`` (the same
report as ``worker status --json``) and ``/metrics`` (Prometheus's text format).  Job data, type names and errors are
written by other programs, so every value taken from the table is escaped.
This module imports worker only; neither worker.py nor worker_cli.py needs it to run jobs.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import html
import http.cookies
import json
import logging
import math
import os
import re
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import worker

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8750
REFRESH_SECONDS = 5
RECENT_LIMIT = 20  # rows in "recent failures" and "latest jobs"
MAX_FORM_BYTES = 4_096
# A browser opens about 6 connections to a host; more than this at once are
# answered 503 at once, so no client can make the process start threads without end.
MAX_CONNECTIONS = 32
# A connection's whole time, from accept to the end of the answer: an idle or
# trickling client is cut off then (a page takes milliseconds to make).
CONNECTION_SECONDS = 20.0
BUSY_ANSWER = b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
TOKEN_FIELD = "token"
TOKEN_HEADER = "X-Worker-Token"
TOKEN_COOKIE = "worker_dashboard_token"
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})

CONTENT_TYPES = {
    "html": "text/html; charset=utf-8",
    "json": "application/json",
    "metrics": "text/plain; version=0.0.4; charset=utf-8",  # Prometheus's text format
}

JOB_PATH = re.compile(r"/jobs/(\d+)")
ACTION_PATH = re.compile(r"/jobs/(\d+)/(retry|cancel)")
QUEUE_ACTION_PATH = re.compile(r"/queues/([^/]+)/(pause|resume)")
_FAILED = object()  # a dashboard write that failed, and was answered with the error

logger = logging.getLogger("worker.dashboard")


def retries_of(store: worker.Store, jobs: list[worker.Job]) -> dict[int, int]:
    """For each failed or cancelled job that was retried, the id of its retry."""
    ids = [j.id for j in jobs if j.status in ("failed", "cancelled")]
    return store.retried_as(ids) if ids else {}


# --- HTML: everything not marked Html is escaped ---------------------------------


class Html(str):
    """Text that is already HTML.  Any other value put on a page goes through e()."""


def e(value: Any) -> Html:
    """A value from the table, escaped for HTML text and attributes ("-" for None)."""
    if isinstance(value, Html):
        return value
    return Html(html.escape("-" if value is None else str(value)))


def when(epoch_ms: int | None) -> str:
    """Epoch ms as a UTC time people read."""
    if epoch_ms is None:
        return "-"
    try:
        return datetime.fromtimestamp(epoch_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    except (OverflowError, ValueError, OSError):  # beyond the years 1 to 9999: written by another program
        return worker.iso_time(epoch_ms)


def job_link(id: int | None) -> Html:
    """A link to a job's own page."""
    return Html("-") if id is None else Html(f'<a href="/jobs/{int(id)}">{int(id)}</a>')


def badge(state: str | None) -> Html:
    """A status (or fresh/stale) in its colour."""
    return Html(f'<span class="badge {e(state)}">{e(state)}</span>')


def first_line(text: str | None) -> str:
    """The message of an error, without its traceback."""
    return (text or "").strip().split("\n", 1)[0]


def table(headers: list[str], rows: list[list[Any]], empty: str = "none", id: str = "") -> Html:
    """A table; every cell that is not Html is escaped."""
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{e(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    if not rows:
        body = f'<tr><td colspan="{len(headers)}" class="muted">{e(empty)}</td></tr>'
    opening = f'<table id="{e(id)}">' if id else "<table>"
    return Html(f"{opening}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def action_button(id: int, action: str, token: str) -> Html:
    """A form that POSTs a retry or cancel with the token."""
    return Html(
        f'<form method="post" action="/jobs/{int(id)}/{e(action)}">'
        f'<input type="hidden" name="{TOKEN_FIELD}" value="{e(token)}">'
        f'<button type="submit" class="{e(action)}">{e(action)}</button></form>'
    )


def queue_button(queue: str, action: str, token: str) -> Html:
    """A form that POSTs a pause or resume of a queue with the token (the name in the path, percent-encoded)."""
    return Html(
        f'<form method="post" action="/queues/{e(quote(queue, safe=""))}/{e(action)}">'
        f'<input type="hidden" name="{TOKEN_FIELD}" value="{e(token)}">'
        f'<button type="submit" class="{e(action)}">{e(action)}</button></form>'
    )


def actions_for(job: worker.Job, token: str | None, retried_as: int | None = None) -> Html:
    """What can be done with a row: retry a failed or cancelled one, cancel a pending one, ask a running one's
    worker to stop it."""
    if retried_as is not None:
        return Html(f"retried as {job_link(retried_as)}")
    if token is None:
        return Html("")
    if job.status in ("failed", "cancelled"):
        return action_button(job.id, "retry", token)
    if job.status in ("pending", "running"):
        return action_button(job.id, "cancel", token)
    return Html("")


def pretty_json(value: Any) -> Html:
    """Job data or a result, indented; text the tools could not decode is shown as stored, cut short."""
    if isinstance(value, worker.StoredText):
        return Html(f"<pre>{e(value.excerpt())}</pre>")
    return Html(f"<pre>{e(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False))}</pre>")


CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #222; background: #fafafa; }
header { background: #263238; color: #eceff1; padding: .6rem 1.2rem; }
header a { color: #fff; font-weight: 600; text-decoration: none; margin-right: 1rem; }
main { padding: .5rem 1.2rem 2rem; }
h1 { font-size: 1.25rem; } h2 { font-size: 1.05rem; margin: 1.4rem 0 .4rem; }
table { border-collapse: collapse; background: #fff; min-width: 30rem; }
th, td { border: 1px solid #ddd; padding: .25rem .55rem; text-align: left; vertical-align: top; white-space: nowrap; }
th { background: #eceff1; font-weight: 600; }
td:has(> details) { white-space: normal; min-width: 30rem; max-width: 60rem; }
pre { background: #263238; color: #eceff1; padding: .6rem; overflow: auto; max-height: 30rem; margin: .3rem 0; }
details pre { white-space: pre-wrap; }
summary { cursor: pointer; }
.muted { color: #777; }
.badge { padding: 0 .4rem; border-radius: .6rem; color: #fff; background: #78909c; }
.succeeded, .fresh { background: #2e7d32; } .failed, .stale { background: #c62828; }
.running { background: #00838f; } .pending { background: #ef6c00; } .cancelled { background: #9e9e9e; }
form { display: inline; } button { cursor: pointer; }
.note { background: #fff8e1; border: 1px solid #ffe082; padding: .4rem .7rem; display: inline-block; }
svg.chart { background: #fff; border: 1px solid #ddd; display: block; }
svg.chart .done { fill: #2e7d32; } svg.chart .fail { fill: #c62828; } svg.chart .cancel { fill: #9e9e9e; }
svg.chart text { font: 11px system-ui, sans-serif; fill: #555; } svg.chart line { stroke: #ccc; }
"""


# --- The last hour, minute by minute: inline SVG (no script, nothing from elsewhere) --------

CHART_MINUTES = 60
BAR_WIDTH, CHART_HEIGHT, LABEL_WIDTH = 8, 80, 44
CHART_CLASSES = {"succeeded": "done", "failed": "fail", "cancelled": "cancel"}  # bottom to top


def render_chart(by_minute: list[tuple[int, str, int]], now: int) -> Html:
    """Rows finished in each of the last 60 minutes, succeeded / failed / cancelled stacked (the per-minute counts)."""
    first = now - now % worker.MINUTE_MS - (CHART_MINUTES - 1) * worker.MINUTE_MS
    counts: dict[int, dict[str, int]] = {}
    for minute, state, count in by_minute:
        if minute >= first and state in CHART_CLASSES:
            column = counts.setdefault((minute - first) // worker.MINUTE_MS, {})
            column[state] = column.get(state, 0) + int(count)
    top = max((sum(column.values()) for column in counts.values()), default=0)
    scale = CHART_HEIGHT / top if top else 0.0
    width = LABEL_WIDTH + CHART_MINUTES * BAR_WIDTH
    parts = [
        f'<svg class="chart" role="img" width="{width}" height="{CHART_HEIGHT + 18}" '
        f'viewBox="0 0 {width} {CHART_HEIGHT + 18}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>rows finished per minute, the last {CHART_MINUTES} minutes</title>",
        f'<line x1="{LABEL_WIDTH}" y1="{CHART_HEIGHT}" x2="{width}" y2="{CHART_HEIGHT}"/>',
        f'<text x="0" y="10">{e(top)}/min</text><text x="0" y="{CHART_HEIGHT}">0</text>',
        f'<text x="{LABEL_WIDTH}" y="{CHART_HEIGHT + 14}">{CHART_MINUTES} min ago</text>',
        f'<text x="{width - 24}" y="{CHART_HEIGHT + 14}">now</text>',
    ]
    for index, column in sorted(counts.items()):
        x, bottom = LABEL_WIDTH + index * BAR_WIDTH, float(CHART_HEIGHT)
        at = when(first + index * worker.MINUTE_MS)
        for state, css in CHART_CLASSES.items():
            if not column.get(state):
                continue
            height = column[state] * scale
            bottom -= height
            parts.append(
                f'<rect class="{css}" x="{x}" y="{max(bottom, 0.0):.1f}" width="{BAR_WIDTH - 1}" height="{height:.1f}">'
                f"<title>{e(at)}: {e(column[state])} {e(state)}</title></rect>"
            )
    parts.append("</svg>")
    return Html("<h2>Finished per minute, last hour</h2>" + "".join(parts))


# --- /metrics: the Prometheus text format -----------------------------------------------

# A minute's count stops changing once its minute is over: an outcome is
# counted in the minute it is recorded in.  Ten minutes leaves room for clocks.
SETTLED_MS = 10 * worker.MINUTE_MS


class FinishedCounters:
    """Rows finished per (queue, status) since this process started: counters, which only grow.

    The table's per-minute counts are pruned after a while (retention), so a
    sum over them would fall.  The minutes that have settled are added up here
    once, and only the later ones are read again at each scrape.
    """

    def __init__(self, now: int) -> None:
        self.settled_before = now - now % worker.MINUTE_MS
        self.settled: dict[tuple[str, str], int] = {}
        self.lock = threading.Lock()

    def read(self, store: worker.Store, now: int) -> dict[tuple[str, str], int]:
        with self.lock:
            recent = _by_key(store.finished_by_queue(self.settled_before))
            boundary = now - now % worker.MINUTE_MS - SETTLED_MS
            if boundary > self.settled_before:
                later = _by_key(store.finished_by_queue(boundary))
                for key, count in recent.items():
                    self.settled[key] = self.settled.get(key, 0) + count - later.get(key, 0)
                self.settled_before, recent = boundary, later
            return {key: self.settled.get(key, 0) + recent.get(key, 0) for key in self.settled.keys() | recent.keys()}


def _by_key(rows: list[tuple[str, str, int]]) -> dict[tuple[str, str], int]:
    return {(queue, state): int(count) for queue, state, count in rows}


def label(value: Any) -> str:
    """A label value as the text format spells it (queue names are anyone's text)."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_metrics(report: dict[str, Any], finished: dict[tuple[str, str], int]) -> str:
    """``status`` and the finished counters in the Prometheus text format (version 0.0.4)."""
    lines: list[str] = []

    def family(name: str, kind: str, help: str, samples: list[tuple[dict[str, Any], float]]) -> None:
        lines.extend([f"# HELP {name} {help}", f"# TYPE {name} {kind}"])
        for labels, value in samples:
            given = ",".join(f'{key}="{label(each)}"' for key, each in labels.items())
            number = repr(float(value)) if isinstance(value, float) else str(int(value))
            lines.append(f"{name}{{{given}}} {number}" if given else f"{name} {number}")

    queues = report["queues"]
    family(
        "worker_jobs",
        "gauge",
        "Rows pending (due now or later) or running, per queue.",
        [
            *(({"queue": q["queue"], "status": "pending"}, q["pending_due"] + q["pending_later"]) for q in queues),
            *(({"queue": q["queue"], "status": "running"}, q["running"]) for q in queues),
        ],
    )
    family(
        "worker_jobs_due",
        "gauge",
        "Pending rows due now: waiting for a worker.",
        [({"queue": q["queue"]}, q["pending_due"]) for q in queues],
    )
    family(
        "worker_jobs_oldest_waiting_seconds",
        "gauge",
        "How long the oldest due pending row has waited.",
        [
            ({"queue": q["queue"]}, q["oldest_waiting_seconds"])
            for q in queues
            if q["oldest_waiting_seconds"] is not None
        ],
    )
    family(
        "worker_queue_paused",
        "gauge",
        "1 while the queue is paused.",
        [({"queue": q["queue"]}, int(bool(q.get("paused")))) for q in queues],
    )
    family(
        "worker_jobs_finished_total",
        "counter",
        "Rows finished per queue and status (succeeded, failed, cancelled) since this dashboard started.",
        [({"queue": queue, "status": state}, count) for (queue, state), count in sorted(finished.items())],
    )
    workers = report["workers"]
    family(
        "worker_processes",
        "gauge",
        "Registered worker processes, and those with a fresh heartbeat.",
        [
            ({"fresh": "false"}, sum(not w["fresh"] for w in workers)),
            ({"fresh": "true"}, sum(bool(w["fresh"]) for w in workers)),
        ],
    )
    family(
        "worker_process_heartbeat_age_seconds",
        "gauge",
        "Seconds since each worker process's last heartbeat.",
        [({"worker": f"{w['host']}:{w['pid']}"}, w["heartbeat_age_seconds"]) for w in workers],
    )
    family(
        "worker_process_running_jobs",
        "gauge",
        "Rows each worker process holds (claimed ahead included).",
        [({"worker": f"{w['host']}:{w['pid']}"}, w["running"]) for w in workers],
    )
    return "\n".join(lines) + "\n"


def page(title: str, body: Html, *, nonce: str, refresh: int | None = None) -> str:
    """A whole page; ``refresh`` reloads it every so many seconds, unless a traceback is open."""
    reload = ""
    if refresh:
        reload = (
            f'<script nonce="{e(nonce)}">setInterval(() => {{'
            ' if (!document.querySelector("details[open]")) location.reload(); }'
            f", {int(refresh * 1000)});</script>"
            f'<noscript><meta http-equiv="refresh" content="{int(refresh)}"></noscript>'
        )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<title>{e(title)}</title><style nonce="{e(nonce)}">{CSS}</style>{reload}</head>'
        f'<body><header><a href="/">worker dashboard</a><a href="/status.json">status.json</a></header>'
        f"<main>{body}</main></body></html>"
    )


def progress_bar(text: str | None) -> Html:
    """A row's progress: a <progress> bar (no script needed) when it has a total, and its words."""
    if not text:
        return Html("")
    fraction = worker.progress_fraction(text)
    bar = "" if fraction is None else f'<progress max="1" value="{fraction:.3f}">{fraction:.0%}</progress> '
    return Html(f"{bar}{e(worker.progress_text(text))}")


def render_index(
    report: dict[str, Any],
    failures: list[worker.Job],
    latest: list[worker.Job],
    *,
    token: str | None,
    retried: dict[int, int],
    running: list[worker.Job] | None = None,
    progress: dict[int, str] | None = None,
    chart: Html | None = None,
) -> Html:
    """The front page: the last hour's ``chart``, queues, workers, cron jobs, recent failures and the latest rows."""
    fresh = sum(1 for w in report["workers"] if w["fresh"])
    health = badge("fresh") if report["healthy"] else badge("stale")
    parts = [
        Html(
            f"<h1>{e(report['database'])}</h1><p>{health} {e(fresh)} of {e(len(report['workers']))} workers "
            f"with a fresh heartbeat &middot; schema {e(report['schema_version'])} &middot; "
            f"{e(report['engine'])} "
            f"&middot; {e(when(report['now']))}</p>"
        )
    ]
    parts += [
        chart or Html(""),
        Html("<h2>Queues</h2>"),
        table(
            [
                "queue",
                "due",
                "later",
                "running",
                "succeeded 1h",
                "failed 1h",
                "cancelled 1h",
                "oldest waiting",
                "controls",
                "",
            ],
            [
                [
                    q["queue"],
                    q["pending_due"],
                    q["pending_later"],
                    q["running"],
                    q["succeeded_last_hour"],
                    q["failed_last_hour"],
                    q["cancelled_last_hour"],
                    worker.ago(q["oldest_waiting_seconds"]),
                    worker.controls_text(q) or "-",
                    queue_button(q["queue"], "resume" if q["paused"] else "pause", token) if token else "",
                ]
                for q in report["queues"]
            ],
            empty="no jobs",
            id="queues",
        ),
        Html("<h2>Workers</h2>"),
        table(
            ["host", "pid", "started", "heartbeat", "state", "running", "queues", "version"],
            [
                [
                    w["host"],
                    w["pid"],
                    when(w["started"]),
                    f"{worker.ago(w['heartbeat_age_seconds'])} ago",
                    badge("fresh" if w["fresh"] else "stale"),
                    f"{w['running']} of {w['concurrency']}",
                    w["queues"] or "all",
                    w["version"],
                ]
                for w in report["workers"]
            ],
            empty="no worker has registered",
            id="workers",
        ),
        *(
            [
                Html("<h2>Pending jobs no live worker runs</h2>"),
                table(
                    ["type", "pending", "oldest due"],
                    [[u["type"], u["pending"], when(u["oldest_due"])] for u in report["unrunnable"]],
                    empty="",
                    id="unrunnable",
                ),
            ]
            if report["unrunnable"]
            else []
        ),
        Html("<h2>Cron jobs</h2>"),
        table(
            ["type", "schedule", "timezone", "next run", "next job", "last job", "last finished", "last status"],
            [
                [
                    c["type"],
                    Html(f"<code>{e(c['schedule'])}</code>"),
                    c["timezone"],
                    when(c["next_due"]),
                    job_link(c["next_job"]),
                    job_link(c["last_job"]),
                    when(c["last_finished"]),
                    badge(c["last_status"]) if c["last_status"] else "-",
                ]
                for c in report["cron"]
            ],
            empty="no recurring jobs",
            id="cron",
        ),
        Html("<h2>Recent failures</h2>"),
        table(
            ["id", "type", "queue", "attempt", "finished", "error", ""],
            [
                [
                    job_link(j.id),
                    j.type,
                    j.queue,
                    j.attempt,
                    when(j.finished),
                    Html(f"<details><summary>{e(first_line(j.error))}</summary><pre>{e(j.error)}</pre></details>"),
                    actions_for(j, token, retried.get(j.id)),
                ]
                for j in failures
            ],
            empty="no failed jobs",
            id="failures",
        ),
        Html("<h2>Running</h2>"),
        table(
            ["id", "type", "queue", "started", "progress", ""],
            [
                [
                    job_link(j.id),
                    j.type,
                    j.queue,
                    when(j.started),
                    progress_bar((progress or {}).get(j.id)),
                    actions_for(j, token),
                ]
                for j in running or []
            ],
            empty="no running jobs",
            id="running",
        ),
        Html("<h2>Latest jobs</h2>"),
        table(
            ["id", "type", "status", "queue", "attempt", "due", "finished", ""],
            [
                [
                    job_link(j.id),
                    j.type,
                    badge(j.status),
                    j.queue,
                    j.attempt,
                    when(j.due),
                    when(j.finished),
                    actions_for(j, token, retried.get(j.id)),
                ]
                for j in latest
            ],
            empty="no jobs",
            id="latest",
        ),
    ]
    return Html("".join(parts))


def continues(later: worker.Job, job: worker.Job) -> bool:
    """Whether a row pointing back to ``job`` goes on with its run: a retry (a later attempt), or its snooze (the
    same attempt of the same cron slot); not the next run of a schedule (attempt 1 of a new slot)."""
    return later.attempt > job.attempt or (later.attempt == job.attempt and later.cron_slot == job.cron_slot)


def render_job(job: worker.Job, chain: list[worker.Job], *, token: str | None, progress: str | None = None) -> Html:
    """A job's page: its row, data, result, error and chain."""
    retried_as = next((j.id for j in chain if j.rescheduled_from_job == job.id and continues(j, job)), None)
    cron = job.cron_schedule and f"{job.cron_schedule} ({job.cron_timezone or 'UTC'})"
    fields = [
        ("status", badge(job.status)), ("queue", job.queue), ("priority", job.priority),
        ("attempt", job.attempt), ("created", when(job.created_at)), ("due", when(job.due)),
        ("started", when(job.started)), ("finished", when(job.finished)), ("worker", job.worker),
        ("tag", job.tag), ("cron", cron), ("from job", job_link(job.rescheduled_from_job)),
        ("worker deaths", job.deaths), ("remove at", "never" if job.persistent else when(job.remove_at)),
        ("progress", progress_bar(progress)),
    ]  # fmt: skip
    parts = [
        Html(f"<h1>Job {e(job.id)} <code>{e(job.type)}</code> {actions_for(job, token, retried_as)}</h1>"),
        table(["field", "value"], [[name, value] for name, value in fields]),
        Html("<h2>Data</h2>"),
        pretty_json(job.data),
    ]
    if job.result is not None or job.status == "succeeded":
        parts += [Html("<h2>Result</h2>"), pretty_json(job.result)]
    if job.error:
        parts += [Html(f"<h2>Error</h2><pre>{e(job.error.rstrip())}</pre>")]
    parts += [
        Html("<h2>Chain</h2>"),
        table(
            ["id", "type", "status", "attempt", "due", "finished", "error"],
            [
                [
                    Html(f"<strong>{e(j.id)}</strong>") if j.id == job.id else job_link(j.id),
                    j.type,
                    badge(j.status),
                    j.attempt,
                    when(j.due),
                    when(j.finished),
                    first_line(j.error),
                ]
                for j in chain
            ],
        ),
    ]
    return Html("".join(parts))


def message_page(status: HTTPStatus, text: str, *, nonce: str) -> str:
    """A page that only says what went wrong."""
    return page(f"{status.value} {status.phrase}", Html(f"<h1>{e(status.phrase)}</h1><p>{e(text)}</p>"), nonce=nonce)


# --- The server ----------------------------------------------------------------


class DashboardServer(ThreadingHTTPServer):
    """Serves the pages of one database; ``token`` is None unless actions are allowed.

    At most ``max_connections`` at once, each a thread for at most
    ``connection_seconds`` (the cut-off runs in serve_forever's loop).
    """

    daemon_threads = True

    def __init__(
        self,
        db: str,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        *,
        allow_actions: bool = False,
        refresh_seconds: int = REFRESH_SECONDS,
        max_connections: int = MAX_CONNECTIONS,
        connection_seconds: float = CONNECTION_SECONDS,
    ) -> None:
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), DashboardHandler)
        self.db = db
        self.refresh_seconds = refresh_seconds
        self.connection_seconds = connection_seconds
        self.connection_slots = threading.BoundedSemaphore(max_connections)
        self.deadlines: dict[socket.socket, float] = {}  # of the connections being served
        self.deadlines_lock = threading.Lock()
        self.token = secrets.token_urlsafe(24) if allow_actions else None
        self.finished_counters = FinishedCounters(worker.now_ms())
        # On loopback, a request naming another host is a DNS-rebinding page
        # trying to read ours: refuse it.  Bound elsewhere, the names are unknown.
        self.allowed_hosts = LOOPBACK_NAMES | {host} if host in LOOPBACK_NAMES else None

    @property
    def url(self) -> str:
        """Where the dashboard is, with the port actually bound (port 0 picks one)."""
        host, port = self.socket.getsockname()[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve a connection in a thread of its own if a slot is free; else answer 503 and close it."""
        if not self.connection_slots.acquire(blocking=False):
            logger.debug("dashboard: %s refused, %d connections open", client_address, len(self.deadlines))
            with contextlib.suppress(OSError):
                request.setblocking(False)  # never wait on this client: the accepting thread serves everyone
                request.send(BUSY_ANSWER)
            self.shutdown_request(request)
            return
        with self.deadlines_lock:
            self.deadlines[request] = time.monotonic() + self.connection_seconds
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started (the caller closes the connection)
            self.connection_slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connection_slots.release()

    def shutdown_request(self, request: Any) -> None:
        with self.deadlines_lock:  # forgotten before it is closed, so service_actions never touches a closed socket
            self.deadlines.pop(request, None)
        super().shutdown_request(request)

    def service_actions(self) -> None:
        """Between accepts (each poll interval): cut off connections past their time; their threads then end."""
        self._cut_off(time.monotonic())

    def server_close(self) -> None:
        """Stop listening and cut off the connections still open (a browser keeps idle ones), so their threads end."""
        self._cut_off(math.inf)
        super().server_close()

    def _cut_off(self, now: float) -> None:
        with self.deadlines_lock:
            for request, deadline in self.deadlines.items():
                if deadline < now:
                    with contextlib.suppress(OSError):
                        request.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked reading or writing it

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection cut off, timed out or reset by its client is no error of ours: logged at DEBUG."""
        if isinstance(sys.exc_info()[1], OSError):
            logger.debug("dashboard: connection from %s ended: %s", client_address, sys.exc_info()[1])
        else:
            logger.exception("dashboard: request from %s failed", client_address)


class DashboardHandler(BaseHTTPRequestHandler):
    """GET pages and JSON; POST retry and cancel when actions are allowed."""

    server: DashboardServer
    nonce = ""  # of this response's own script and style (Content-Security-Policy)
    server_version = f"worker-dashboard/{worker.__version__}"

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.connection_seconds)  # each read and write; the server bounds the whole

    def do_GET(self) -> None:
        self.nonce = secrets.token_urlsafe(12)
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if not self._host_allowed():
            self._message(HTTPStatus.FORBIDDEN, "unexpected Host header")
        elif TOKEN_FIELD in query:
            self._accept_token(url.path, query[TOKEN_FIELD][0])
        elif url.path == "/":
            self._read(self._index)
        elif url.path == "/metrics":
            self._read(self._metrics)
        elif url.path == "/status.json":
            self._read(lambda conn: self._send(HTTPStatus.OK, json.dumps(worker.status(conn), indent=2), "json"))
        elif match := JOB_PATH.fullmatch(url.path):
            self._read(lambda conn: self._job(conn, int(match[1])))
        else:
            self._message(HTTPStatus.NOT_FOUND, f"no page {url.path}")

    def do_POST(self) -> None:
        self.nonce = secrets.token_urlsafe(12)
        match = ACTION_PATH.fullmatch(urlsplit(self.path).path)
        on_queue = QUEUE_ACTION_PATH.fullmatch(urlsplit(self.path).path)
        if not self._host_allowed():
            self._message(HTTPStatus.FORBIDDEN, "unexpected Host header")
        elif match is None and on_queue is None:
            self._message(HTTPStatus.NOT_FOUND, f"no action {urlsplit(self.path).path}")
        elif self.server.token is None:
            self._message(HTTPStatus.FORBIDDEN, "actions are off: start the dashboard with --allow-actions")
        elif not self._token_given():
            self._message(HTTPStatus.FORBIDDEN, "missing or wrong token: use the one printed at start")
        elif on_queue is not None:
            self._control(unquote(on_queue[1]), on_queue[2])
        else:
            assert match is not None
            self._act(int(match[1]), match[2])

    # -- pages ----------------------------------------------------------------------

    def _index(self, conn: Any) -> None:
        report = worker.status(conn)
        failures = worker.list_jobs(conn, status="failed", limit=RECENT_LIMIT)
        latest = worker.list_jobs(conn, limit=RECENT_LIMIT)
        running = worker.list_jobs(conn, status="running", limit=RECENT_LIMIT)
        progress = worker.as_store(conn).progress_of([j.id for j in running])
        token = self._page_token()
        chart = render_chart(conn.finished_by_minute(report["now"] - CHART_MINUTES * worker.MINUTE_MS), report["now"])
        body = render_index(report, failures, latest, token=token, retried=retries_of(conn, failures + latest),
                            running=running, progress=progress, chart=chart)  # fmt: skip
        if self.server.token is not None and token is None:
            body = Html('<p class="note">Retry and cancel are allowed: open the URL printed at start.</p>' + body)
        self._send(HTTPStatus.OK, page("worker dashboard", body, nonce=self.nonce, refresh=self.server.refresh_seconds))

    def _metrics(self, conn: Any) -> None:
        report = worker.status(conn)
        finished = self.server.finished_counters.read(conn, report["now"])
        self._send(HTTPStatus.OK, render_metrics(report, finished), "metrics")

    def _job(self, conn: Any, id: int) -> None:
        chain = worker.job_chain(conn, id)
        found = next((j for j in chain if j.id == id), None)
        if found is None:
            self._message(HTTPStatus.NOT_FOUND, f"no job {id}")
            return
        progress = worker.as_store(conn).progress_of([id]).get(id)
        body = render_job(found, chain, token=self._page_token(), progress=progress)
        self._send(HTTPStatus.OK, page(f"job {id} {found.type}", body, nonce=self.nonce))

    def _control(self, queue: str, action: str) -> None:
        """Pause or resume a queue, then back to the front page."""

        def control(producer: worker.Queue) -> None:
            if action == "pause":
                producer.pause(queue)
            else:
                producer.resume(queue)

        if self._write(control, f"{action} of queue {queue!r}") is not _FAILED:
            logger.info("queue %r: %s from the dashboard", queue, action)
            self._redirect("/")

    def _write(self, write: Callable[[worker.Queue], Any], what: str) -> Any:
        """``write`` on a Queue of its own; its value, or _FAILED once the error has been answered."""
        try:
            with worker.Queue(self.server.db, check_types=False) as producer:
                return write(producer)
        except worker.DatabaseUnusable as error:
            self._message(HTTPStatus.SERVICE_UNAVAILABLE, str(error))
        except worker.DatabaseUnavailable as error:
            self._try_again(what, error)
        except Exception as error:  # say so rather than drop the connection
            logger.exception("dashboard %s failed", what)
            self._message(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(error).__name__}: {error}")
        return _FAILED

    def _act(self, id: int, action: str) -> None:
        def act(producer: worker.Queue) -> tuple[int | None, worker.Job | None]:
            if action == "retry":
                new = producer.retry(id)
                done_id = None if new is None else new.id
            else:
                done_id = id if producer.cancel(id, by=f"dashboard, from {self.client_address[0]}") else None
            return done_id, (producer.get(id) if done_id is None else None)

        done = self._write(act, f"{action} of job {id}")
        if done is _FAILED:
            return
        done_id, found = done
        if done_id is not None:
            logger.info("job %d: %s from the dashboard (now job %d)", id, action, done_id)
            self._redirect(f"/jobs/{done_id}")
        elif found is None:
            self._message(HTTPStatus.NOT_FOUND, f"no job {id}")
        elif action == "retry" and found.status in ("failed", "cancelled"):
            self._message(HTTPStatus.CONFLICT, f"job {id} was already retried: retry the newest row of its chain")
        elif action == "retry":
            self._message(HTTPStatus.CONFLICT, f"job {id} is {found.status}: only failed or cancelled jobs are retried")
        else:
            asked = " and its worker was asked to stop it already" if found.status == "running" else ""
            self._message(HTTPStatus.CONFLICT, f"job {id} is {found.status}{asked}: only pending and running jobs "
                          "can be cancelled, a running one once")  # fmt: skip

    # -- the token --------------------------------------------------------------------

    def _accept_token(self, path: str, given: str) -> None:
        """The start-up URL's ?token=: remember it in a cookie, so pages can show the buttons."""
        if self.server.token is None or not hmac.compare_digest(given.encode(), self.server.token.encode()):
            self._message(HTTPStatus.FORBIDDEN, "wrong token, or actions are off")
            return
        cookie = f"{TOKEN_COOKIE}={self.server.token}; Path=/; HttpOnly; SameSite=Strict"
        self._redirect(path, {"Set-Cookie": cookie})

    def _page_token(self) -> str | None:
        """The token to put in the page's forms: only for a browser that came with it."""
        if self.server.token is None:
            return None
        cookies = http.cookies.SimpleCookie(self.headers.get("Cookie", ""))
        morsel = cookies.get(TOKEN_COOKIE)
        if morsel and hmac.compare_digest(morsel.value.encode(), self.server.token.encode()):
            return self.server.token
        return None

    def _token_given(self) -> bool:
        """The POST carries the token as a header or a form field (a cookie alone is not enough)."""
        assert self.server.token is not None
        declared = self.headers.get("Content-Length", "")
        length = int(declared) if declared.isdigit() else 0
        form = parse_qs(self.rfile.read(min(length, MAX_FORM_BYTES)).decode("utf-8", "replace"))
        given = self.headers.get(TOKEN_HEADER) or form.get(TOKEN_FIELD, [""])[0]
        return hmac.compare_digest(given.encode(), self.server.token.encode())

    def _host_allowed(self) -> bool:
        if self.server.allowed_hosts is None:
            return True
        name = urlsplit("//" + self.headers.get("Host", "")).hostname
        return name is None or name in self.server.allowed_hosts

    # -- responses ------------------------------------------------------------------

    def _read(self, respond: Callable[[Any], None]) -> None:
        """Answer from a read-only connection opened for this request."""
        try:
            conn = worker.open_reader(self.server.db)
        except worker.DatabaseUnusable as error:
            self._message(HTTPStatus.SERVICE_UNAVAILABLE, str(error))
            return
        try:
            respond(conn)
        except worker.DatabaseUnavailable as error:
            self._try_again(f"request {self.path}", error)
        except Exception as error:  # one bad request must not take the page down
            logger.exception("dashboard request %s failed", self.path)
            self._message(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(error).__name__}: {error}")
        finally:
            conn.close()

    def _send(self, status: HTTPStatus, text: str, kind: str = "html", headers: dict[str, str] | None = None) -> None:
        body = text.encode(errors="backslashreplace")  # a lone surrogate, which JSON in a row may spell as \\udcff
        self.send_response(status)
        self.send_header("Content-Type", CONTENT_TYPES[kind])
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        # Defence in depth behind the escaping: only our own script and style run.
        self.send_header(
            "Content-Security-Policy",
            f"default-src 'none'; script-src 'nonce-{self.nonce}'; style-src 'nonce-{self.nonce}'; "
            "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        )
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _message(self, status: HTTPStatus, text: str, headers: dict[str, str] | None = None) -> None:
        self._send(status, message_page(status, text, nonce=self.nonce), headers=headers)

    def _try_again(self, what: str, error: worker.DatabaseUnavailable) -> None:
        """A database busy or out of reach for now (a long write lock, a server restarting): 503, try again soon;
        one line in the log, not a traceback, as the worker logs it."""
        logger.warning("dashboard %s: %s", what, error)
        self._message(HTTPStatus.SERVICE_UNAVAILABLE, f"{error}; try again in a moment", {"Retry-After": "1"})

    def _redirect(self, location: str, headers: dict[str, str] | None = None) -> None:
        self._send(HTTPStatus.SEE_OTHER, "", headers={"Location": location, **(headers or {})})

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)


# --- The command -----------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``worker dashboard`` command line."""
    parser = argparse.ArgumentParser(
        prog="worker dashboard",
        description="Serve a web page of the worker's queues, workers, cron jobs and failures.",
        epilog="Exit codes: 0 stopped, 1 cannot listen, 2 usage error, 3 database unusable.",
    )
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}; 0 picks a free one")
    parser.add_argument(
        "--db", help="database file [env WORKER_DB] (else DATABASE_URL's sqlite file, else ./worker.db)"
    )
    parser.add_argument(
        "--allow-actions",
        action="store_true",
        help="offer retry and cancel buttons, guarded by a token printed at start (default: read-only)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """The ``worker dashboard`` command; runs until SIGINT or SIGTERM and returns the exit code."""
    args = build_parser().parse_args(argv)
    db = worker.database_target(args.db) if args.db else worker.resolve_db_path()
    try:
        level, log_format = os.environ.get("WORKER_LOG_LEVEL") or "INFO", os.environ.get("WORKER_LOG_FORMAT") or "text"
        worker.configure_logging(level, log_format)
        worker.open_reader(db).close()
    except worker.ConfigError as error:
        print(f"worker: {error}", file=sys.stderr)
        return worker.EXIT_USAGE
    except worker.DatabaseUnusable as error:
        print(f"worker: {error}", file=sys.stderr)
        return worker.EXIT_DATABASE
    try:
        server = DashboardServer(db, args.host, args.port, allow_actions=args.allow_actions)
    except OSError as error:
        print(f"worker: cannot listen on {args.host} port {args.port}: {error.strerror or error}", file=sys.stderr)
        return worker.EXIT_FAILURE
    print(f"dashboard of {worker.redacted(db)} at {server.url} (Ctrl-C stops it)", flush=True)
    if server.token is None:
        print("read-only: start with --allow-actions for retry and cancel buttons", flush=True)
    else:
        print(f"actions allowed with the token {server.token}: open {server.url}?token={server.token}", flush=True)
    if server.allowed_hosts is None:
        print(f"warning: listening on {args.host}: anyone who can reach it can read the job data", file=sys.stderr)

    def on_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return worker.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
