"""The bandwidth benchmark (`bench/bandwidth.py`): streaming sums' shares side by side with
XLA's product, here in Pallas' interpreter."""

import subprocess
import sys

from absl import app
import pytest

from sparse_scaling.bench import bandwidth
from sparse_scaling.layers import decode_kernels

needs_triton = pytest.mark.skipif(decode_kernels.MISSING is not None,
                                  reason=str(decode_kernels.MISSING))


def test_shares_are_four_powers_of_2():
  assert bandwidth.parse_shares(['4096:4:1024:8', '512:8:4096:4']) == [(4096, 4, 1024, 8),
                                                                      (512, 8, 4096, 4)]
  for spec in ['4096:4:1024', '4096:3:1024:8', 'a:4:1024:8', '4096:4:0:8']:
    with pytest.raises(app.UsageError, match='must be width:rows:programs:warps'):
      bandwidth.parse_shares([spec])


@needs_triton
def test_every_form_is_timed_in_every_round_in_turn():
  rows = []
  measured = bandwidth.measure_shares([(128, 2, 4, 4), (256, 1, 8, 8)], (8, 256), rounds=2,
                                      on_row=rows.append, min_runs=1)
  assert rows == measured
  names = [bandwidth.XLA, bandwidth.share_name(128, 2, 4, 4), bandwidth.share_name(256, 1, 8, 8)]
  assert [(row['round'], row['form']) for row in rows] == [(r, n) for r in (0, 1) for n in names]
  assert all(row['rate'] > 0 for row in rows)


def test_a_share_that_does_not_divide_the_array_is_refused():
  with pytest.raises(ValueError, match=r'--shares: 1024:4:4:4: x has 2048 elements, not a '
                                       r'whole number of 4 rows of 1024'):
    bandwidth.measure_shares([(1024, 4, 4, 4)], (8, 256), rounds=1, on_row=None)


def test_a_bad_share_stops_the_program_in_one_line():
  proc = subprocess.run([sys.executable, '-m', 'sparse_scaling.bench.bandwidth', '--shares',
                         '4096:3:1024:8'], capture_output=True, text=True)
  assert proc.returncode == 1 and proc.stdout == ''
  assert proc.stderr.splitlines() == [
      "error: --shares: '4096:3:1024:8' must be width:rows:programs:warps, each a power of 2, "
      'e.g. 4096:4:1024:8'], proc.stderr[-2000:]
