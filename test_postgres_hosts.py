"""Workers on several hosts against one PostgreSQL, and a host whose wall clock is wrong.

Real ``worker run`` processes on the test run's database (conftest's
``postgres_db``), with a jobs module written under tmp_path whose every run
appends ``(job id, attempt, pid, start|end)`` to a ledger file.

- A wrong clock: an LD_PRELOAD shim, compiled here with ``cc``, adds an offset
  to clock_gettime(CLOCK_REALTIME), gettimeofday and time in one process, and
  leaves CLOCK_MONOTONIC and the sleeps alone (libfaketime is unreliable here:
  DESIGN.md's pitfalls).  Leases, rescues, "now" in claims and the due times of
  retries must follow the server's clock, so a worker two hours off takes
  nothing from live workers and loses nothing of its own.
- Several hosts: network namespaces made here, each joined to this one by a
  veth pair on addresses of a private range picked here.  PostgreSQL listens on
  127.0.0.1 only, so a TCP forwarder of the test's own, on the host side of
  each veth, takes each namespace's connections to it.  Cutting a link
  (``ip link set ... down``) is a network cut: no FIN, no RST, packets lost.

Needs root for the namespaces: without it they skip locally, saying why, and
fail under CI=true.  About 60 s in all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

import worker
import worker_postgres
from conftest import Processes, WorkerProcess, wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD, network namespaces, /proc"),
]

HERE = Path(__file__).resolve().parent
LEASE = 2.0  # seconds: short, so that rescues come quickly; a heartbeat every 0.67 s
TWO_HOURS = 7200
RESCUED = "worker lost"  # how the error of a row rescued after its worker's lease expired begins

JOBS_MODULE = r'''
"""Jobs for test_postgres_hosts.py: each run noted in the ledger (one write, O_APPEND)."""

import os
import time

from worker import job

LEDGER = os.environ["HOSTS_LEDGER"]


def note(ctx, event):
    line = f"{ctx.job.id} {ctx.job.attempt} {os.getpid()} {event}\n"
    fd = os.open(LEDGER, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def proof(ctx):
    """What the run returns: who ran it, and this process's wall clock (shifted or not) when it ended."""
    return {"id": ctx.job.id, "pid": os.getpid(), "wall_ms": time.time_ns() // 1_000_000}


@job
def work(ctx, ms=0, first_only=False, **labels):
    """Sleeps ``ms`` (with ``first_only``, on the first attempt only: a rescued job's retry is quick)."""
    note(ctx, "start")
    if ctx.job.attempt == 1 or not first_only:
        time.sleep(ms / 1000)
    note(ctx, "end")
    return proof(ctx)


@job(max_attempts=2, retry_delay=1)
def flaky(ctx):
    """Fails its first attempt; its retry is due 1 s (+-10 %) later."""
    note(ctx, "start")
    if ctx.job.attempt == 1:
        raise RuntimeError("the first attempt fails")
    note(ctx, "end")
    return proof(ctx)


@job
def spawn(ctx):
    """Enqueues, on this process's wall clock (shifted or not), a follow-up due now and one due in 1 s."""
    note(ctx, "start")
    ctx.enqueue("work", {"after": ctx.job.id})
    ctx.enqueue("work", {"after": ctx.job.id}, delay=1)
    ctx.enqueue_now("work", {"after": ctx.job.id, "now": True})
    note(ctx, "end")
    return proof(ctx)


# A pause inside the heartbeat's transaction, once, when the test asks for it
# (creates PAUSE): its row locks held, its COMMIT not sent yet, for the test to
# cut the link then.  PAUSE.paused says the pause has begun.
PAUSE = os.environ.get("HOSTS_PAUSE")
if PAUSE:
    import worker_postgres

    _process_alive = worker_postgres.PostgresStore.process_alive

    def process_alive_then_pause(self, *args, **kwargs):
        _process_alive(self, *args, **kwargs)  # after renew_leases: the job's row is locked
        if os.path.exists(PAUSE):
            os.remove(PAUSE)
            open(PAUSE + ".paused", "w").close()
            time.sleep(0.5)

    worker_postgres.PostgresStore.process_alive = process_alive_then_pause
'''

# Adds SHIFT_WALL_CLOCK_SECONDS to the wall clock of the process it is preloaded into.
SHIM_SOURCE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <sys/time.h>
#include <time.h>

static long long offset_ns;
static int (*real_clock_gettime)(clockid_t, struct timespec *);
static int (*real_gettimeofday)(struct timeval *restrict, void *restrict);

__attribute__((constructor)) static void init(void) {
    const char *seconds = getenv("SHIFT_WALL_CLOCK_SECONDS");
    offset_ns = seconds ? (long long)(atof(seconds) * 1e9) : 0;
    real_clock_gettime = dlsym(RTLD_NEXT, "clock_gettime");
    real_gettimeofday = dlsym(RTLD_NEXT, "gettimeofday");
}

int clock_gettime(clockid_t id, struct timespec *ts) {
    int result = real_clock_gettime(id, ts);
    if (result == 0 && (id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE)) {
        long long ns = (long long)ts->tv_sec * 1000000000LL + ts->tv_nsec + offset_ns;
        ts->tv_sec = ns / 1000000000LL;
        ts->tv_nsec = ns % 1000000000LL;
    }
    return result;
}

int gettimeofday(struct timeval *restrict tv, void *restrict tz) {
    int result = real_gettimeofday(tv, tz);
    if (result == 0) {
        long long us = (long long)tv->tv_sec * 1000000LL + tv->tv_usec + offset_ns / 1000;
        tv->tv_sec = us / 1000000LL;
        tv->tv_usec = us % 1000000LL;
    }
    return result;
}

time_t time(time_t *out) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (out) *out = ts.tv_sec;
    return ts.tv_sec;
}
"""


# --- Reading the table and the ledger ------------------------------------------------


def read(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        return conn.execute(sql, params).fetchall()


def rows(url: str, where: str = "true", params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    """Rows of worker_jobs as dicts, oldest first."""
    found = read(url, f"SELECT {worker.SELECT_COLUMNS} FROM worker_jobs WHERE {where} ORDER BY id", params)
    return [dict(zip(worker.COLUMNS, values, strict=True)) for values in found]


def row(url: str, job_id: int) -> dict[str, Any]:
    (found,) = rows(url, "id = %s", (job_id,))
    return found


def server_ms(url: str) -> int:
    """The server's clock, in epoch ms: what leases are judged by."""
    return int(read(url, "SELECT floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint")[0][0])


def waiting_for_locks(url: str) -> list[str]:
    """The statements of this database's sessions that wait for a lock now."""
    sql = "SELECT query FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    return [query for (query,) in read(url, sql)]


def pid_of(job: dict[str, Any]) -> int | None:
    """The pid in a row's ``worker`` column ("host:pid")."""
    return int(job["worker"].rsplit(":", 1)[1]) if job["worker"] else None


def starts(ledger: Path) -> dict[int, list[int]]:
    """Job id -> the pids that started a run of it."""
    started: dict[int, list[int]] = {}
    if ledger.exists():
        for line in ledger.read_text().splitlines():
            job_id, _attempt, pid, event = line.split()
            if event == "start":
                started.setdefault(int(job_id), []).append(int(pid))
    return started


def assert_each_ran_once(url: str, ledger: Path) -> None:
    """No row was started twice, and every succeeded row's result is the proof of its one run."""
    ran = starts(ledger)
    assert {job_id: pids for job_id, pids in ran.items() if len(pids) > 1} == {}, "a row ran twice"
    for job in rows(url, "status = 'succeeded'"):
        assert ran.get(job["id"]) == [pid_of(job)], job
        assert json.loads(job["result"])["pid"] == pid_of(job), job


# --- Worker processes ------------------------------------------------------------------


@pytest.fixture
def ledger(tmp_path: Path) -> Path:
    return tmp_path / "ledger"


@pytest.fixture
def jobs_file(tmp_path: Path) -> Path:
    path = tmp_path / "hosts_jobs.py"
    path.write_text(JOBS_MODULE)
    return path


@pytest.fixture
def queue(postgres_db: str) -> Iterator[worker.Queue]:
    """The app's side, in this test process: the job types live in the workers only."""
    with worker.Queue(postgres_db, check_types=False) as producer:
        yield producer


@pytest.fixture
def run_worker(processes: Processes, postgres_db: str, jobs_file: Path, ledger: Path) -> Callable[..., WorkerProcess]:
    """Start ``worker run`` (lease LEASE, no claims ahead, no cron) on the test's database, or on ``url``.

    ``prefix`` runs it under another command (``ip netns exec``); ``env`` adds variables.
    """

    def start(
        name: str, *, url: str = postgres_db, prefix: tuple[str, ...] = (), env: dict[str, str] | None = None
    ) -> WorkerProcess:
        environment = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_") and k != "DATABASE_URL"}
        environment.update(WORKER_LOG_LEVEL="INFO", HOSTS_LEDGER=str(ledger), **(env or {}))
        command = [*prefix, sys.executable, "-m", "worker_cli", "run", "--db", url, "--jobs", str(jobs_file),
                   "--lease", str(LEASE), "--concurrency", "3", "--prefetch", "0", "--no-cron"]  # fmt: skip
        log_path = processes.directory / f"{name}.log"
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, cwd=HERE, env=environment
            )
        started = WorkerProcess(popen, log_path)
        processes.started.append(started)  # killed at the test's end, whatever happens
        wait_for(lambda: " started: " in started.log() or popen.poll() is not None, 15, f"{name} to start")
        assert popen.poll() is None, f"{name} exited:\n{started.log()}"
        return started

    return start


# --- A wrong wall clock ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def clock_shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The LD_PRELOAD shim, compiled for this run."""
    compiler = shutil.which("cc")
    if compiler is None:
        pytest.skip("no C compiler (cc) to build the clock shim")
    directory = tmp_path_factory.mktemp("shim")
    source = directory / "shift_wall_clock.c"
    source.write_text(SHIM_SOURCE)
    library = directory / "shift_wall_clock.so"
    built = subprocess.run(
        [compiler, "-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o", str(library), str(source), "-ldl"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    return library


def shifted(shim: Path, seconds: float) -> dict[str, str]:
    """The environment that runs a process with its wall clock ``seconds`` off."""
    return {"LD_PRELOAD": str(shim), "SHIFT_WALL_CLOCK_SECONDS": str(seconds)}


OFFSETS = pytest.mark.parametrize("offset", [TWO_HOURS, -TWO_HOURS], ids=["2h-ahead", "2h-behind"])

CLOCKS_PROBE = """
import datetime, json, threading, time
began = time.monotonic()
time.sleep(0.2)
threading.Event().wait(0.1)
slept = time.monotonic() - began
print(json.dumps({"time": time.time(), "monotonic": time.monotonic(), "slept": slept,
                  "datetime": datetime.datetime.now(datetime.timezone.utc).timestamp()}))
"""


@OFFSETS
def test_the_shim_moves_the_wall_clock_and_leaves_the_monotonic_clock_and_sleeps_alone(
    clock_shim: Path, offset: int
) -> None:
    env = {**os.environ, **shifted(clock_shim, offset)}
    probe = subprocess.run(
        [sys.executable, "-c", CLOCKS_PROBE], env=env, capture_output=True, text=True, timeout=30, check=True
    )
    seen = json.loads(probe.stdout)
    wall, monotonic = time.time(), time.monotonic()
    assert abs(seen["time"] - wall - offset) < 2
    assert abs(seen["datetime"] - wall - offset) < 2
    assert abs(seen["monotonic"] - monotonic) < 2
    assert 0.3 <= seen["slept"] < 2, "time.sleep and Event.wait still wait as long as asked"
    date = subprocess.run(["date", "+%s"], env=env, capture_output=True, text=True, timeout=30, check=True)
    assert abs(int(date.stdout) - time.time() - offset) < 2, "time() and friends in a C program too"


@OFFSETS
def test_a_worker_whose_wall_clock_is_two_hours_off_reruns_no_live_job_and_takes_nothing_from_live_workers(
    clock_shim: Path, offset: int, run_worker: Callable[..., WorkerProcess], queue: worker.Queue,
    postgres_db: str, ledger: Path,
) -> None:  # fmt: skip
    """A (right clock) and B (wall clock 2 h off) each run 3 jobs of 2.5 s, longer than the 2 s lease.

    Judged by its own clock, B ahead would rescue A's jobs at its first sweep,
    and B behind would write leases that A finds 2 h expired.  By the server's,
    no job is rescued, none runs twice, and B's rows carry the server's times.
    """
    began = server_ms(postgres_db)
    right = run_worker("right")
    first = [job.id for job in queue.enqueue_many([("work", {"ms": 2500})] * 3)]
    wait_for(lambda: [pid_of(job) for job in rows(postgres_db, "status = 'running'")] == [right.pid] * 3, 10,
             "the right worker to run its 3 jobs")  # fmt: skip
    wrong = run_worker("wrong", env=shifted(clock_shim, offset))
    second = [job.id for job in queue.enqueue_many([("work", {"ms": 2500})] * 3)]
    wait_for(lambda: len(rows(postgres_db, "status = 'running'")) == 6, 10, "the wrong worker to take the next 3")
    wait_for(lambda: len(rows(postgres_db, "status = 'succeeded'")) == 6, 20, "every job to succeed")
    ended = server_ms(postgres_db)
    assert [right.stop(), wrong.stop()] == [0, 0]

    table = rows(postgres_db)
    assert [job["id"] for job in table] == first + second, "no rescue made a retry row"
    assert [pid_of(job) for job in table] == [right.pid] * 3 + [wrong.pid] * 3
    assert_each_ran_once(postgres_db, ledger)
    for job in table[3:]:
        assert began <= job["started"] < job["finished"] <= ended, "the server's time, not the wrong clock's"
        ran_ms = json.loads(job["result"])["wall_ms"] - job["finished"]  # the wrong clock, as the job saw it
        assert abs(ran_ms - offset * 1000) < 2000, ran_ms
    assert "jumped" not in wrong.log(), "the wrong clock is steady: nothing to notice"


@OFFSETS
def test_a_worker_whose_wall_clock_is_two_hours_off_rescues_after_the_lease_and_retries_on_the_servers_time(
    clock_shim: Path, offset: int, run_worker: Callable[..., WorkerProcess], queue: worker.Queue,
    postgres_db: str, ledger: Path,
) -> None:  # fmt: skip
    """A dies (kill -9) running a job; B, 2 h off, rescues it once its lease has expired by the server's clock,
    neither before (B ahead) nor hours after (B behind); its retry and a failed job's retry are due by it too."""
    right = run_worker("right")
    lost = queue.enqueue("work", {"ms": 60_000, "first_only": True})
    wait_for(lambda: row(postgres_db, lost.id)["status"] == "running", 10, "the right worker to run the job")
    wrong = run_worker("wrong", env=shifted(clock_shim, offset))
    right.kill()
    lease_until = row(postgres_db, lost.id)["lease_until"]  # no heartbeat renews it now
    wait_for(lambda: row(postgres_db, lost.id)["status"] == "failed", 10, "the wrong worker to rescue the job")
    rescued = row(postgres_db, lost.id)
    assert rescued["error"].startswith(RESCUED), rescued
    rescue_interval_ms = worker.to_ms(LEASE) // 2
    assert lease_until <= rescued["finished"] <= lease_until + rescue_interval_ms + 1000
    (retry,) = wait_for(lambda: rows(postgres_db, "rescheduled_from_job = %s AND status = 'succeeded'", (lost.id,)),
                        10, "the rescued job's retry to run")  # fmt: skip
    assert retry["due"] == rescued["finished"] and pid_of(retry) == wrong.pid
    assert retry["started"] >= retry["due"]

    failing = queue.enqueue("flaky")
    (again,) = wait_for(lambda: rows(postgres_db, "rescheduled_from_job = %s AND status = 'succeeded'", (failing.id,)),
                        10, "the flaky job's retry to succeed")  # fmt: skip
    failed = row(postgres_db, failing.id)
    assert failed["status"] == "failed" and pid_of(failed) == wrong.pid
    assert 900 <= again["due"] - failed["finished"] <= 1100, "1 s +-10 % after the failure, on the server's clock"
    assert again["started"] >= again["due"], "not claimed before it was due"
    assert abs(failed["finished"] - server_ms(postgres_db)) < 10_000
    assert wrong.stop() == 0
    assert_each_ran_once(postgres_db, ledger)


@OFFSETS
def test_jobs_enqueued_on_a_host_whose_wall_clock_is_two_hours_off_are_due_by_the_servers_clock(
    clock_shim: Path, offset: int, run_worker: Callable[..., WorkerProcess], queue: worker.Queue,
    postgres_db: str, ledger: Path,
) -> None:  # fmt: skip
    """A job on the worker 2 h off enqueues follow-ups (ctx.enqueue, and ctx.enqueue_now through a Queue):
    they are created and due by the server's clock, so they run now and 1 s later, not 2 h later (or sooner)."""
    wrong = run_worker("wrong", env=shifted(clock_shim, offset))
    parent = queue.enqueue("spawn")
    succeeded = "type = 'work' AND status = 'succeeded'"
    wait_for(lambda: len(rows(postgres_db, succeeded)) == 3, 10, "the three follow-ups to run")
    assert wrong.stop() == 0
    spawned = row(postgres_db, parent.id)
    follow_ups = rows(postgres_db, "type = 'work'")
    slack = 100  # ms: ctx.enqueue_now's Queue measured the server's clock on a connection of its own
    for follow_up in follow_ups:
        assert spawned["started"] - slack <= follow_up["created_at"] <= spawned["finished"] + slack, follow_up
    delays = sorted(follow_up["due"] - follow_up["created_at"] for follow_up in follow_ups)
    assert delays == [0, 0, 1000]
    assert all(follow_up["started"] >= follow_up["due"] for follow_up in follow_ups)
    assert_each_ran_once(postgres_db, ledger)


# --- Several hosts: network namespaces, and a TCP forwarder to PostgreSQL ----------------------


class Forwarder:
    """Listens on one address (any free port) and joins each connection to PostgreSQL on loopback.

    One thread per direction of each connection; when either side ends, both
    sockets are closed.  Nothing here notices a cut link: as with a real
    network, the connections just stop carrying anything.
    """

    def __init__(self, address: str, target: tuple[str, int] = ("127.0.0.1", 5432)) -> None:
        self.target = target
        self.listener = socket.create_server((address, 0))
        self.port = int(self.listener.getsockname()[1])
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name=f"forward {address}", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                return  # closed
            server.settimeout(None)
            with self._lock:
                self._sockets += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for each in (source, sink):
                with contextlib.suppress(OSError):
                    each.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept()
        self.listener.close()
        with self._lock:
            for each in self._sockets:
                with contextlib.suppress(OSError):
                    each.shutdown(socket.SHUT_RDWR)
                each.close()


def ip(*args: str) -> None:
    """Run ``ip ARGS``; fails the test with ip's own message."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, f"ip {' '.join(args)}: {done.stderr.strip()}"


@dataclasses.dataclass
class Host:
    """A network namespace joined to this one by a veth pair: another machine, as far as TCP can tell."""

    namespace: str
    link: str  # the host side of the veth: down is a cut cable
    address: str  # the host side's address, where the forwarder listens
    url: str  # the test's database, as a worker in the namespace reaches it

    @property
    def prefix(self) -> tuple[str, ...]:
        """The command that runs a program inside this host."""
        return ("ip", "netns", "exec", self.namespace)

    def cut(self) -> None:
        ip("link", "set", self.link, "down")

    def restore(self) -> None:
        ip("link", "set", self.link, "up")


def private_subnet() -> str:
    """The first three octets of a 10.x.y.0/24 that no address or route here uses yet."""
    taken = subprocess.run(["ip", "-4", "addr"], capture_output=True, text=True, check=False).stdout
    taken += subprocess.run(["ip", "-4", "route"], capture_output=True, text=True, check=False).stdout
    rng = random.Random()
    for _ in range(100):
        subnet = f"10.{rng.randrange(100, 250)}.{rng.randrange(256)}"
        if f"{subnet}." not in taken:
            return subnet
    raise AssertionError("no free 10.x.y.0/24 found")


def cannot_make_hosts(why: str) -> None:
    """Skip, saying why, except under CI=true: CI runs as root, and must never pass by skipping this."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"network namespaces are needed under CI: {why}", pytrace=False)
    pytest.skip(f"cannot make network namespaces: {why}")


@pytest.fixture
def make_host(postgres_db: str) -> Iterator[Callable[[], Host]]:
    """Hosts for one test; their forwarders, links and namespaces removed at its end, even on failure.

    Host n gets the /30 10.x.y.4n: .4n+1 on the host side, .4n+2 inside.
    """
    if shutil.which("ip") is None:
        cannot_make_hosts("no ip command (iproute2)")
    if os.geteuid() != 0:
        cannot_make_hosts("not root")
    subnet = private_subnet()
    tag = f"{random.randrange(16**4):04x}"  # names of this test's own, never another's
    made: list[Host] = []
    forwarders: list[Forwarder] = []

    def make() -> Host:
        number = len(made) + 1
        namespace, link, inside = f"wk{tag}h{number}", f"wk{tag}h{number}", f"wk{tag}n{number}"
        outside_address, inside_address = f"{subnet}.{4 * number + 1}", f"{subnet}.{4 * number + 2}"
        added = subprocess.run(["ip", "netns", "add", namespace], capture_output=True, text=True, check=False)
        if added.returncode != 0:
            cannot_make_hosts(added.stderr.strip())
        host = Host(namespace, link, outside_address, "")
        made.append(host)  # removed at the end from here on
        ip("link", "add", link, "type", "veth", "peer", "name", inside)
        ip("link", "set", inside, "netns", namespace)
        ip("addr", "add", f"{outside_address}/30", "dev", link)
        ip("link", "set", link, "up")
        ip("-n", namespace, "addr", "add", f"{inside_address}/30", "dev", inside)
        ip("-n", namespace, "link", "set", inside, "up")
        ip("-n", namespace, "link", "set", "lo", "up")
        forwarders.append(Forwarder(outside_address))
        host.url = postgres_db.replace("@127.0.0.1:5432/", f"@{outside_address}:{forwarders[-1].port}/")
        return host

    try:
        yield make
    finally:
        for forwarder in forwarders:
            forwarder.close()
        for host in made:
            subprocess.run(["ip", "link", "del", host.link], capture_output=True, check=False)  # and its peer
            subprocess.run(["ip", "netns", "del", host.namespace], capture_output=True, check=False)


@pytest.mark.parametrize("inside_a_transaction", [False, True], ids=["between-transactions", "mid-transaction"])
def test_a_host_whose_link_is_cut_mid_job_loses_it_to_another_host_and_then_writes_nothing_over_it(
    make_host: Callable[[], Host], run_worker: Callable[..., WorkerProcess], queue: worker.Queue,
    postgres_db: str, ledger: Path, tmp_path: Path, inside_a_transaction: bool,
) -> None:  # fmt: skip
    """Two hosts, a worker on each.  The first's link is cut while it runs a 3 s job (lease 2 s).

    The second host's worker rescues the job once its lease has expired and
    runs its retry.  The cut-off worker finishes the job meanwhile, but cannot
    say so; when the link returns, its outcome is fenced out (the row is no
    longer its own), and it takes new jobs again.  Cut inside the heartbeat's
    transaction, the cut-off worker leaves the job's row locked on the server,
    which must not keep the other host from rescuing it for long.
    """
    first_host, second_host = make_host(), make_host()
    pause = tmp_path / "pause"
    cut_off = run_worker("cut-off", url=first_host.url, prefix=first_host.prefix, env={"HOSTS_PAUSE": str(pause)})
    job = queue.enqueue("work", {"ms": 3000, "first_only": True})
    wait_for(lambda: pid_of(row(postgres_db, job.id)) == cut_off.pid, 10, "the first host to run the job")
    other = run_worker("other", url=second_host.url, prefix=second_host.prefix)
    if inside_a_transaction:
        pause.touch()
        wait_for(lambda: pause.with_suffix(".paused").exists(), 5, "the heartbeat to pause in its transaction")
    first_host.cut()
    cut_at = server_ms(postgres_db)
    lease_until = row(postgres_db, job.id)["lease_until"]

    waits: set[str] = set()  # what any session of this database waited for, sampled until the rescue

    def rescued_yet() -> bool:
        waits.update(waiting_for_locks(postgres_db))
        return bool(row(postgres_db, job.id)["status"] == "failed")

    wait_for(rescued_yet, 15, "the other host to rescue the job")
    rescued = row(postgres_db, job.id)
    assert rescued["error"].startswith(RESCUED) and rescued["finished"] >= lease_until, rescued
    assert waits == set(), "a session waited for the cut-off worker's locks"
    # Cut inside a transaction (on purpose, or by chance between two), the job's row is
    # free once the server has ended that transaction; then the next sweep takes it.
    held_until = cut_at + worker_postgres.IDLE_IN_TRANSACTION_TIMEOUT_MS
    assert rescued["finished"] <= max(lease_until, held_until) + worker.to_ms(LEASE) // 2 + 1500
    (retry,) = wait_for(lambda: rows(postgres_db, "rescheduled_from_job = %s AND status = 'succeeded'", (job.id,)),
                        10, "the retry to run on the other host")  # fmt: skip
    assert pid_of(retry) == other.pid
    ended = f"{job.id} 1 {cut_off.pid} end"
    wait_for(lambda: ended in ledger.read_text().splitlines(), 10, "the cut-off worker to end its run")

    first_host.restore()
    restored_at = server_ms(postgres_db)
    wait_for(lambda: read(postgres_db, "SELECT count(*) FROM worker_processes WHERE pid = %s AND last_seen > %s",
                          (cut_off.pid, restored_at))[0][0], 30, "the cut-off worker's heartbeat")  # fmt: skip
    later = [each.id for each in queue.enqueue_many([("work", {"ms": 1000})] * 6)]
    wait_for(lambda: len(rows(postgres_db, "status = 'succeeded' AND id = ANY(%s)", (later,))) == 6, 20,
             "the new jobs to run")  # fmt: skip
    assert [cut_off.stop(), other.stop()] == [0, 0]

    assert row(postgres_db, job.id) == rescued, "the cut-off worker wrote over the rescued row"
    assert row(postgres_db, retry["id"]) == retry
    assert starts(ledger)[job.id] == [cut_off.pid], "it did run the job, to its end"
    assert cut_off.pid in {pid_of(row(postgres_db, each)) for each in later}, "the cut-off worker took new jobs"
    assert_each_ran_once(postgres_db, ledger)
    print(f"\nlink cut at {cut_at}, rescued {rescued['finished'] - cut_at} ms later; back at {restored_at}")


def test_the_engines_connections_give_up_on_a_silent_link_in_seconds_unless_the_url_says_otherwise(
    postgres_db: str,
) -> None:
    """libpq's own defaults would wait out TCP: about 15 minutes for a statement, 2 hours for a reply."""
    conn = worker_postgres.connect(postgres_db)
    try:
        given = conn.info.get_parameters()
        assert {name: given.get(name) for name in worker_postgres.CONNECTION_DEFAULTS} == {
            name: str(value) for name, value in worker_postgres.CONNECTION_DEFAULTS.items()
        }
    finally:
        conn.close()
    conn = worker_postgres.connect(f"{postgres_db}?tcp_user_timeout=4000&application_name=mine")
    try:
        given = conn.info.get_parameters()
        assert (given["tcp_user_timeout"], given["application_name"]) == ("4000", "mine")
        assert given["keepalives_idle"] == "15"  # the rest are still the engine's
    finally:
        conn.close()
    with pytest.raises(worker.DatabaseUnusable, match='invalid URI query parameter: "tcp_timeout"'):
        worker_postgres.connect(f"{postgres_db}?tcp_timeout=4000")  # a typo is not worth retrying


def test_an_idle_worker_whose_link_goes_silent_notices_by_its_tcp_timeouts_and_runs_jobs_once_it_is_back(
    make_host: Callable[[], Host], run_worker: Callable[..., WorkerProcess], queue: worker.Queue, postgres_db: str
) -> None:
    """A cut link sends no FIN and no RST: only TCP's timeouts tell.  With them short (in the URL here; the
    engine's defaults give about 30 s), the worker's next statement fails instead of waiting out TCP's
    retransmissions, and its LISTEN connection is found dead by the keepalives; it backs off, reconnects when
    the link is back, and runs jobs again."""
    host = make_host()
    quick = "tcp_user_timeout=1000&keepalives_idle=1&keepalives_interval=1&keepalives_count=2"
    cut_off = run_worker("cut-off", url=f"{host.url}?{quick}", prefix=host.prefix)
    host.cut()
    wait_for(lambda: "unavailable" in cut_off.log() or "LISTEN" in cut_off.log(), 20, "the worker to notice")
    host.restore()
    job = queue.enqueue("work", {"ms": 10})
    wait_for(lambda: row(postgres_db, job.id)["status"] == "succeeded", 30, "the job to run once the link is back")
    assert pid_of(row(postgres_db, job.id)) == cut_off.pid
    assert cut_off.stop() == 0
    assert "Traceback" not in cut_off.log()
    print(f"\n{cut_off.log()}")
