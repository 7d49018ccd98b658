"""Compare the worker at two revisions on this machine: turn-by-turn runs, medians, ratio.

    bench/.venv/bin/python bench/ab.py HEAD~1 HEAD [--concurrency 1] [--n 10000] [--rounds 5]
    bench/.venv/bin/python bench/ab.py HEAD WORKTREE          # against the files as they are now
    bench/.venv/bin/python bench/ab.py HEAD WORKTREE --workload cpu       # bench/workloads.py's CPU-bound row
    bench/.venv/bin/python bench/ab.py HEAD WORKTREE --workload priority  # ... and its priority job under a backlog
    bench/.venv/bin/python bench/ab.py HEAD WORKTREE --workload sleep --concurrency 32   # ... its 1 ms jobs

On a shared 2-core machine two full benchmark runs can differ by 15 %, more than
most single changes gain.  Here the two revisions run turn by turn, so both see
the same noise, and the ratio of their medians is the figure to trust.

Each revision's worker.py, schema.sql (and worker_cli.py, where it has one) are exported
to a scratch directory.
Every round and revision: a fresh file; N no-op jobs enqueued one per
transaction, then N more with enqueue_many in calls of 1,000, each timed by
agents.py's ``enqueue ours`` as in run.py but with that revision's Queue; then
``python -m worker run --burst --concurrency C`` of that revision (jobs/s from
the first ``started`` to the last ``finished``, as in run.py).

With ``--workload cpu`` each round and revision drains N CPU-bound jobs (about
1 ms of pure Python each, bench/workloads.py's ``spin``) with ``--processes 1``
and then 2, and prints the rates, their ratio, and the worker processes' CPU
time per job (utime + stime, start-up included), the figure the machine's
other load moves least.  With ``--workload priority``: workloads.py's priority
row (a job of priority 100 every 10 ms while the worker drains 30,000 jobs of
1 ms at concurrency 16), p50 and p99 from the enqueue call to the job's start.
With ``--workload sleep``: N jobs of ``time.sleep(1 ms)`` at ``--concurrency``,
workloads.py's sleep row without its peers.
The producer and the filling are this checkout's; the worker is the revision's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH_DIR, REPO_DIR, noop_rate

FILES = ("worker.py", "schema.sql")
OPTIONAL_FILES = ("worker_cli.py",)  # the command line has its own module since 3b76a97
JOBS = BENCH_DIR / "bench_jobs.py"
AGENTS = BENCH_DIR / "agents.py"


def export(revision: str, into: Path) -> Path:
    into.mkdir()
    for name in FILES + OPTIONAL_FILES:
        if revision == "WORKTREE":
            if not (REPO_DIR / name).exists():
                continue
            text = (REPO_DIR / name).read_bytes()
        else:
            shown = subprocess.run(["git", "-C", str(REPO_DIR), "show", f"{revision}:{name}"], capture_output=True)
            if shown.returncode != 0 and name in OPTIONAL_FILES:
                continue
            shown.check_returncode()
            text = shown.stdout
        (into / name).write_bytes(text)
    return into


def one_round(code: Path, scratch: Path, n: int, concurrency: int) -> dict[str, float]:
    # The revision's directory first on the path, so `worker` is that revision's.
    env = {**os.environ, "PYTHONPATH": f"{code}{os.pathsep}{BENCH_DIR}", "WORKER_LOG_LEVEL": "WARNING"}
    db = Path(tempfile.mkdtemp(dir=scratch)) / "ab.db"
    rates = {}
    for mode in ("single", "bulk"):  # run.py's enqueue measurement, through the revision's Queue
        enqueue = [sys.executable, str(AGENTS), "enqueue", "ours", "--mode", mode, "--db", str(db), "--n", str(n)]
        measured = subprocess.run(enqueue, check=True, capture_output=True, env=env, cwd=code)
        rates[mode] = json.loads(measured.stdout)["rate"]
    command = [sys.executable, "-m", "worker", "run", "--burst", "--no-cron", "--db", str(db), "--jobs", str(JOBS)]
    subprocess.run([*command, "--concurrency", str(concurrency)], check=True, env=env, cwd=code)
    done, rates["processing"] = noop_rate(db)
    if done != 2 * (n + 1):  # each enqueue run adds one untimed job first
        raise SystemExit(f"{code}: only {done} jobs succeeded")
    return rates


def workload_round(workload: str, code: Path, scratch: Path, n: int, loops: int, concurrency: int) -> dict[str, float]:
    """One revision's turn at a bench/workloads.py row: its worker processes run with its code first on the path."""
    import workloads  # the bench venv's peers (psycopg) come with it: only for these workloads

    os.environ["PYTHONPATH"] = f"{code}{os.pathsep}{BENCH_DIR}"
    figures: dict[str, float] = {}
    if workload == "cpu":
        for processes in (1, 2):
            db = str(Path(tempfile.mkdtemp(dir=scratch)) / "cpu.db")
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            run = workloads.ours(db, "spin", {"loops": loops}, n, 1, processes)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            if not run["ok"]:
                raise SystemExit(f"{code}: the CPU-bound drain failed: {run}")
            figures[f"p{processes}"] = run["rate"]
            cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
            figures[f"p{processes} cpu us/job"] = cpu / n * 1e6
        figures["p2 / p1"] = figures["p2"] / figures["p1"]
    elif workload == "sleep":
        db = str(Path(tempfile.mkdtemp(dir=scratch)) / "sleep.db")
        run = workloads.ours(db, "sleep_ms", {"ms": 1}, n, concurrency)
        if not run["ok"]:
            raise SystemExit(f"{code}: the 1 ms drain failed: {run}")
        figures["jobs/s"] = run["rate"]
    else:
        results: dict[str, Any] = {}
        where = Path(tempfile.mkdtemp(dir=scratch))
        workloads.part_priority(dict(workloads.SIZES["quick"]), where, results)
        figures = {"p50 ms": results["priority"]["p50"], "p99 ms": results["priority"]["p99"]}
    figures["load"] = os.getloadavg()[0]
    return figures


def compare_workload(args: argparse.Namespace, code: dict[str, Path], scratch: Path) -> None:
    import workloads

    loops = workloads.calibrate() if args.workload == "cpu" else 0
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in code}
    for number in range(args.rounds):
        for name, path in code.items() if number % 2 == 0 else reversed(code.items()):
            runs[name].append(workload_round(args.workload, path, scratch, args.n, loops, args.concurrency))
            shown = ", ".join(f"{k} {v:,.2f}" for k, v in runs[name][-1].items())
            print(f"round {number + 1}/{args.rounds} {name}: {shown}", file=sys.stderr, flush=True)
    print(
        f"--workload {args.workload}"
        + (f", {args.n:,} jobs of {loops} loops" if loops else "")
        + (f", {args.n:,} jobs at concurrency {args.concurrency}" if args.workload == "sleep" else "")
        + f", medians of {args.rounds} rounds (load {os.getloadavg()[0]:.2f} at the end)"
    )
    print(f"  {'':24}{args.a:>14}{args.b:>14}{'b / a':>9}")
    for figure in runs[args.a][0]:
        a, b = (statistics.median(run[figure] for run in runs[name]) for name in (args.a, args.b))
        print(f"  {figure:24}{a:>14,.2f}{b:>14,.2f}{b / a:>8.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", help="a git revision, or WORKTREE")
    parser.add_argument("b", help="a git revision, or WORKTREE")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--n", type=int, default=10_000, help="jobs enqueued each way per round (default 10,000)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workload", choices=("noop", "cpu", "priority", "sleep"), default="noop")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="worker-ab-") as scratch_dir:
        scratch = Path(scratch_dir)
        code = {name: export(name, scratch / f"rev{i}") for i, name in enumerate((args.a, args.b))}
        if args.workload != "noop":
            compare_workload(args, code, scratch)
            return 0
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in code}
        for number in range(args.rounds):
            for name, path in code.items() if number % 2 == 0 else reversed(code.items()):
                runs[name].append(one_round(path, scratch, args.n, args.concurrency))
            print(f"round {number + 1}/{args.rounds} done", file=sys.stderr)
    print(f"{args.n:,} jobs each way, concurrency {args.concurrency}, medians of {args.rounds} rounds, jobs/s")
    print(f"  {'':32}{args.a:>14}{args.b:>14}{'b / a':>9}")
    for figure in ("single", "bulk", "processing"):
        a, b = (statistics.median(run[figure] for run in runs[name]) for name in (args.a, args.b))
        label = {"single": "enqueue, one per transaction", "bulk": "enqueue_many, 1,000 per call"}.get(
            figure, "processing (worker run --burst)"
        )
        print(f"  {label:32}{a:>14,.0f}{b:>14,.0f}{b / a:>8.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
