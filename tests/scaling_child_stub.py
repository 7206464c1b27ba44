"""Stands in for a child of sparse_scaling.bench.scaling in tests/test_bench_scaling.py.

Prints what a child prints (records of two steps, a second apart), without flushing: only the
child's unbuffered output (`python -u`) gets them to the parent before it exits. Given a time
budget (--child_seconds), it hangs after the first step, as a run stuck in compilation would.
"""

import json
import sys
import time

RECORD = 'RECORD '  # sparse_scaling.bench.scaling.RECORD

if __name__ == '__main__':
  batch = int(next(a for a in sys.argv if a.startswith('--child_batch=')).split('=')[1])
  print(RECORD + json.dumps(dict(devices=['cpu:0'])))
  print(RECORD + json.dumps(dict(step=1, seconds=0.5, loss=5.0 + batch)))
  if any(a.startswith('--child_seconds=') for a in sys.argv):
    time.sleep(600)
  time.sleep(1.5)
  print('a line of the child that is not a record')
  print(RECORD + json.dumps(dict(step=2, seconds=0.25, loss=4.0 + batch)))
