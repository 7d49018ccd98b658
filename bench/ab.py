"""Compare the worker at two revisions on this machine: turn-by-turn runs, medians, ratio.

    bench/.venv/bin/python bench/ab.py HEAD~1 HEAD [--concurrency 1] [--n 10000] [--rounds 5]
    bench/.venv/bin/python bench/ab.py HEAD WORKTREE          # against the files as they are now

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
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", help="a git revision, or WORKTREE")
    parser.add_argument("b", help="a git revision, or WORKTREE")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--n", type=int, default=10_000, help="jobs enqueued each way per round (default 10,000)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="worker-ab-") as scratch_dir:
        scratch = Path(scratch_dir)
        code = {name: export(name, scratch / f"rev{i}") for i, name in enumerate((args.a, args.b))}
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
