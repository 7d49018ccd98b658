"""Counted under callgrind (see bench/README.md): valgrind --tool=callgrind python THIS_FILE DIR MODE [CONCURRENCY].

DIR holds the worker.py and schema.sql to measure (git show REV:worker.py > DIR/worker.py); MODE "none"
opens the file only, the baseline to subtract.
"""

import os
import sys
import tempfile

sys.path.insert(0, sys.argv[1])
import worker  # the revision under test, from DIR


@worker.job
def noop(ctx):
    pass


d = tempfile.mkdtemp()
q = worker.Queue(os.path.join(d, "x.db"))
q.enqueue("noop")  # warm: schema
mode = sys.argv[2]
if mode == "many":
    for _ in range(5):
        q.enqueue_many([("noop", None)] * 1000)
elif mode == "one":
    for _ in range(2000):
        q.enqueue("noop")
