"""Every program refuses an out-of-range flag when it parses its flags, in one line naming it.

The flags are parsed in this process, as each program defines them (`tests/utils.flag_error`);
a few programs are also run, for their exit status and their one line.
"""

import subprocess
import sys

import jax
import pytest

from tests.utils import flag_error

# (program, arguments, what the one line must say)
REFUSED = [
    ('sparse_scaling.bench.table1', ['--shapes', '800m,900m'],
     "each shape must be one of ['800m', '17b']"),
    ('sparse_scaling.bench.table1', ['--tokens', '0'], 'flag --tokens=0: 0 is not a positive'),
    ('sparse_scaling.bench.table1', ['--prompt', '0'], 'flag --prompt=0'),
    ('sparse_scaling.bench.ff_decode', ['--shapes', '1024x4096'], 'each shape must be one of'),
    ('sparse_scaling.bench.train_step', ['--shapes', 'huge'],
     "each shape must be one of ['tiny', '800m', 'gpu']"),
    ('sparse_scaling.bench.train_step', ['--dropout', '1'],
     'flag --dropout=1.0: must be in [0, 1)'),
    ('sparse_scaling.bench.train_step', ['--rounds', '0'], 'flag --rounds=0'),
    ('sparse_scaling.bench.scaling', ['--shapes', '17b'],
     "each shape must be one of ['800m', 'tiny']"),
    ('sparse_scaling.bench.scaling', ['--per_device_batch', '0'], 'flag --per_device_batch=0'),
    ('sparse_scaling.bench.decode_profile', ['--shapes', '900m'], 'each shape must be one of'),
    ('sparse_scaling.bench.decode_profile', ['--steps', '0'], 'flag --steps=0'),
    ('sparse_scaling.bench.block_profile', ['--min_share', '2'],
     'flag --min_share=2: 2.0 is not a number in the range [0, 1]'),
    ('sparse_scaling.bench.kernel_chain', ['--columns', '192'],
     'flag --columns=192: --columns must be a multiple of 128'),
    ('sparse_scaling.bench.bandwidth', ['--rounds', '0'], 'flag --rounds=0'),
    ('sparse_scaling.bench.memory', ['--memory_limit_gb', '0'],
     'flag --memory_limit_gb=0.0: must be > 0'),
    ('sparse_scaling.reproduce.quality', ['--seeds', '0,x'],
     "flag --seeds=['0', 'x']: give seeds as integers >= 0"),
    ('sparse_scaling.reproduce.quality', ['--steps', '0'], 'flag --steps=0'),
    ('sparse_scaling.reproduce.summarization', ['--steps', '-1'], 'flag --steps=-1'),
    ('sparse_scaling.reproduce.summarization', ['--decode_batch', '0'], 'flag --decode_batch=0'),
    ('sparse_scaling.export', ['--length', '0'], 'flag --length=0'),
    ('sparse_scaling.data.make_token_files', ['--output_dir', 'x', '--vocab_size', '0'],
     'flag --vocab_size=0'),
    ('main.py', ['--n_devices', '0'], 'flag --n_devices=0'),   # trained on every device
    ('main.py', ['--process_id', '-1'], 'flag --process_id=-1'),
]

# The same programs take values inside the rules.
ACCEPTED = [
    ('sparse_scaling.bench.table1', ['--shapes', '17b', '--tokens', '1', '--prompt', '1']),
    ('sparse_scaling.bench.ff_decode', ['--shapes', '1024x4096x32,9216x65536x256xbfloat16']),
    ('sparse_scaling.bench.train_step', ['--shapes', 'tiny,gpu', '--dropout', '0']),
    ('sparse_scaling.bench.scaling', ['--shapes', 'tiny']),
    ('sparse_scaling.bench.decode_profile', ['--shapes', '800m,17b']),
    ('sparse_scaling.bench.block_profile', ['--min_share', '0']),
    ('sparse_scaling.bench.kernel_chain', ['--columns', '256', '--forms', 'mosaic8']),
    ('sparse_scaling.bench.bandwidth', ['--shares', '4096:4:1024:8', '--rounds', '1']),
    ('sparse_scaling.reproduce.quality', ['--seeds', '0,1,12']),
    ('main.py', ['--n_devices', '1', '--num_processes', '2', '--process_id', '0']),
]


def _case(program, args, *_):
  """A case's id: the program's last name and its first flag, e.g. 'table1--tokens'."""
  return program.removesuffix('.py').rsplit('.', 1)[-1] + args[0]


@pytest.mark.parametrize('program, args, said', REFUSED, ids=[_case(*case) for case in REFUSED])
def test_out_of_range_flags_are_refused(program, args, said):
  error = flag_error(program, args)
  assert error is not None and said in error, error


@pytest.mark.parametrize('program, args', ACCEPTED, ids=[_case(*case) for case in ACCEPTED])
def test_flags_inside_the_rules_parse(program, args):
  assert flag_error(program, args) is None


def test_a_program_stops_with_one_line_and_a_failing_status():
  proc = subprocess.run([sys.executable, '-m', 'sparse_scaling.bench.train_step', '--shapes',
                         'tiny,huge'], capture_output=True, text=True)
  assert proc.returncode != 0
  errors = [line for line in proc.stderr.splitlines() if 'Flags parsing error' in line]
  assert errors == ["FATAL Flags parsing error: flag --shapes=['tiny', 'huge']: each shape must "
                    "be one of ['tiny', '800m', 'gpu']"], proc.stderr[-2000:]


@pytest.mark.parametrize('program, args, said', [
    (['-m', 'sparse_scaling.bench.decode_shares'], ['--alternate', '--measure', 'kernels'],
     'error: --alternate: times generations (--measure token) or calls of a block '
     '(--measure call), not --measure kernels'),
    (['main.py'], ['--gin_file', 'tiny/lm.gin'], 'error: --output_dir is required'),
    pytest.param(['-m', 'sparse_scaling.bench.kernel_chain'], [],
                 "error: kernel_chain: times kernels on a GPU (here: cpu); the tests run its "
                 'forms on a CPU', marks=pytest.mark.skipif(
                     jax.default_backend() != 'cpu', reason='a CPU refuses it'))],
    ids=['decode_shares', 'main', 'kernel_chain'])
def test_flags_that_do_not_go_together_stop_a_program_with_one_line(program, args, said):
  """A usage error that a program's main finds is its one line on stderr, not absl's page of
  help before it (`bench.common.run`; main.py exits so itself)."""
  proc = subprocess.run([sys.executable, *program, *args], capture_output=True, text=True)
  assert proc.returncode == 1
  assert proc.stderr.splitlines() == [said], proc.stderr[-2000:]
  assert proc.stdout == ''
