"""Where does our worker's time go?  Sample one burst run over N no-op jobs with py-spy.

    bench/.venv/bin/python bench/profile_worker.py [--n 20000] [--concurrency 1]

(run ``python bench/run.py --quick`` once first: it creates bench/.venv with py-spy.)
Runs the real ``python -m worker run --burst`` under ``py-spy record --threads`` and
prints, per thread, the functions that were on CPU (self) and the ones below which
the time was spent (inclusive), plus the rate of the run from the table.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH_DIR, VENV_DIR, noop_rate

FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def short(frame: str, with_line: bool) -> str:
    match = FRAME.match(frame)
    if not match:
        return frame
    name = Path(match["file"]).name
    line = f":{match['line']}" if with_line and match["line"] else ""
    return f"{match['function']} ({name}{line})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000, help="no-op jobs to run (default 20,000)")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--rate", type=int, default=1000, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--lines", action="store_true", help="self time by source line, not by function")
    parser.add_argument("--keep", action="store_true", help="keep the raw stacks")
    parser.add_argument(
        "--all-threads",
        action="store_true",
        help="sample every thread py-spy deems active, not only the one holding the GIL",
    )
    args = parser.parse_args()

    python = VENV_DIR / "bin" / "python"
    py_spy = shutil.which("py-spy", path=str(VENV_DIR / "bin")) or shutil.which("py-spy")
    if not py_spy:
        print("py-spy not found: run python bench/run.py --quick once (it fills bench/.venv)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="worker-profile-"))
    try:
        db = workdir / "profile.db"
        subprocess.run(
            [str(python), str(BENCH_DIR / "agents.py"), "fill", "ours", "--db", str(db), "--n", str(args.n)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        raw = workdir / "stacks.txt"
        command = [py_spy, "record", "--format", "raw", "--threads", "--rate", str(args.rate), "-o", str(raw)]
        if not args.all_threads:
            command.append("--gil")  # what holds the GIL is what runs Python (or SQLite, with the GIL held)
        command += ["--", str(python), "-m", "worker", "run", "--burst", "--db", str(db)]
        command += ["--jobs", str(BENCH_DIR / "bench_jobs.py"), "--concurrency", str(args.concurrency)]
        subprocess.run(command, check=True, env={**os.environ, "WORKER_LOG_LEVEL": "WARNING"}, capture_output=True)
        count, jobs_per_second = noop_rate(db)
        print(f"{count:,} no-op jobs at concurrency {args.concurrency}: {jobs_per_second:,.0f} jobs/s")
        print("(first start -> last finish, with py-spy attached at", args.rate, "samples/s)\n")

        by_thread: dict[str, int] = collections.Counter()
        self_time: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        inclusive: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        for line in raw.read_text().splitlines():
            stack, _, samples = line.rpartition(" ")
            frames = stack.split(";")
            thread = frames[0].split(": ", 1)[1] if ": " in frames[0] else frames[0]
            thread = "worker-job" if thread.startswith("worker-job") else thread
            frames = frames[1:]
            if not frames:
                continue
            n = int(samples)
            by_thread[thread] += n
            self_time[thread][short(frames[-1], args.lines)] += n
            for name in {short(frame, False) for frame in frames}:
                inclusive[thread][name] += n
        total = sum(by_thread.values())
        for thread, samples in sorted(by_thread.items(), key=lambda item: -item[1]):
            print(f"== thread {thread}: {samples} samples ({100 * samples / total:.0f}% of all on-CPU samples)")
            print("   self (on CPU in this function):")
            for name, n in self_time[thread].most_common(args.top):
                print(f"   {100 * n / samples:5.1f}%  {name}")
            print("   inclusive (this function or what it called):")
            for name, n in inclusive[thread].most_common(args.top):
                print(f"   {100 * n / samples:5.1f}%  {name}")
            print()
    finally:
        if args.keep:
            print(f"raw stacks (flamegraph.pl input) kept in {workdir / 'stacks.txt'}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
