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
db = os.path.join(d, "x.db")
q = worker.Queue(db)
q.enqueue_many([("noop", None)] * 3000)
if sys.argv[2] == "run":
    worker.Worker(db, concurrency=int(sys.argv[3]), burst=True, cron=False).run()
