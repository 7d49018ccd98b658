"""The dashboard's /metrics (Prometheus's text format) and its chart of the last hour (issue 18, items 6 and 7).

On both stores.  /metrics is read with prometheus_client's own parser (a dev
dependency only), as a Prometheus server would read it; the counters are
held to what a counter must do: never fall, even as retention prunes the
per-minute counts they come from.
"""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

import worker
from conftest import FakeClock, at
from worker import JobContext, Queue
from worker_dashboard import CHART_MINUTES, DashboardServer, FinishedCounters

pytestmark = pytest.mark.stores("sqlite", "postgres")

HOSTILE_QUEUE = 'mail "eu"\\\nnext'  # a quote, a backslash and a line break: each must be escaped in a label


@pytest.fixture
def jobs(registry: dict[str, worker.JobType]) -> None:
    @worker.job
    def ok(ctx: JobContext) -> str:
        return "ok"

    @worker.job
    def boom(ctx: JobContext) -> None:
        raise RuntimeError("boom")


def scrape(server: DashboardServer) -> tuple[str, dict[str, list[tuple[dict[str, str], float]]]]:
    with urllib.request.urlopen(server.url + "metrics", timeout=10) as answer:
        kind = answer.headers["Content-Type"]
        text = answer.read().decode()
    families = {f.name: [(s.labels, s.value) for s in f.samples] for f in text_string_to_metric_families(text)}
    return kind, families


def value(samples: list[tuple[dict[str, str], float]], **labels: str) -> float | None:
    found = [each for given, each in samples if given == labels]
    return found[0] if found else None


def test_metrics_parse_as_prometheus_text_and_agree_with_the_table(
    jobs: None, queue: Queue, make_worker: Callable[..., worker.Worker], serve: Callable[..., DashboardServer],
) -> None:  # fmt: skip
    """Gauges per queue and status, counters per queue and outcome, worker processes and their heartbeat."""
    for _ in range(3):
        queue.enqueue("ok", queue=HOSTILE_QUEUE)
    queue.enqueue("boom")
    make_worker(burst=True, concurrency=1, clock=time.time).run()
    server = serve()  # its counters start now: these outcomes come after
    make_worker(burst=True, concurrency=1, clock=time.time).run()
    for _ in range(2):
        queue.enqueue("ok")
    queue.enqueue("ok", delay=3600)
    queue.enqueue("ok", queue=HOSTILE_QUEUE)
    running = make_worker(clock=time.time)
    running.start_up()  # a registered process, as a running worker is
    (claimed,) = running.claim(1)

    kind, families = scrape(server)
    assert kind == "text/plain; version=0.0.4; charset=utf-8"
    jobs_by = families["worker_jobs"]
    assert value(jobs_by, queue=HOSTILE_QUEUE, status="pending") == 1
    assert value(jobs_by, queue="default", status="pending") == 2  # one due now, one in an hour
    assert value(jobs_by, queue="default", status="running") == 1
    assert value(families["worker_jobs_due"], queue="default") == 1
    assert value(families["worker_jobs_oldest_waiting_seconds"], queue=HOSTILE_QUEUE) is not None
    assert value(families["worker_queue_paused"], queue="default") == 0
    processes = families["worker_processes"]
    assert value(processes, fresh="true") + value(processes, fresh="false") == 1  # type: ignore[operator]
    (heartbeat,) = families["worker_process_heartbeat_age_seconds"]
    assert heartbeat[0]["worker"] == running.name and heartbeat[1] >= 0
    assert families["worker_process_running_jobs"] == [({"worker": running.name}, 1.0)]
    assert claimed.queue == "default"
    finished = families["worker_jobs_finished"]  # the parser's name for the family of ..._total
    assert value(finished, queue=HOSTILE_QUEUE, status="succeeded") == 3
    assert value(finished, queue="default", status="failed") == 1


def test_finished_counters_count_outcomes_and_never_fall_when_old_minutes_are_pruned(
    jobs: None, queue: Queue, make_worker: Callable[..., worker.Worker], clock: FakeClock, db: str
) -> None:
    """Retention drops the per-minute counts of long ago; the counters keep what those minutes held."""
    counters = FinishedCounters(at(clock))
    for _ in range(2):
        queue.enqueue("ok", now=at(clock))
    queue.enqueue("boom", now=at(clock))
    make_worker(burst=True, concurrency=1).run()
    store = worker.open_reader(db)
    try:
        first = counters.read(store, at(clock))
        assert first == {("default", "succeeded"): 2, ("default", "failed"): 1}
        clock.advance(30 * 60)  # the first minute has long settled
        queue.enqueue("ok", now=at(clock))
        make_worker(burst=True, concurrency=1).run()
        second = counters.read(store, at(clock))
        assert second == {("default", "succeeded"): 3, ("default", "failed"): 1}
        writer = worker.open_store(db)
        try:
            with writer.transaction():
                writer.forget_counts_before(at(clock, -60))  # as retention would: the first minute's counts go
        finally:
            writer.close()
        assert [row for row in store.finished_by_minute(0) if row[0] < at(clock, -60)] == []
        clock.advance(60)
        assert counters.read(store, at(clock)) == second
    finally:
        store.close()


def test_the_front_page_draws_the_last_hours_outcomes_per_minute_in_inline_svg(
    jobs: None, queue: Queue, make_worker: Callable[..., worker.Worker], serve: Callable[..., DashboardServer],
) -> None:  # fmt: skip
    """Bars of the real minutes, each with its counts as a title; no script of its own, no style attribute."""
    for _ in range(4):
        queue.enqueue("ok")
    queue.enqueue("boom")
    make_worker(burst=True, concurrency=1, clock=time.time).run()  # the real clock: this minute
    server = serve()
    with urllib.request.urlopen(server.url, timeout=10) as answer:
        page = answer.read().decode()
    chart = page[page.index("<svg") : page.index("</svg>")]
    titles = re.findall(r"<title>([^<]*)</title>", chart)
    assert titles[0] == f"rows finished per minute, the last {CHART_MINUTES} minutes"
    assert {re.sub(r"^.*: ", "", t) for t in titles[1:]} <= {"4 succeeded", "1 failed", "1 succeeded", "3 succeeded"}
    assert sum(int(t.rsplit(": ", 1)[1].split()[0]) for t in titles[1:] if t.endswith("succeeded")) == 4
    assert sum(int(t.rsplit(": ", 1)[1].split()[0]) for t in titles[1:] if t.endswith("failed")) == 1
    assert "<script" not in chart and "style=" not in chart


def test_chart_of_an_empty_hour_has_no_bars(serve: Callable[..., DashboardServer], queue: Queue) -> None:
    server = serve()
    with urllib.request.urlopen(server.url, timeout=10) as answer:
        page = answer.read().decode()
    assert "<rect" not in page[page.index("<svg") : page.index("</svg>")]
    assert "0/min" in page
