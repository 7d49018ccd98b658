"""The benchmark suite: our worker against Huey, litequeue, RQ and a bare-SQL ceiling.

    python bench/run.py            # full run, 4 to 7 minutes
    python bench/run.py --quick    # smaller N, fewer repetitions: under 3 minutes

The first run creates bench/.venv (git-ignored) and installs bench/requirements.txt
and this repo (pip install -e .) into it; the peers never become dependencies of the
worker.  Then it re-executes itself with that venv's Python.  Everything happens in
real processes on local files, plus RQ on the local Redis (127.0.0.1:6379, database
BENCH_REDIS_DB, default 13, the only one it ever flushes).  It prints a table with
each goal of the performance issue beside the figure and writes everything,
raw runs included, to bench/results/<timestamp>.json.

How each figure is measured:

- Enqueue: a fresh process and file, the connection opened and the schema made before
  the clock starts; N one-job transactions, and N jobs in calls of 1,000 (our
  Queue.enqueue_many, RQ's enqueue_many; litequeue has no bulk call, so its puts run
  inside its own transaction(); Huey has none).
- Processing: N no-op jobs are enqueued first, then the real worker runs as its own
  process (ours: ``python -m worker run --burst --db F --jobs bench/bench_jobs.py
  --concurrency C`` with WORKER_LOG_LEVEL=WARNING).  The rate is N divided by the time
  from the first job started to the last one finished (ours: min(started) and
  max(finished) from the table; Huey: its EXECUTING and COMPLETE signals; litequeue:
  its loop; RQ: around SimpleWorker.work(burst=True)), so interpreter start-up is not
  counted.  The JSON also has each run's wall-clock rate from spawn to exit.
- Latency: an idle worker (ours at its default concurrency 4, Huey with 4 threads,
  one litequeue loop, one RQ SimpleWorker); another process enqueues jobs one at a
  time, 20-30 ms apart; latency is from just before the enqueue call to the moment
  the job function starts (litequeue keeps no result, so: its pop, ``lock_time``).
- Idle CPU: utime+stime from /proc/PID/stat of that idle worker over 5 s, after it
  settled.  RSS: VmHWM (peak) from /proc/PID/status while idle, and VmHWM sampled
  every 20 ms through a burst run at concurrency 8 (peers: their 4-thread run, RQ's
  single worker) for "under load".
- Ceiling: agents.py's loop on apsw, WAL, synchronous=NORMAL, our schema.sql: each
  transaction completes the previous batch and claims the next, 1 or 100 jobs.
- Scale: the c=1 processing run on a table that already holds 1,000,000 finished rows
  (or 100,000 pending rows due tomorrow), built with one INSERT ... SELECT from a
  recursive CTE, divided by the empty-table c=1 rate of the same run.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import hashlib
import json
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    BENCH_DIR,
    REDIS_DB,
    REDIS_HOST,
    REDIS_PORT,
    REPO_DIR,
    RESULTS_DIR,
    VENV_DIR,
    cpu_seconds,
    cpu_seconds_precise,
    median,
    percentile,
    status_kb,
)

AGENTS = BENCH_DIR / "agents.py"
JOBS = BENCH_DIR / "bench_jobs.py"
SYSTEMS = ("ours", "huey", "litequeue", "rq")
NAMES = {"ours": "ours", "huey": "Huey", "litequeue": "litequeue", "rq": "RQ"}

SIZES = {
    # enqueue_*: jobs per enqueue run; n_*: jobs per processing run; reps: runs per median.
    "quick": {
        "enqueue_single": 3_000,
        "enqueue_bulk": 20_000,
        "enqueue_reps": 2,
        "n_ours": 20_000,
        "n_peer": 2_000,
        "n_rq": 600,
        "reps": 3,
        "peer_reps": 1,
        "latency_n": 150,
        "idle_seconds": 5.0,
        "ceiling_n": 20_000,
        "ceiling_reps": 2,
        "scale_finished": 1_000_000,
        "scale_future": 100_000,
        "scale_reps": 2,
    },
    "full": {
        "enqueue_single": 10_000,
        "enqueue_bulk": 100_000,
        "enqueue_reps": 3,
        "n_ours": 100_000,
        "n_peer": 5_000,
        "n_rq": 1_500,
        "reps": 3,
        "peer_reps": 3,
        "latency_n": 400,
        "idle_seconds": 5.0,
        "ceiling_n": 50_000,
        "ceiling_reps": 3,
        "scale_finished": 1_000_000,
        "scale_future": 100_000,
        "scale_reps": 3,
    },
}
LATENCY_GAP_MS = 20.0
SETTLE_SECONDS = 1.5
RUN_TIMEOUT = 300.0
BURST_GRACE = 5.0  # how long a burst worker may take to exit after its last job


# --- The bench's own virtualenv ---------------------------------------------------------


def ensure_venv(script: Path | None = None) -> None:
    """Re-run this script (or ``script``) in bench/.venv, creating and filling it first if needed."""
    if Path(sys.prefix).resolve() == VENV_DIR.resolve():
        return
    python = VENV_DIR / "bin" / "python"
    wanted = hashlib.sha256(
        (BENCH_DIR / "requirements.txt").read_bytes() + (REPO_DIR / "pyproject.toml").read_bytes()
    ).hexdigest()
    stamp = VENV_DIR / ".installed"
    if not python.exists():
        print(f"creating {VENV_DIR} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV_DIR)], check=True)
    if not stamp.exists() or stamp.read_text() != wanted:
        print("installing the peers and the worker into it ...", flush=True)
        subprocess.run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "--quiet",
                "-r",
                str(BENCH_DIR / "requirements.txt"),
                "-e",
                str(REPO_DIR),
            ],
            check=True,
        )
        stamp.write_text(wanted)
    os.execv(str(python), [str(python), str(script or Path(__file__).resolve()), *sys.argv[1:]])


# --- Processes --------------------------------------------------------------------------

STARTED: list[subprocess.Popen[bytes]] = []


def kill_leftovers() -> None:
    """Kill what this script started and is still running (each has its own process group)."""
    for proc in STARTED:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(proc.pid, 0)
            proc.returncode = -9


def spawn(command: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=log.open("ab"),
        env={**os.environ, **(env or {})},
        cwd=BENCH_DIR,
        start_new_session=True,
    )
    STARTED.append(proc)
    return proc


def peak_rss_kb(pid: int, previous: int | None) -> int | None:
    """VmHWM of a running process, or ``previous`` once it is gone.

    Sampled while the child runs: wait4's ru_maxrss would also count the pages of
    this (bigger) parent process that the child inherited until its exec.
    """
    try:
        return status_kb(pid, "VmHWM") or previous
    except OSError:
        return previous


def reap(proc: subprocess.Popen[bytes], timeout: float = RUN_TIMEOUT) -> tuple[int, Any, float, int | None]:
    """Wait for a child with wait4; returns (exit code, rusage, end time, peak RSS in kB)."""
    deadline = time.perf_counter() + timeout
    next_sample, hwm = 0.0, None
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        now = time.perf_counter()
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage, now, hwm
        if now >= next_sample:
            hwm, next_sample = peak_rss_kb(proc.pid, hwm), now + 0.02
        if now > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise TimeoutError(f"{proc.args!r} did not finish in {timeout:.0f} s")
        time.sleep(0.002)


def stop(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            reap(proc, timeout)
        except TimeoutError:
            kill_leftovers()


def last_json(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    assert proc.stdout is not None
    lines = proc.stdout.read().decode().strip().splitlines()
    if not lines:
        raise RuntimeError(f"{proc.args!r} printed nothing (exit {proc.returncode})")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


class Bench:
    """One run of the suite: its parameters, scratch directory and results."""

    def __init__(self, sizes: dict[str, Any], workdir: Path, only: set[str]) -> None:
        self.sizes = sizes
        self.workdir = workdir
        self.only = only
        self.python = sys.executable
        self.log = workdir / "children.log"
        self.counter = 0
        self.results: dict[str, Any] = {
            "enqueue": {},
            "processing": {},
            "latency": {},
            "idle": {},
            "ceiling": {},
            "scale": {},
        }
        self.notes: list[str] = []

    # -- helpers --

    def fresh_db(self, name: str) -> str:
        self.counter += 1
        return str(self.workdir / f"{self.counter:03d}-{name}.db")

    def agent(self, *args: str, timeout: float = RUN_TIMEOUT) -> dict[str, Any]:
        proc = spawn([self.python, str(AGENTS), *args], self.log)
        code, *_ = reap(proc, timeout)
        result = last_json(proc)
        if code != 0:
            raise RuntimeError(f"agents.py {' '.join(args)} exited {code}; see {self.log}")
        return result

    def say(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    def wanted(self, system: str) -> bool:
        return not self.only or system in self.only

    # -- enqueue --

    def enqueue(self) -> None:
        for system in SYSTEMS:
            if not self.wanted(system):
                continue
            entry = self.results["enqueue"].setdefault(system, {})
            for mode in ("single", "bulk"):
                n = self.sizes["enqueue_single" if mode == "single" else "enqueue_bulk"]
                runs = []
                for _ in range(self.sizes["enqueue_reps"]):
                    self.reset_redis()
                    db = self.fresh_db(f"enqueue-{system}")
                    runs.append(self.agent("enqueue", system, "--db", db, "--n", str(n), "--mode", mode))
                    if "skipped" in runs[-1]:
                        break
                entry[mode] = summarise(runs, "rate")
            self.say(
                f"enqueue {system}: {fmt_per_second(entry['single'].get('median'))} single, "
                f"{fmt_per_second(entry['bulk'].get('median'))} bulk"
            )
        self.reset_redis()

    # -- processing --

    def ours_run(self, n: int, concurrency: int, processes: int = 1, db: str | None = None) -> dict[str, Any]:
        if db is None:
            db = self.fresh_db(f"ours-c{concurrency}-p{processes}")
        self.agent("fill", "ours", "--db", db, "--n", str(n))
        command = [self.python, "-m", "worker_cli", "run", "--burst", "--db", db, "--jobs", str(JOBS)]
        command += ["--concurrency", str(concurrency)]
        if processes > 1:
            command += ["--processes", str(processes)]
        reader = sqlite3.connect(Path(db).resolve().as_uri() + "?mode=ro", uri=True, timeout=5, isolation_level=None)
        # Our jobs are the due no-op rows the fill just made (consecutive ids); rows the
        # worker adds itself (its cron jobs) and the scale rows are not counted.
        low, high, filled = reader.execute(
            "SELECT min(id), max(id), count(*) FROM worker_jobs"
            " WHERE status = 'pending' AND type = 'noop' AND due <= ?",
            (time.time_ns() // 1_000_000,),
        ).fetchone()
        ours = "FROM worker_jobs WHERE id BETWEEN ? AND ? AND type = 'noop'"
        # Cheap while the worker runs: both counts go through the partial indexes.
        unfinished = (
            "SELECT (SELECT count(*) FROM worker_jobs WHERE status = 'pending' AND due <= ? AND id BETWEEN ? AND ?)"
            " + (SELECT count(*) FROM worker_jobs WHERE status = 'running' AND id BETWEEN ? AND ?)"
        )
        started = time.perf_counter()
        proc = spawn(command, self.log, {"WORKER_LOG_LEVEL": "WARNING"})
        exited = done = None
        next_look = started + 0.2
        next_sample, hwm = 0.0, None
        code, usage = None, None
        while time.perf_counter() - started < RUN_TIMEOUT:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            now = time.perf_counter()
            if pid:
                exited = now
                code = proc.returncode = os.waitstatus_to_exitcode(status)
                break
            if now >= next_sample:
                hwm, next_sample = peak_rss_kb(proc.pid, hwm), now + 0.02
            if now >= next_look:
                next_look = now + 0.2
                if done is None:
                    params = (time.time_ns() // 1_000_000 + 1, low, high, low, high)
                    if reader.execute(unfinished, params).fetchone()[0] == 0:
                        done = now
                # A burst worker (or a supervisor of burst workers) gets BURST_GRACE to exit.
                if done is not None and now - done > BURST_GRACE:
                    break
            time.sleep(0.002)
        if exited is None:
            self.notes.append(
                f"ours c={concurrency} p={processes}: --burst did not exit within {BURST_GRACE:.0f} s of its last "
                "job (stopped with SIGTERM; wall-clock rate not reported)"
            )
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            code, usage, _, _ = reap(proc, 30)
        end = exited if exited is not None else done
        maxrss_kb = hwm if processes == 1 else None
        cpu = usage.ru_utime + usage.ru_stime if processes == 1 and usage is not None else None
        count, first, last, not_succeeded = reader.execute(
            f"SELECT count(*), min(started), max(finished), total(status != 'succeeded') {ours}", (low, high)
        ).fetchone()
        reader.close()
        window = (last - first) / 1000 if count and last is not None and first is not None else float("nan")
        ok = code in (0, None) and count == filled and not not_succeeded
        if not ok:
            self.notes.append(
                f"ours c={concurrency} p={processes}: exit {code}, {count} rows, {not_succeeded:.0f} not succeeded "
                f"(expected {filled} succeeded); see {self.log}"
            )
        wall = (end - started) if end is not None and exited is not None else float("nan")
        return {
            "n": filled,
            "ok": ok,
            "rate": filled / window if window > 0 else float("nan"),
            "window_s": window,
            "wall_s": wall,
            "wall_rate": filled / wall if wall > 0 else float("nan"),
            "exit_code": code,
            "maxrss_kb": maxrss_kb,
            "cpu_s": cpu,
        }

    def huey_run(self, n: int, workers: int, worker_type: str) -> dict[str, Any]:
        db = self.fresh_db(f"huey-{worker_type}{workers}")
        self.agent("fill", "huey", "--db", db, "--n", str(n))
        command = [self.python, str(AGENTS), "huey-consumer", "--db", db, "--workers", str(workers)]
        command += ["--worker-type", worker_type, "--expect", str(n)]
        started = time.perf_counter()
        proc = spawn(command, self.log)
        code, usage, end, hwm = reap(proc)
        out = last_json(proc)
        return self.checked(f"huey {worker_type}s={workers}", peer_result(n, out, code, usage, end - started, hwm))

    def litequeue_run(self, n: int, threads: int, processes: int = 1) -> dict[str, Any]:
        db = self.fresh_db(f"litequeue-t{threads}-p{processes}")
        n = self.agent("fill", "litequeue", "--db", db, "--n", str(n))["n"]
        command = [self.python, str(AGENTS), "litequeue-worker", "--db", db, "--threads", str(threads), "--burst"]
        return self.peer_processes(n, command, processes)

    def rq_run(self, n: int, processes: int = 1) -> dict[str, Any]:
        self.reset_redis()
        n = self.agent("fill", "rq", "--n", str(n))["n"]
        result = self.peer_processes(n, [self.python, str(AGENTS), "rq-worker", "--burst"], processes)
        self.reset_redis()
        return result

    def peer_processes(self, n: int, command: list[str], processes: int) -> dict[str, Any]:
        started = time.perf_counter()
        procs = [spawn(command, self.log) for _ in range(processes)]
        finished = [reap(proc) for proc in procs]
        outs = [last_json(proc) for proc in procs]
        code = max(abs(f[0]) for f in finished)
        end = max(f[2] for f in finished)
        combined = {
            "completed": max(o["completed"] for o in outs)
            if "rq-worker" in command
            else sum(o["completed"] for o in outs),
            "first": min(o["first"] for o in outs if o["first"]),
            "last": max(o["last"] for o in outs),
        }
        single = processes == 1
        result = peer_result(
            n, combined, code, finished[0][1] if single else None, end - started, finished[0][3] if single else None
        )
        return self.checked(f"{command[2]} x{processes}", result)

    def checked(self, what: str, result: dict[str, Any]) -> dict[str, Any]:
        if not result["ok"]:
            self.notes.append(f"{what}: {result['completed']} of {result['n']} jobs completed; see {self.log}")
        return result

    def processing(self) -> None:
        sizes = self.sizes
        plans: dict[str, dict[str, Callable[[], dict[str, Any]]]] = {
            "ours": {
                "c1": lambda: self.ours_run(sizes["n_ours"], 1),
                "c4": lambda: self.ours_run(sizes["n_ours"], 4),
                "p4": lambda: self.ours_run(sizes["n_ours"], 1, processes=4),
                "c8": lambda: self.ours_run(sizes["n_ours"], 8),
            },
            "huey": {
                "c1": lambda: self.huey_run(sizes["n_peer"], 1, "thread"),
                "c4": lambda: self.huey_run(sizes["n_peer"], 4, "thread"),
                "p4": lambda: self.huey_run(sizes["n_peer"], 4, "process"),
            },
            "litequeue": {
                "c1": lambda: self.litequeue_run(sizes["n_peer"], 1),
                "c4": lambda: self.litequeue_run(sizes["n_peer"], 4),
                "p4": lambda: self.litequeue_run(sizes["n_peer"], 1, processes=4),
            },
            "rq": {
                "c1": lambda: self.rq_run(sizes["n_rq"]),
                "p4": lambda: self.rq_run(sizes["n_rq"], processes=4),
            },
        }
        for system, plan in plans.items():
            if not self.wanted(system) or (system == "rq" and not self.redis_ok()):
                continue
            entry = self.results["processing"].setdefault(system, {})
            reps = sizes["reps"] if system == "ours" else sizes["peer_reps"]
            runs: dict[str, list[dict[str, Any]]] = {config: [] for config in plan}
            # Configurations take turns, so a slow spell of the machine hits them alike.
            for rep in range(reps):
                for config, run in plan.items():
                    if config != "c8" or rep == 0:
                        runs[config].append(run())
            for config, done in runs.items():
                entry[config] = summarise(done, "rate")
                entry[config]["maxrss_kb"] = max((r["maxrss_kb"] or 0 for r in done), default=0) or None
            if "p4" in runs and "c1" in runs:
                # The 4-process goal as the median of ratios of runs made side by side.
                entry["p4"]["ratio_to_c1"] = median(
                    [p["rate"] / c["rate"] for p, c in zip(runs["p4"], runs["c1"], strict=True)]
                )
            self.say(
                f"processing {system}: "
                + ", ".join(f"{config} {fmt_rate(entry[config]['median'])}/s" for config in plan)
            )

    # -- idle worker: CPU, RSS, latency --

    def idle_worker(self, system: str, db: str) -> subprocess.Popen[bytes]:
        if system == "ours":
            command = [self.python, "-m", "worker", "run", "--db", db, "--jobs", str(JOBS), "--concurrency", "4"]
            return spawn(command, self.log, {"WORKER_LOG_LEVEL": "WARNING"})
        if system == "huey":
            return spawn([self.python, str(AGENTS), "huey-consumer", "--db", db, "--workers", "4"], self.log)
        if system == "litequeue":
            return spawn([self.python, str(AGENTS), "litequeue-worker", "--db", db], self.log)
        return spawn([self.python, str(AGENTS), "rq-worker"], self.log)

    def idle_and_latency(self) -> None:
        for system in SYSTEMS:
            if not self.wanted(system) or (system == "rq" and not self.redis_ok()):
                continue
            self.reset_redis()
            db = self.fresh_db(f"idle-{system}")
            if system == "litequeue":  # its worker would otherwise race the producer to create the table
                self.agent("fill", "litequeue", "--db", db, "--n", "0")
            proc = self.idle_worker(system, db)
            try:
                time.sleep(SETTLE_SECONDS)
                if proc.poll() is not None:
                    raise RuntimeError(f"idle {system} worker exited {proc.returncode}; see {self.log}")
                precise_before = cpu_seconds_precise(proc.pid)
                cpu_before, t_before = cpu_seconds(proc.pid), time.perf_counter()
                time.sleep(self.sizes["idle_seconds"])
                cpu_after, t_after = cpu_seconds(proc.pid), time.perf_counter()
                precise_after = cpu_seconds_precise(proc.pid)
                idle = {
                    "cpu_percent": 100 * (cpu_after - cpu_before) / (t_after - t_before),
                    "cpu_percent_schedstat": None
                    if precise_before is None or precise_after is None
                    else 100 * (precise_after - precise_before) / (t_after - t_before),
                    "seconds": t_after - t_before,
                    "vmhwm_kb": status_kb(proc.pid, "VmHWM"),
                    "vmrss_kb": status_kb(proc.pid, "VmRSS"),
                }
                lat = self.agent(
                    "latency", system, "--db", db, "--n", str(self.sizes["latency_n"]), "--gap-ms", str(LATENCY_GAP_MS)
                )
                idle["vmhwm_after_latency_kb"] = status_kb(proc.pid, "VmHWM")
            finally:
                stop(proc)
            values = lat["latencies_ms"]
            self.results["idle"][system] = idle
            self.results["latency"][system] = {
                "n": len(values),
                "missing": lat["missing"],
                "p50": percentile(values, 50),
                "p95": percentile(values, 95),
                "p99": percentile(values, 99),
                "max": max(values, default=float("nan")),
                "latencies_ms": values,
            }
            latency = self.results["latency"][system]
            self.say(
                f"idle {system}: {idle['cpu_percent']:.2f}% CPU, VmHWM {idle['vmhwm_kb'] / 1024:.1f} MB; "
                f"latency p50 {latency['p50']:.2f} ms, p99 {latency['p99']:.2f} ms"
            )
        self.reset_redis()

    # -- ceiling and scale --

    def ceiling(self) -> None:
        n = str(self.sizes["ceiling_n"])
        for driver in ("apsw", "sqlite3"):
            for batch in (1, 100):
                runs = [
                    self.agent(
                        "ceiling",
                        "--db",
                        self.fresh_db(f"ceiling-{driver}-{batch}"),
                        "--n",
                        n,
                        "--batch",
                        str(batch),
                        "--driver",
                        driver,
                    )
                    for _ in range(self.sizes["ceiling_reps"])
                ]
                entry = summarise(runs, "rate")
                entry["sqlite"] = runs[0].get("sqlite")
                self.results["ceiling"][f"{driver}-{batch}"] = entry
            self.say(
                f"ceiling {driver}: {fmt_rate(self.results['ceiling'][f'{driver}-1']['median'])}/s one per "
                f"transaction, {fmt_rate(self.results['ceiling'][f'{driver}-100']['median'])}/s 100 per transaction"
            )

    def scale(self) -> None:
        """Each scale run is paired with an empty-table run made just before it."""
        n = self.sizes["n_ours"]
        templates = {}
        for key, option, count in (
            ("finished", "--finished", self.sizes["scale_finished"]),
            ("future", "--future", self.sizes["scale_future"]),
        ):
            template = self.fresh_db(f"scale-{key}-template")
            built = self.agent("build-scale", "--db", template, option, str(count))
            templates[key] = template
            self.results["scale"][key] = {"rows": count, "build_seconds": built["seconds"]}
        runs: dict[str, list[dict[str, Any]]] = {"empty": [], "finished": [], "future": []}
        for _ in range(self.sizes["scale_reps"]):
            for key in ("finished", "future"):
                runs["empty"].append(self.ours_run(n, 1))
                db = self.fresh_db(f"scale-{key}")
                shutil.copyfile(templates[key], db)
                runs[key].append(self.ours_run(n, 1, db=db))
        for template in templates.values():
            Path(template).unlink()
        self.results["scale"]["empty"] = summarise(runs["empty"], "rate")
        for key in ("finished", "future"):
            entry = self.results["scale"][key]
            entry.update(summarise(runs[key], "rate"))
            pairs = zip(runs[key], runs["empty"][0 if key == "finished" else 1 :: 2], strict=True)
            entry["ratio"] = median([big["rate"] / empty["rate"] for big, empty in pairs])
            self.say(
                f"scale {key} ({entry['rows']:,} rows, built in {entry['build_seconds']:.1f} s): "
                f"{fmt_rate(entry['median'])}/s, {entry['ratio']:.2f}x the empty table run beside it"
            )

    # -- Redis --

    def redis_ok(self) -> bool:
        if not hasattr(self, "_redis_ok"):
            try:
                from redis import Redis

                Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB, socket_connect_timeout=1).ping()
                self._redis_ok = True
            except Exception as e:
                self.notes.append(f"RQ skipped: no Redis at {REDIS_HOST}:{REDIS_PORT} ({e})")
                self._redis_ok = False
        return self._redis_ok

    def reset_redis(self) -> None:
        if self.wanted("rq") and self.redis_ok():
            from redis import Redis

            Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB).flushdb()


def peer_result(n: int, out: dict[str, Any], code: int, usage: Any, wall: float, hwm_kb: int | None) -> dict[str, Any]:
    window = out["last"] - out["first"] if out.get("first") else float("nan")
    completed = out.get("completed")
    return {
        "n": n,
        "ok": code == 0 and completed == n,
        "completed": completed,
        "rate": n / window if window > 0 else float("nan"),
        "window_s": window,
        "wall_s": wall,
        "wall_rate": n / wall,
        "maxrss_kb": hwm_kb,
        "cpu_s": usage.ru_utime + usage.ru_stime if usage is not None else None,
    }


def summarise(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    if runs and "skipped" in runs[0]:
        return {"median": None, "skipped": runs[0]["skipped"]}
    summary: dict[str, Any] = {"median": median([r[key] for r in runs]), "runs": runs}
    if runs and "wall_rate" in runs[0]:
        summary["wall_median"] = median([r["wall_rate"] for r in runs])
    return summary


# --- The table ----------------------------------------------------------------------------


def fmt_rate(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{value:,.0f}"


def fmt_per_second(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{value:,.0f}/s"


def fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None or value != value else f"{value:,.{digits}f}"


def ratio(ours: float | None, peer: float | None) -> float | None:
    if ours is None or peer is None or ours != ours or peer != peer or peer == 0:
        return None
    return ours / peer


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "MISSED")


def at_least(value: float | None, goal: float) -> bool | None:
    return None if value is None or value != value else value >= goal


def at_most(value: float | None, goal: float) -> bool | None:
    return None if value is None or value != value else value <= goal


def both(*checks: bool | None) -> bool | None:
    return None if any(c is None for c in checks) else all(checks)


def build_table(results: dict[str, Any]) -> tuple[list[list[str]], list[dict[str, Any]]]:
    """Rows of the printed table, and the goal verdicts for the JSON."""
    rows: list[list[str]] = []
    goals: list[dict[str, Any]] = []

    def get(section: str, system: str, *path: str) -> Any:
        node: Any = results.get(section, {}).get(system)
        for key in path:
            if not isinstance(node, dict):
                return None
            node = node.get(key)
        return node

    def add(label: str, values: dict[str, float | None], digits: int, goal: str, ok: bool | None, lower: bool) -> None:
        cells = [label]
        for system in SYSTEMS:
            cells.append(fmt_rate(values.get(system)) if digits == 0 else fmt(values.get(system), digits))
        for peer in SYSTEMS[1:]:
            r = ratio(values.get("ours"), values.get(peer))
            cells.append("n/a" if r is None else f"{r:.2f}x")
        cells += [goal, verdict(ok) if goal else ""]
        rows.append(cells)
        if goal:
            goals.append({"metric": label, "ours": values.get("ours"), "goal": goal, "met": ok})

    def section(title: str) -> None:
        rows.append([title])

    section("Enqueue, jobs/s")
    single = {s: get("enqueue", s, "single", "median") for s in SYSTEMS}
    bulk = {s: get("enqueue", s, "bulk", "median") for s in SYSTEMS}
    add("  one job per transaction", single, 0, ">= 10,000", at_least(single["ours"], 10_000), False)
    add("  bulk, 1,000 per call (1)", bulk, 0, ">= 100,000", at_least(bulk["ours"], 100_000), False)

    section("Processing no-op jobs, jobs/s (first start -> last finish)")
    proc = {c: {s: get("processing", s, c, "median") for s in SYSTEMS} for c in ("c1", "c4", "p4", "c8")}
    for config, label in (("c1", "  1 process, concurrency 1"), ("c4", "  1 process, concurrency 4 (2)")):
        values = proc[config]
        ok = both(at_least(values["ours"], 10_000), at_least(ratio(values["ours"], values["huey"]), 3.0))
        add(label, values, 0, ">= 10,000 and >= 3x Huey", ok, False)
    p4_ratio = get("processing", "ours", "p4", "ratio_to_c1")
    add(
        "  4 processes, concurrency 1 each (3)",
        proc["p4"],
        0,
        f">= 0.9x 1 process: {fmt(p4_ratio, 2)}x",
        at_least(p4_ratio, 0.9),
        False,
    )
    wall = {s: get("processing", s, "c1", "wall_median") for s in SYSTEMS}
    add("  concurrency 1, spawn -> exit (wall)", wall, 0, "", None, False)

    section("Latency with an idle worker, enqueue -> start, ms (4)")
    for p, goal, limit in (("p50", "<= 5 ms", 5.0), ("p95", "", None), ("p99", "<= 25 ms", 25.0)):
        values = {s: get("latency", s, p) for s in SYSTEMS}
        add(f"  {p}", values, 2, goal, at_most(values["ours"], limit) if limit else None, True)

    section("Resources")
    cpu = {s: get("idle", s, "cpu_percent") for s in SYSTEMS}
    add(
        "  idle CPU, % of one core, over 5 s (7)",
        cpu,
        2,
        "< 2 %",
        None if cpu["ours"] is None else cpu["ours"] < 2,
        True,
    )
    idle_rss = {s: (get("idle", s, "vmhwm_kb") or 0) / 1024 or None for s in SYSTEMS}
    add("  peak RSS idle (VmHWM), MB", idle_rss, 1, "< 40 MB", at_most(idle_rss["ours"], 40), True)
    under_load = {"ours": "c8", "huey": "c4", "litequeue": "c4", "rq": "c1"}
    load_rss = {s: (get("processing", s, under_load[s], "maxrss_kb") or 0) / 1024 or None for s in SYSTEMS}
    add("  peak RSS under load, MB (5)", load_rss, 1, "< 60 MB at c=8", at_most(load_rss["ours"], 60), True)

    section("Bare-SQL ceiling (WAL, synchronous=NORMAL, our schema, the worker's writes), jobs/s of the loop (6)")
    best = max((v for v in (proc["c1"]["ours"], proc["c4"]["ours"]) if v is not None and v == v), default=None)
    for driver, library in (("apsw", "apsw"), ("sqlite3", "stdlib sqlite3")):
        one = get("ceiling", f"{driver}-1", "median")
        many = get("ceiling", f"{driver}-100", "median")
        version = get("ceiling", f"{driver}-1", "sqlite") or "?"
        c1_share = ratio(proc["c1"]["ours"], one)
        best_share = ratio(best, many)
        blank = [""] * 6
        rows.append(
            [
                f"  {library} (SQLite {version}), 1 job per tx",
                fmt_rate(one),
                *blank,
                f"ours c=1: {fmt(c1_share, 2)}x",
                "",
            ]
        )
        rows.append(
            [
                f"  {library} (SQLite {version}), 100 jobs per tx",
                fmt_rate(many),
                *blank,
                f"ours best: {fmt(best_share, 2)}x",
                "",
            ]
        )
        goals.append({"metric": f"ours c=1 / ceiling {library} 1 per tx", "ours": c1_share})
        goals.append({"metric": f"ours best single process / ceiling {library} 100 per tx", "ours": best_share})

    section("Scale: ours, concurrency 1, jobs/s; ratio to an empty-table run made beside each")
    for key, label in (
        ("finished", "  with 1,000,000 finished rows"),
        ("future", "  with 100,000 pending rows due later"),
    ):
        value = get("scale", key, "median")
        r = get("scale", key, "ratio")
        rows.append([label, fmt_rate(value), *[""] * 6, f">= 0.80x empty: {fmt(r, 2)}x", verdict(at_least(r, 0.8))])
        goals.append({"metric": label.strip(), "ours": r, "goal": ">= 0.80x", "met": at_least(r, 0.8)})
    return rows, goals


TABLE_HEADER = ["", "ours", "Huey", "litequeue", "RQ", "ours/Huey", "ours/lq", "ours/RQ", "goal (ours)", ""]
FOOTNOTES = """\
(1) ours: Queue.enqueue_many; RQ: Queue.enqueue_many; litequeue: put() inside its transaction()
    (no bulk call); Huey: none (its map() is one transaction per task).
(2) Huey: 4 worker threads; litequeue: 4 threads, one connection each; RQ has no threads (n/a).
(3) Huey: 4 worker processes; litequeue and RQ: 4 worker processes on the same queue.
(4) ours: default concurrency 4; Huey: 4 threads, default polling (0.1 s, backing off to 10 s);
    litequeue: one loop that sleeps 5 ms when empty; RQ: SimpleWorker blocking on Redis.
(5) VmHWM sampled during a burst run: ours at concurrency 8; peers: their 4-thread run (RQ: its one worker).
(6) each transaction records the previous batch and claims the next (our loop's shape); apsw as in the
    issue, and the stdlib sqlite3 that the worker itself uses; "ours best" is the faster of c=1 and c=4.
(7) utime+stime from /proc/PID/stat: one clock tick (10 ms) over 5 s is 0.2 %; the JSON also has
    the nanosecond figure from /proc/PID/task/*/schedstat.
Ratios are ours / peer; for latency, CPU and memory lower is better, so below 1x is good."""


def render(rows: list[list[str]]) -> str:
    widths: list[int] = []
    for cells in [TABLE_HEADER] + [r for r in rows if len(r) > 1]:
        for i, cell in enumerate(cells):
            if i >= len(widths):
                widths.append(0)
            widths[i] = max(widths[i], len(cell))
    lines = []

    def line(cells: list[str]) -> str:
        return "  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(cells))

    lines.append(line(TABLE_HEADER))
    for cells in rows:
        lines.append(cells[0] if len(cells) == 1 else line(cells))
    return "\n".join(lines)


# --- Run -------------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    import apsw
    import huey
    import litequeue
    import rq

    info: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_average_at_start": os.getloadavg(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "cpu_model": next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            None,
        ),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "apsw": apsw.apsw_version(),
        "sqlite": apsw.sqlite_lib_version(),
        "huey": huey.__version__,
        "litequeue": litequeue.__version__,
        "rq": rq.__version__ if hasattr(rq, "__version__") else None,
    }
    with contextlib.suppress(Exception):
        from redis import Redis

        info["redis_server"] = Redis(host=REDIS_HOST, port=REDIS_PORT, socket_connect_timeout=1).info("server")[
            "redis_version"
        ]
    with contextlib.suppress(Exception):
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_DIR, capture_output=True, text=True, check=True
        ).stdout.strip()
        info["git_dirty"] = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--", "worker.py", "schema.sql"],
                cwd=REPO_DIR,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        )
    return info


@contextlib.contextmanager
def scratch(keep: bool, where: str | None) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="worker-bench-", dir=where))
    try:
        yield path
    finally:
        if keep:
            print(f"scratch files kept in {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description="Benchmark the worker against Huey, litequeue and RQ.")
    parser.add_argument("--quick", action="store_true", help="smaller N and fewer repetitions (under 3 minutes)")
    parser.add_argument("--only", default="", help="comma-separated systems to run (ours,huey,litequeue,rq)")
    parser.add_argument(
        "--skip", default="", help="comma-separated parts to skip (enqueue,processing,idle,ceiling,scale)"
    )
    parser.add_argument("--workdir", help="directory for the scratch databases (default: a new temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch databases")
    args = parser.parse_args()
    ensure_venv()

    atexit.register(kill_leftovers)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(1))
    mode = "quick" if args.quick else "full"
    sizes = SIZES[mode]
    skip = {part.strip() for part in args.skip.split(",") if part.strip()}
    only = {part.strip() for part in args.only.split(",") if part.strip()}
    began = time.perf_counter()
    info = environment()
    print(
        f"worker benchmark ({mode}) on {info['cpus']} CPUs, {info['cpu_model']}, Python {info['python']}, "
        f"SQLite {info['sqlite']}",
        flush=True,
    )
    load = os.getloadavg()[0]
    if load > 1.0:
        print(f"warning: load average {load:.2f} before the run: other work on this machine skews the figures")
    with scratch(args.keep, args.workdir) as workdir:
        bench = Bench(sizes, workdir, only)
        parts: list[tuple[str, Callable[[], None]]] = [
            ("enqueue", bench.enqueue),
            ("processing", bench.processing),
            ("idle", bench.idle_and_latency),
            ("ceiling", bench.ceiling),
            ("scale", bench.scale),
        ]
        for name, part in parts:
            if name in skip or (name in ("ceiling", "scale") and only and "ours" not in only):
                continue
            try:
                part()
            except Exception as e:  # one broken part must not lose the others
                bench.notes.append(f"{name} failed: {type(e).__name__}: {e}")
                bench.say(f"{name} FAILED: {type(e).__name__}: {e}")
        if bench.log.exists() and bench.log.stat().st_size:
            tail = bench.log.read_text(errors="replace").strip().splitlines()[-5:]
            info["children_log_tail"] = tail
    elapsed = time.perf_counter() - began
    info["load_average_at_end"] = os.getloadavg()
    rows, goals = build_table(bench.results)
    print()
    print(render(rows))
    print(FOOTNOTES)
    for note in bench.notes:
        print(f"note: {note}")
    print(f"\n{mode} run took {elapsed:.0f} s")

    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS_DIR / f"{stamp}{'-quick' if args.quick else ''}.json"
    document = {
        "mode": mode,
        "seconds": elapsed,
        "environment": info,
        "sizes": sizes,
        "goals": goals,
        "table": rows,
        "results": bench.results,
        "notes": bench.notes,
    }
    out.write_text(json.dumps(document, indent=1, default=str))
    print(f"results written to {out.relative_to(REPO_DIR)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
