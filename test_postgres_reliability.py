"""Reliability under faults on PostgreSQL: test_reliability.py's guarantees, with the server in the way.

Each scenario runs real ``python -m worker_cli run --db postgresql://...``
processes against the test's own database (conftest's ``postgres_db``), with
test_reliability's jobs module: every run appends ``(job id, attempt, pid,
start|end, epoch ms)`` to a ledger file.  After every scenario the same
``check_table()`` holds the table and the ledger to README's guarantees:
every enqueued job is there and finished, none ran twice unless its worker
died or stalled, exactly one succeeded row per logical job, whose result is
the proof its run wrote.

Faults come from outside, as they would in production: kill -9, SIGSTOP past
the lease (outside a transaction, and inside one), the server terminating
every worker connection (``pg_terminate_backend``), a link cut past the lease
(a TCP proxy of the test's own, on loopback, that severs and restores), a
server that cannot be reached or refuses the worker at start (a wrong
password included), and a server restarted mid-run (a cluster of the test's
own, so that the shared server never restarts).  And one setting rather than a
fault: workers and producers behind PgBouncer in transaction mode.  One fault comes
from inside, by the jobs module wrapping engine methods: a claim that commits
though the worker is told it failed (the reply lost with the connection).  The
table is read here with psycopg, on a connection of the test's own that no
fault touches.

Run time: about 70 s on this 2-core machine when it is quiet, 20,000 jobs
through real processes being the most of it (one fsync per COMMIT, and two
per job for the ledger).
"""

from __future__ import annotations

import collections
import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

import test_reliability
import worker
from conftest import POSTGRES_SERVER, Processes, WorkerProcess, child_pids, process_state, wait_for
from test_reliability import Report, assert_clean_log, check_table, clean_env, ids, pid_of, read_ledger, work

psycopg = pytest.importorskip("psycopg")

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and POSIX signals")

HERE = Path(__file__).resolve().parent
SERVER_NOW_SQL = "SELECT floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint"


# --- Reading the table, from a connection of the test's own -------------------------


class Table:
    """The test's view of worker_jobs: one psycopg connection, never a target of the faults."""

    def __init__(self, url: str) -> None:
        self.conn = psycopg.connect(url, autocommit=True, application_name="test")

    def read(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[tuple[Any, ...]]:
        return self.conn.execute(sql, params).fetchall()

    def now(self) -> int:
        """The server's time in epoch ms: what leases and due times are judged by."""
        return int(self.read(SERVER_NOW_SQL)[0][0])

    def rows(self, where: str = "true", params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Rows of worker_jobs as dicts of worker.COLUMNS, as test_reliability.rows() reads them from SQLite."""
        found = self.read(f"SELECT {worker.SELECT_COLUMNS} FROM worker_jobs WHERE {where} ORDER BY id", params)
        return [dict(zip(worker.COLUMNS, values, strict=True)) for values in found]

    def row(self, job_id: int) -> dict[str, Any]:
        (found,) = self.rows("id = %s", (job_id,))
        return found

    def chain_of(self, first: int) -> list[dict[str, Any]]:
        """A row and every row rescheduled from it, in order."""
        chain = [self.row(first)]
        while following := self.rows("rescheduled_from_job = %s", (chain[-1]["id"],)):
            chain.append(following[0])
        return chain

    def unfinished(self) -> int:
        """Test jobs not finished yet: pending ones due now, and running ones."""
        sql = (
            "SELECT count(*) FROM worker_jobs WHERE type IN ('work', 'poison') AND "
            "(status = 'running' OR (status = 'pending' AND due <= %s))"
        )
        return int(self.read(sql, (self.now(),))[0][0])

    def backends(self, *, busy: bool = False) -> list[int]:
        """Server pids of the other sessions on this database (the workers'); ``busy``: those inside a statement
        or a transaction."""
        sql = "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        if busy:
            sql += " AND state <> 'idle'"
        return [pid for (pid,) in self.read(sql)]

    def terminate_others(self) -> int:
        """pg_terminate_backend of every other session on this database; how many there were."""
        sql = (
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return int(self.read(sql)[0][0])

    def check(self, ledger: Path, enqueued: Sequence[int], **options: Any) -> Report:
        """test_reliability's check() of the whole table and ledger, judged by the server's clock."""
        return check_table(self.rows(), ledger, enqueued, now=self.now(), **options)

    def close(self) -> None:
        self.conn.close()


# --- Fixtures ---------------------------------------------------------------------------


@pytest.fixture
def url(postgres_db: str) -> str:
    return postgres_db


@pytest.fixture
def table(url: str) -> Iterator[Table]:
    view = Table(url)
    yield view
    view.close()


@pytest.fixture
def queue(url: str) -> Iterator[worker.Queue]:
    """The producer side in this test process; the job types live in the workers only."""
    with worker.Queue(url, check_types=False) as producer:
        yield producer


# The SQLite scenarios' ledger file and jobs module (test_reliability.JOBS_MODULE), shared.
ledger = test_reliability.ledger
jobs_file = test_reliability.jobs_file


@pytest.fixture
def run_worker(processes: Processes, url: str, jobs_file: Path, ledger: Path) -> Callable[..., WorkerProcess]:
    """Start ``worker run --db postgresql://...`` on the test's database, jobs module and ledger.

    ``--no-cron`` unless ``cron=True``: the built-in hourly job stays out of the scenarios.
    """

    def start(
        *flags: str, name: str = "worker", env: dict[str, str] | None = None, cron: bool = False, database: str = url
    ) -> WorkerProcess:
        args = ["run", "--db", database, "--jobs", str(jobs_file), *flags, *([] if cron else ["--no-cron"])]
        return processes.start(*args, name=name, env=clean_env(RELIABILITY_LEDGER=str(ledger), **(env or {})))

    return start


def started(process: WorkerProcess) -> bool:
    return " started: " in process.log()


def ledger_starts(ledger: Path, job_id: int) -> list[int]:
    """The pids that started a run of this row, in order."""
    return [e.pid for e in read_ledger(ledger) if e.id == job_id and e.event == "start"]


# --- 1. Exactly once, with 4 workers ------------------------------------------------------


@pytest.mark.slow
def test_four_workers_run_20000_jobs_each_exactly_once(
    run_worker: Callable[..., WorkerProcess], queue: worker.Queue, table: Table, ledger: Path
) -> None:
    """20,000 no-op jobs, half enqueued before 4 workers (16 threads each) start and half while they claim:
    every row ran once, in the process its row names, and every worker took a share.

    16 threads, so that each commit records many outcomes: a commit waits for
    its fsync, and on this shared 2-core machine the workers drain 300-600 jobs
    a second with 4 threads, 600-1,000 with 16 (the ledger's fsyncs included).
    """
    enqueued = ids(queue.enqueue_many(work(10_000, low_ms=0, high_ms=0)))
    began = time.monotonic()
    workers = [run_worker("--concurrency", "16", "--lease", "10", name=f"worker{i}") for i in range(4)]
    for _ in range(10):
        enqueued += ids(queue.enqueue_many(work(1_000, low_ms=0, high_ms=0)))
    wait_for(lambda: table.unfinished() == 0, 120, "20,000 jobs to finish")
    elapsed = time.monotonic() - began
    assert [w.stop() for w in workers] == [0] * 4

    report = table.check(ledger, enqueued, lease=10)
    assert (report.logical_jobs, report.rows, report.runs, report.reruns) == (20_000, 20_000, 20_000, 0)
    assert table.rows("status <> 'succeeded'") == []
    shares = collections.Counter(pid_of(r) for r in table.rows())
    assert set(shares) == {w.pid for w in workers}, "a worker ran nothing"
    for process in workers:
        assert_clean_log(process)
    print(f"\n4 workers: 20,000 jobs in {elapsed:.1f} s (with start-up); shares {sorted(shares.values())}; {report}")


# --- 2. kill -9 mid-job ---------------------------------------------------------------------


@pytest.mark.slow
def test_job_of_a_worker_killed_mid_job_is_rescued_after_the_lease_and_runs_once_elsewhere(
    run_worker: Callable[..., WorkerProcess], queue: worker.Queue, table: Table, ledger: Path
) -> None:
    """kill -9 of a worker 1.5 s into a job (lease 1 s): once its lease has ended, another worker fails the
    row ("worker lost") and runs the retry, once."""
    lease = 1.0
    victim = run_worker("--concurrency", "1", "--lease", str(lease), name="victim")
    job = queue.enqueue("work", {"ms": 1500})
    wait_for(lambda: ledger_starts(ledger, job.id), 10, "the job to start")
    killed_at = victim.kill()
    lease_until = table.row(job.id)["lease_until"]  # the dead worker renews it no more
    rescuer = run_worker("--lease", str(lease), name="rescuer")
    wait_for(lambda: table.chain_of(job.id)[-1]["status"] == "succeeded", 15, "the retry to succeed")
    assert rescuer.stop() == 0

    lost, retry = table.chain_of(job.id)
    assert lost["status"] == "failed" and lost["error"].startswith("worker lost"), lost
    assert lost["finished"] > lease_until, "rescued before its lease ended"
    assert (pid_of(lost), pid_of(retry)) == (victim.pid, rescuer.pid)
    assert ledger_starts(ledger, job.id) == [victim.pid] and ledger_starts(ledger, retry["id"]) == [rescuer.pid]
    report = table.check(ledger, [job.id], lease=lease, died={victim.pid})
    assert report.runs == 2 and report.rescued == 1
    print(f"\nkill -9: rescued {lost['finished'] - killed_at} ms after the kill (lease {lease:g} s); {report}")


# --- 2b. A claim whose reply was lost ---------------------------------------------------------


@pytest.mark.slow
def test_jobs_of_a_claim_whose_reply_was_lost_are_given_back_and_run_once(
    run_worker: Callable[..., WorkerProcess], queue: worker.Queue, table: Table, ledger: Path
) -> None:
    """The worker's first claim commits, but the worker is told it failed (its connection dropped before
    the reply to COMMIT came): the rows it took are running under its owner, unknown to it.

    Its heartbeat must not keep them alive for ever: once it can write again it
    gives back every row running under it that it is not running, and they
    run once, like any other job.
    """
    lease = 1.0
    process = run_worker(
        "--concurrency", "2", "--lease", str(lease), name="worker", env={"RELIABILITY_LOSE_CLAIM_REPLY": "1"}
    )
    enqueued = ids(queue.enqueue_many(work(4, low_ms=50, high_ms=50)))
    wait_for(lambda: table.unfinished() == 0, 10, "the jobs of the lost claim to run")
    assert process.stop() == 0
    assert "the reply to COMMIT was lost" in process.log(), "the fault never fired"
    report = table.check(ledger, enqueued, lease=lease)
    assert report.reruns == 0 and report.rescued == 0
    assert table.rows("status <> 'succeeded'") == []
    print(f"\nclaim reply lost: {report}")


# --- 3. SIGSTOP past the lease -----------------------------------------------------------------


def stop_outside_a_transaction(process: WorkerProcess, table: Table) -> None:
    """SIGSTOP it, but never inside a statement or transaction, whose row locks would hold up every other worker."""
    for _ in range(50):
        process.send(signal.SIGSTOP)
        wait_for(lambda: process_state(process.pid) == "T", 5, "the worker to stop")
        time.sleep(0.05)  # a statement sent just before the stop is done by now
        if not table.backends(busy=True):
            return
        process.send(signal.SIGCONT)
        time.sleep(0.01)
    raise AssertionError("could not stop the worker outside a transaction")


@pytest.mark.slow
def test_worker_stopped_past_its_lease_writes_nothing_over_the_rescued_row_when_it_resumes(
    run_worker: Callable[..., WorkerProcess], queue: worker.Queue, table: Table, ledger: Path
) -> None:
    """SIGSTOP of a worker mid-job until its row is rescued and the retry succeeded elsewhere, then SIGCONT:
    its job returns, its outcome is discarded (logged), and neither row changes."""
    lease = 1.0
    stalled = run_worker("--concurrency", "1", "--lease", str(lease), name="stalled")
    job = queue.enqueue("work", {"ms": 1000})
    wait_for(lambda: ledger_starts(ledger, job.id), 10, "the job to start")
    stop_outside_a_transaction(stalled, table)
    rescuer = run_worker("--lease", str(lease), name="rescuer")
    wait_for(lambda: table.chain_of(job.id)[-1]["status"] == "succeeded", 15, "the retry to succeed")
    before = table.rows()

    stalled.send(signal.SIGCONT)
    wait_for(lambda: "result discarded" in stalled.log(), 10, "the stalled worker to find its job taken")
    assert table.rows() == before, "the stalled worker wrote over a row it no longer held"
    assert [stalled.stop(), rescuer.stop()] == [0, 0]

    lost, retry = table.chain_of(job.id)
    assert lost["error"].startswith("worker lost") and pid_of(lost) == stalled.pid
    assert retry["status"] == "succeeded" and pid_of(retry) == rescuer.pid
    ends = [e.pid for e in read_ledger(ledger) if e.id == job.id and e.event == "end"]
    assert ends == [stalled.pid], "the stalled run did finish, after the resume"
    report = table.check(ledger, [job.id], lease=lease, stalled={stalled.pid})
    assert report.runs == 2
    print(f"\nSIGSTOP past the lease: {report}")


@pytest.mark.slow
def test_worker_stopped_inside_a_transaction_holds_up_the_others_only_briefly(
    run_worker: Callable[..., WorkerProcess], queue: worker.Queue, table: Table, ledger: Path
) -> None:
    """A worker stops (SIGSTOP) inside the transaction that records its first outcome: that row and the
    per-minute count every worker adds to stay locked while it is stopped.

    The server ends that session once it has sat idle in its transaction
    (idle_in_transaction_session_timeout, 1.5 s here): its writes roll back,
    the other worker records and rescues as before, and when the stopped one
    resumes it connects again and writes nothing over the rescued row.
    """
    lease = 1.0
    env = {"RELIABILITY_STOP_IN_RECORD": "1", "RELIABILITY_PG_IDLE_TIMEOUT_MS": "1500"}
    stalled = run_worker("--concurrency", "1", "--lease", str(lease), name="stalled", env=env)
    first = queue.enqueue("work", {"ms": 50})
    wait_for(lambda: process_state(stalled.pid) == "T", 10, "the worker to stop inside its transaction")
    stopped = time.monotonic()
    other = run_worker("--lease", str(lease), name="other")
    later = ids(queue.enqueue_many(work(20, low_ms=20, high_ms=20)))
    wait_for(lambda: table.unfinished() == 0, 15, "the other worker to run every job")
    held_up = time.monotonic() - stopped
    stalled.send(signal.SIGCONT)
    wait_for(lambda: "result discarded" in stalled.log(), 10, "the resumed worker to find its job taken")
    assert [stalled.stop(), other.stop()] == [0, 0]

    lost, retry = table.chain_of(first.id)
    assert lost["error"].startswith("worker lost") and pid_of(lost) == stalled.pid, lost
    assert pid_of(retry) == other.pid
    report = table.check(ledger, [first.id, *later], lease=lease, stalled={stalled.pid})
    assert report.reruns == 1
    print(f"\nstopped inside a transaction: every job done {held_up:.1f} s after the stop; {report}")


# --- 4. The server ends every worker connection, several times ------------------------------------


@pytest.mark.slow
def test_terminating_every_worker_connection_repeatedly_loses_and_doubles_nothing(
    run_worker: Callable[..., WorkerProcess], queue: worker.Queue, table: Table, ledger: Path, url: str
) -> None:
    """3 workers x 4 threads run 1,200 jobs of 5-30 ms (a fifth enqueue a follow-up from job code) while the
    server terminates every one of their connections 6 times, 0.4 s apart.

    No worker crashes: each backs off, connects again, records the outcomes
    it kept meanwhile (fenced), and LISTENs again.  The lease (5 s) outlasts
    every outage, so no job may run twice.
    """
    lease = 5.0
    rng = random.Random(15)
    jobs = [("work", {"ms": rng.randint(5, 30), "follow": rng.random() < 0.2}) for _ in range(1200)]
    enqueued = ids(queue.enqueue_many(jobs))
    queue.close()  # the test's own producer connection is not a target
    workers = [run_worker("--concurrency", "4", "--lease", str(lease), name=f"worker{i}") for i in range(3)]
    for process in workers:
        wait_for(lambda: started(process), 10, "the workers to start")  # noqa: B023
    terminated = []
    for _ in range(6):
        wait_for(lambda: len(table.backends()) >= 2 * len(workers), 10, "the workers to connect again")
        terminated.append(table.terminate_others())
        time.sleep(0.4)
        assert all(w.popen.poll() is None for w in workers), "a worker exited"
    wait_for(lambda: table.unfinished() == 0, 60, "every job to finish")
    assert [w.stop() for w in workers] == [0] * 3

    assert table.rows("status <> 'succeeded'") == []  # a failed parent's retry would ask for its follow-up again
    followers = table.rows("data::json ->> 'parent' IS NOT NULL")
    asked = table.rows("(data::json ->> 'follow')::boolean")
    assert len(followers) == len(asked) > 0, "a follow-up was lost or doubled"
    report = table.check(ledger, enqueued + [r["id"] for r in followers], lease=lease)
    assert report.reruns == 0 and report.rescued == 0
    for process in workers:
        assert_clean_log(process)
    logs = "".join(w.log() for w in workers)
    kept = [int(n) for n in re.findall(r"(\d+) outcome\(s\) kept", logs)]
    print(
        f"\npg_terminate_backend x{len(terminated)}: {terminated} connections ended; {logs.count('LISTEN')} LISTEN "
        f"losses logged; up to {max(kept, default=0)} outcomes kept in memory; {report}"
    )


# --- 4b. Cut off past the lease -------------------------------------------------------------------


class SeveringProxy:
    """A TCP proxy on loopback to the server, in threads of this process, that the test can sever and restore.

    Severed, it closes every connection through it and every new one at once:
    to the worker behind it, the server is out of reach.  (A network
    namespace would cut a link; a proxy needs no root and no cleanup.)
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.severed = threading.Event()
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):  # the listener closed: the proxy is done
            while True:
                client, _ = self.listener.accept()
                if self.severed.is_set():
                    client.close()
                    continue
                server = socket.create_connection(self.upstream)
                with self._lock:
                    self._open |= {client, server}
                for source, target in ((client, server), (server, client)):
                    threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                target.sendall(data)
        for end in (source, target):
            self._close(end)

    def _close(self, end: socket.socket) -> None:
        with contextlib.suppress(OSError):
            end.shutdown(socket.SHUT_RDWR)
        end.close()
        with self._lock:
            self._open.discard(end)

    def sever(self) -> None:
        self.severed.set()
        with self._lock:
            ends = list(self._open)
        for end in ends:
            self._close(end)

    def restore(self) -> None:
        self.severed.clear()

    def close(self) -> None:
        self.sever()
        self.listener.close()


@pytest.fixture
def proxy() -> Iterator[SeveringProxy]:
    host, port = POSTGRES_SERVER.rsplit("@", 1)[1].split(":")
    severing = SeveringProxy((host, int(port)))
    yield severing
    severing.close()


@pytest.mark.slow
def test_worker_cut_off_past_its_lease_discards_its_kept_outcome_and_carries_on(
    run_worker: Callable[..., WorkerProcess], queue: worker.Queue, table: Table, ledger: Path, url: str,
    proxy: SeveringProxy,
) -> None:  # fmt: skip
    """A worker reaching the server through a proxy is cut off 0.3 s into a 1.5 s job (lease 1 s) until its row
    has been rescued and the retry succeeded on a worker with a direct connection.

    Meanwhile it keeps the finished outcome in memory and tries again with
    backoff; once the link is back, the fence refuses that outcome (discarded,
    logged), and the worker takes new jobs as before.
    """
    lease = 1.0
    behind = url.replace(POSTGRES_SERVER.rsplit("@", 1)[1], f"127.0.0.1:{proxy.port}")
    cut_off = run_worker("--concurrency", "1", "--lease", str(lease), name="cut-off", database=behind)
    job = queue.enqueue("work", {"ms": 1500})
    wait_for(lambda: ledger_starts(ledger, job.id), 10, "the job to start")
    time.sleep(0.3)  # the job is well under way
    proxy.sever()
    severed = time.monotonic()
    rescuer = run_worker("--lease", str(lease), name="rescuer")
    wait_for(lambda: table.chain_of(job.id)[-1]["status"] == "succeeded", 15, "the retry to succeed elsewhere")
    assert rescuer.stop() == 0
    wait_for(lambda: "outcome(s) kept" in cut_off.log(), 10, "the cut-off worker to keep its outcome")
    before = table.rows()
    proxy.restore()
    cut_seconds = time.monotonic() - severed
    wait_for(lambda: "result discarded" in cut_off.log(), 15, "the cut-off worker to find its job taken")
    assert table.rows() == before, "the cut-off worker wrote over a row it no longer held"
    later = ids(queue.enqueue_many(work(10)))
    wait_for(lambda: table.unfinished() == 0, 15, "the cut-off worker to run new jobs")
    assert cut_off.stop() == 0

    lost, retry = table.chain_of(job.id)
    assert lost["error"].startswith("worker lost") and pid_of(lost) == cut_off.pid
    assert pid_of(retry) == rescuer.pid
    assert {pid_of(table.row(job_id)) for job_id in later} == {cut_off.pid}
    assert "Traceback" not in cut_off.log()
    # With backoff (0.05 s, doubling to 2 s), not at every tick of the loop: each try is a connection attempt.
    tries = len(re.findall(r"heartbeat or rescue failed|outcome\(s\) kept", cut_off.log()))
    assert tries <= 20, f"{tries} tries to reach the server in {cut_seconds:.1f} s"
    report = table.check(ledger, [job.id, *later], lease=lease, stalled={cut_off.pid})
    assert report.runs == 12 and report.reruns == 1
    print(f"\ncut off past the lease for {cut_seconds:.1f} s: {tries} tries to reach the server; {report}")


# --- 5. Cron on 3 workers -----------------------------------------------------------------------


@pytest.mark.slow
def test_cron_every_second_on_three_workers_makes_one_row_per_slot(
    run_worker: Callable[..., WorkerProcess], table: Table, ledger: Path
) -> None:
    """A job declared cron="*/1 * * * * *" on 3 workers started together: each second's slot has one row, run once."""
    env = {"RELIABILITY_CRON": "*/1 * * * * *"}
    workers = [run_worker("--lease", "2", name=f"worker{i}", env=env, cron=True) for i in range(3)]

    def ran() -> int:
        return int(table.read("SELECT count(*) FROM worker_jobs WHERE type = 'tick' AND status = 'succeeded'")[0][0])

    wait_for(lambda: ran() >= 5, 20, "5 cron runs")
    assert [w.stop() for w in workers] == [0] * 3

    ticks = table.rows("type = 'tick'")
    slots = collections.Counter(r["cron_slot"] for r in ticks)
    doubled = [slot for slot, count in slots.items() if count > 1]
    assert doubled == [], [r for r in ticks if r["cron_slot"] in doubled]
    assert sorted(slots) == [r["cron_slot"] for r in ticks], "slots were made out of order"
    assert all(b - a == 1000 for a, b in zip(sorted(slots), sorted(slots)[1:], strict=False)), "a slot was skipped"
    # The next slot's row waits, and may have come due since the workers stopped: the one row left pending.
    (next_slot,) = table.rows("type = 'tick' AND status = 'pending'")
    assert next_slot["cron_slot"] == max(slots)
    report = check_table([r for r in table.rows() if r != next_slot], ledger, [], lease=2, now=table.now())
    assert report.reruns == 0
    runners = collections.Counter(pid_of(r) for r in ticks if r["status"] == "succeeded")
    print(f"\ncron on 3 workers: {len(ticks)} rows, one per slot; runs per worker {sorted(runners.values())}; {report}")


# --- 6. A server that is not there, or refuses the worker -------------------------------------------


def run_once(db: str, jobs_file: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker_cli", "run", "--burst", "--no-cron", "--db", db, "--jobs", str(jobs_file)],
        capture_output=True, text=True, cwd=HERE, env=clean_env(**env), timeout=60, check=False,
    )  # fmt: skip


def free_port() -> int:
    """A loopback port with nothing listening on it (just bound and released)."""
    with contextlib.closing(socket.socket()) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize(
    "target",
    ["unreachable", "unknown role", "missing database"],
)
def test_server_that_cannot_serve_the_worker_at_start_is_exit_3_in_one_line_without_the_password(
    postgres_url: str, jobs_file: Path, target: str
) -> None:
    """Nothing listening, a role the server does not know, a database it does not have: exit 3 within seconds,
    one line naming the URL, never its password."""
    host = POSTGRES_SERVER.removeprefix("postgresql://postgres@")
    url = {
        "unreachable": f"postgresql://postgres:s3cret@127.0.0.1:{free_port()}/worker",
        "unknown role": f"postgresql://no_such_role:s3cret@{host}/{postgres_url.rsplit('/', 1)[1]}",
        "missing database": f"postgresql://postgres:s3cret@{host}/worker_no_such_database",
    }[target]
    began = time.monotonic()
    result = run_once(url, jobs_file)
    elapsed = time.monotonic() - began
    assert result.returncode == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("worker: "), result.stderr
    assert "s3cret" not in result.stderr
    assert worker_postgres_redacted(url) in lines[0], lines[0]
    assert elapsed < 10
    print(f"\n{target}: exit 3 in {elapsed:.2f} s: {lines[0]}")


def worker_postgres_redacted(url: str) -> str:
    import worker_postgres

    redacted = worker_postgres.redacted(url)
    assert "s3cret" not in redacted
    return redacted


@pytest.mark.slow
def test_a_wrong_password_at_start_is_exit_3_in_one_line_without_either_password(
    own_server: OwnServer, jobs_file: Path
) -> None:
    """The shared server trusts every local connection; this test's own asks for a password."""
    url = own_server.url.replace(OwnServer.PASSWORD, "wr0ng")
    result = run_once(url, jobs_file)
    assert result.returncode == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "password authentication failed" in lines[0], result.stderr
    assert "wr0ng" not in result.stderr and OwnServer.PASSWORD not in result.stderr
    assert worker.redacted(url) in lines[0]
    print(f"\nwrong password: exit 3: {lines[0]}")


# --- 7. A server restart ------------------------------------------------------------------------


class OwnServer:
    """A PostgreSQL cluster of this test's own (initdb in a folder of its own, on a free port), so that it can
    be restarted without touching the server every other test, and every other session, shares.  The folder
    is not under tmp_path, which the postgres user cannot reach.  Unlike the shared server's, its
    connections need a password (SCRAM)."""

    PASSWORD = "s3cret"

    def __init__(self, directory: Path) -> None:
        self.bin = Path(subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                                       check=True).stdout.strip())  # fmt: skip
        self.data, self.log = directory / "data", directory / "server.log"
        self.port = free_port()
        self.url = f"postgresql://postgres:{self.PASSWORD}@127.0.0.1:{self.port}/postgres"
        (directory / "password").write_text(self.PASSWORD)
        directory.chmod(0o700)
        subprocess.run(["chown", "-R", "postgres:postgres", str(directory)], check=True)
        self._as_postgres("initdb", "-D", self.data, "-U", "postgres", "--auth=scram-sha-256",
                          f"--pwfile={directory / 'password'}", "--no-sync")  # fmt: skip
        self.start()

    def _as_postgres(self, program: str, *args: Any) -> None:
        command = ["runuser", "-u", "postgres", "--", str(self.bin / program), *map(str, args)]
        subprocess.run(command, check=True, capture_output=True, timeout=60)

    def _pg_ctl(self, action: str, *args: str) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories=''"
        self._as_postgres("pg_ctl", action, "-D", self.data, "-l", self.log, "-w", "-o", options, *args)

    def start(self) -> None:
        self._pg_ctl("start")

    def restart(self) -> None:
        """A fast restart: every session ended, in-flight transactions rolled back, the server down for a
        moment, then back."""
        self._pg_ctl("restart", "-m", "fast")

    def stop(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError):
            self._pg_ctl("stop", "-m", "immediate")


@contextlib.contextmanager
def postgres_users_folder(prefix: str, *programs: str) -> Iterator[Path]:
    """A new folder (not under tmp_path, which only root can reach) for a program run as the postgres user;
    removed after.  Skips without root or the programs, and fails so under CI=true."""
    missing = [program for program in ("runuser", *programs) if shutil.which(program) is None]
    if os.geteuid() != 0 or missing:
        why = f"needs root (to run programs as the postgres user) and {', '.join(programs)}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{why} (.ci/system-packages.sh installs pgbouncer)", pytrace=False)
        pytest.skip(why)
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def own_server() -> Iterator[OwnServer]:
    with postgres_users_folder("worker-own-postgres-", "pg_config") as directory:
        server = OwnServer(directory)
        try:
            yield server
        finally:
            server.stop()


@pytest.mark.slow
def test_a_server_restarted_twice_mid_run_loses_and_doubles_nothing(
    run_worker: Callable[..., WorkerProcess], own_server: OwnServer, ledger: Path
) -> None:
    """2 workers x 4 threads run 1,000 jobs of 2-20 ms while their server restarts (fast: sessions ended,
    transactions rolled back, a moment without a server) twice.

    Each worker backs off while the server is down or starting, connects again,
    records the outcomes it kept (fenced; the 10 s lease outlasts the outage),
    LISTENs again, and goes on: no exit, no job lost, none run twice.
    """
    lease = 10.0
    rng = random.Random(7)
    with worker.Queue(own_server.url, check_types=False) as queue:
        enqueued = ids(queue.enqueue_many([("work", {"ms": rng.randint(2, 20)}) for _ in range(1000)]))
    table = Table(own_server.url)
    workers = [
        run_worker("--concurrency", "4", "--lease", str(lease), name=f"worker{i}", database=own_server.url)
        for i in range(2)
    ]
    try:
        for process in workers:
            wait_for(lambda: started(process), 10, "the workers to start")  # noqa: B023
        for _ in range(2):
            done = len(table.rows("status = 'succeeded'"))
            wait_for(lambda: len(table.rows("status = 'succeeded'")) >= done + 100, 30, "jobs to run")  # noqa: B023
            table.close()
            own_server.restart()
            table = Table(own_server.url)
            assert all(w.popen.poll() is None for w in workers), "a worker exited"
        wait_for(lambda: table.unfinished() == 0, 60, "every job to finish")
        assert [w.stop() for w in workers] == [0, 0]
        report = table.check(ledger, enqueued, lease=lease)
        assert report.reruns == 0 and report.rescued == 0
        assert table.rows("status <> 'succeeded'") == []
        for process in workers:
            assert "outcome(s) kept" in process.log(), "the restarts came mid-run"
            assert "Traceback" not in process.log()
        logs = "".join(w.log() for w in workers)
        print(f"\n2 restarts: {logs.count('cannot write now')} tries to write while the server was away; {report}")
    finally:
        table.close()


# --- 8. Behind PgBouncer in transaction mode ------------------------------------------------------


class Bouncer:
    """PgBouncer (Debian's), in transaction mode with a pool of 2 server connections, in front of the shared
    server: each transaction of a client may run on either, after any other client's."""

    def __init__(self, directory: Path, server: str) -> None:
        host, port = server.rsplit("@", 1)[1].split(":")
        self.port = free_port()
        self.log = directory / "pgbouncer.log"
        (directory / "users.txt").write_text('"postgres" ""\n')
        (directory / "pgbouncer.ini").write_text(
            f"[databases]\n* = host={host} port={port}\n"
            f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {directory / 'users.txt'}\npool_mode = transaction\n"
            f"default_pool_size = 2\nmax_client_conn = 100\nlogfile = {self.log}\npidfile = {directory / 'pid'}\n"
        )
        subprocess.run(["chown", "-R", "postgres:postgres", str(directory)], check=True)
        self.process = subprocess.Popen(
            ["runuser", "-u", "postgres", "--", "pgbouncer", str(directory / "pgbouncer.ini")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for(lambda: f"listening on 127.0.0.1:{self.port}" in self.read_log(), 10, "PgBouncer to listen")

    def read_log(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def url(self, database_url: str) -> str:
        return database_url.replace(POSTGRES_SERVER.rsplit("@", 1)[1], f"127.0.0.1:{self.port}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture
def bouncer() -> Iterator[Bouncer]:
    with postgres_users_folder("worker-pgbouncer-", "pgbouncer") as directory:
        running = Bouncer(directory, POSTGRES_SERVER)
        try:
            yield running
        finally:
            running.stop()


@pytest.mark.slow
def test_workers_and_producers_behind_pgbouncer_in_transaction_mode_run_every_job_once_and_leave_no_settings(
    run_worker: Callable[..., WorkerProcess], bouncer: Bouncer, table: Table, ledger: Path, url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """With WORKER_PG_POOLER=transaction, 2 workers x 4 threads and 3 producer threads share 2 server
    connections: 600 single enqueues and 300 in bulk, a fifth of them enqueueing a follow-up from job code.

    Without it, psycopg's prepared statements meet server connections that never
    prepared them ("prepared statement "_pg3_0" does not exist"), and the
    worker's session settings would stay on server connections that an app's
    client gets next.
    """
    monkeypatch.setenv("WORKER_PG_POOLER", "transaction")
    behind = bouncer.url(url)
    env = {"WORKER_PG_POOLER": "transaction"}
    workers = [
        run_worker("--concurrency", "4", "--lease", "10", name=f"worker{i}", database=behind, env=env) for i in range(2)
    ]
    rng = random.Random(3)
    enqueued: list[int] = []

    def produce() -> None:
        with worker.Queue(behind, check_types=False) as queue:
            for _ in range(200):
                enqueued.append(queue.enqueue("work", {"ms": rng.randint(1, 5), "follow": rng.random() < 0.2}).id)
            enqueued.extend(ids(queue.enqueue_many(work(100))))

    producers = [threading.Thread(target=produce) for _ in range(3)]
    for thread in producers:
        thread.start()
    for thread in producers:
        thread.join(60)
    assert len(enqueued) == 900
    wait_for(lambda: table.unfinished() == 0, 60, "every job to finish")
    assert [w.stop() for w in workers] == [0, 0]

    followers = table.rows("data::json ->> 'parent' IS NOT NULL")
    assert len(followers) == len(table.rows("(data::json ->> 'follow')::boolean")) > 0
    report = table.check(ledger, enqueued + [r["id"] for r in followers], lease=10)
    assert report.reruns == 0 and table.rows("status <> 'succeeded'") == []
    for process in workers:
        assert_clean_log(process)
        assert "prepared statement" not in process.log()
    with psycopg.connect(behind, autocommit=True, prepare_threshold=None) as app:  # any client of the pool
        for _ in range(4):  # each statement may get either server connection
            assert app.execute("SHOW enable_sort").fetchone() == ("on",)
            assert app.execute("SHOW idle_in_transaction_session_timeout").fetchone() == ("0",)
    print(f"\nbehind PgBouncer (pool of 2): {report}")


@pytest.mark.parametrize("variable", ["WORKER_PG_POOLER", "WORKER_PG_LISTEN"])
def test_an_unknown_pooler_or_listen_setting_is_exit_2_in_one_line(url: str, jobs_file: Path, variable: str) -> None:
    result = run_once(url, jobs_file, **{variable: "session"})
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == f"worker: invalid {variable}='session'" + (
        " (use none, or transaction)" if variable == "WORKER_PG_POOLER" else " (use 1, or 0 to poll)"
    )


@pytest.mark.slow
def test_a_worker_process_restarted_while_its_server_is_down_is_restarted_until_the_server_is_back(
    run_worker: Callable[..., WorkerProcess], processes: Processes, own_server: OwnServer
) -> None:
    """Under --processes, a worker that dies (a job's fault, the OOM killer) while its server is down is
    restarted, exits 3 as any worker that cannot reach its server at start does, and is restarted again, with
    the backoff, until the server is back: the supervisor stops every worker only for a database it cannot use.
    """
    supervisor = run_worker("--processes", "2", "--concurrency", "1", name="supervisor", database=own_server.url)
    wait_for(lambda: len(child_pids(supervisor.pid)) == 2, 10, "the supervisor to start 2 workers")
    wait_for(lambda: supervisor.log().count(" started: ") == 2, 15, "both workers to start")
    first, second = sorted(child_pids(supervisor.pid))
    processes.adopt({first, second})
    own_server.stop()
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: "exited with 3" in supervisor.log(), 15, "the restarted worker to find no server")
    own_server.start()
    try:
        wait_for(lambda: supervisor.log().count(" started: ") >= 3, 30, "the restarted worker to start")
    except AssertionError as e:
        raise AssertionError(f"{e}:\n{supervisor.log()}") from None
    assert supervisor.popen.poll() is None, supervisor.log()
    processes.adopt(child_pids(supervisor.pid))
    with worker.Queue(own_server.url, check_types=False) as queue:
        enqueued = queue.enqueue("work")
    table = Table(own_server.url)
    try:
        wait_for(lambda: table.row(enqueued.id)["status"] == "succeeded", 15, "a job to run")
    finally:
        table.close()
    assert supervisor.stop() == 0
