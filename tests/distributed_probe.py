"""A `train.on_step` for tests/test_distributed.py: each process reports what it trained.

Bound by tests/distributed_probe.gin, so that the test runs main.py as users do.
"""

import json
import os

import gin
import jax
import numpy as np

from sparse_scaling import parallel


@gin.configurable(module='tests')
def report_step(loop, loss, seconds, report_dir=gin.REQUIRED, weights_at=gin.REQUIRED):
  """At step `weights_at`, saves the weights the devices hold to report_dir/weights<process>.npz;
  then appends {step, loss} to report_dir/steps<process>.jsonl."""
  del seconds
  process = jax.process_index()
  if loop.step == weights_at:
    np.savez(os.path.join(report_dir, f'weights{process}.npz'),
             *jax.tree.leaves(parallel.to_host(loop.device_weights)))
  with open(os.path.join(report_dir, f'steps{process}.jsonl'), 'a') as f:
    f.write(json.dumps(dict(step=loop.step, loss=loss)) + '\n')
