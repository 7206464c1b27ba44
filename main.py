"""sparse_scaling's command line: train, evaluate and decode gin-configured models.

  python main.py --gin_file=tiny/lm.gin --output_dir=runs/tiny_lm [--mode=train]
  python main.py --gin_file=tiny/lm.gin --output_dir=runs/tiny_lm --mode=eval
  python main.py --gin_file=tiny/lm.gin --output_dir=runs/tiny_lm --mode=decode \
      --prompt='Romeo.'

A --gin_file is a path or a path under gin_configs/; --gin_param adds bindings (later ones
win). Gin names follow trax's trainer (`train.steps`, `train.eval_frequency`,
`train.optimizer`, ...) and the models' own (`ScalingTransformerLM.d_model`, ...). Training
resumes from the checkpoint in --output_dir; SIGTERM or Ctrl-C stops it after the step in
flight, with a checkpoint, and exit status 0 (README, "Reliability").

Modes: train (then print a sample if the config binds `sample.vocab`); eval (log-perplexity
and accuracy of the checkpoint on `train.eval_steps` validation batches); decode (continue
--prompt with an LM, or summarize it with an encoder-decoder; --max_new_tokens,
--temperature, --top_k, --top_p and --seed choose how); vocab (train or load the
SentencePiece vocabulary of the config).

Several hosts (docs/distributed.md): run the same command in every process, with
--coordinator_address=HOST:PORT --num_processes=P --process_id=I, or with --distributed
under a launcher JAX reads itself (Slurm, Open MPI, a Cloud TPU pod slice). The global batch
is split over all devices of all processes; process 0 writes the checkpoint, TensorBoard files
and config.gin into --output_dir, which every process must see.
"""

import os
import re
import sys
import warnings

from absl import app
from absl import flags
from absl import logging

# First: the package's setup (versions checked, trax imported quietly, the JAX shims).
from sparse_scaling import compat  # pylint: disable=g-bad-import-order
compat.apply()
import jax  # pylint: disable=g-bad-import-order,g-import-not-at-top
from trax.layers import base  # pylint: disable=g-bad-import-order,g-import-not-at-top

from sparse_scaling import checkpoints  # pylint: disable=g-import-not-at-top
from sparse_scaling import configs  # pylint: disable=g-import-not-at-top
from sparse_scaling import data  # pylint: disable=unused-import  (gin registrations)
from sparse_scaling import decoding
from sparse_scaling import models  # pylint: disable=unused-import  (gin registrations)
from sparse_scaling import parallel
from sparse_scaling import runtime
from sparse_scaling import training

MODES = ('train', 'eval', 'decode', 'vocab')

_GIN_FILE = flags.DEFINE_multi_string('gin_file', [], 'Gin config files; later ones win.')
_GIN_PARAM = flags.DEFINE_multi_string('gin_param', [], "Gin bindings, e.g. 'train.steps=10'.")
_OUTPUT_DIR = flags.DEFINE_string('output_dir', None, 'Checkpoint, metrics and config.gin.')
_MODE = flags.DEFINE_enum('mode', 'train', MODES, 'What to do.')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'Data directory (gin macro DATA_DIR).')
_N_DEVICES = flags.DEFINE_integer('n_devices', None, 'Devices for data-parallel training.',
                                  lower_bound=1)
_SEED = flags.DEFINE_integer('seed', None, 'Random seed (train.random_seed, sample.seed).')
_PROMPT = flags.DEFINE_string('prompt', None, 'decode: text to continue or to summarize.')
_MAX_NEW_TOKENS = flags.DEFINE_integer('max_new_tokens', None, 'decode: tokens to generate.')
_TEMPERATURE = flags.DEFINE_float('temperature', None, 'decode: 0 is greedy, else sampled.')
_TOP_K = flags.DEFINE_integer('top_k', None, 'decode: sample among the k most likely tokens.')
_TOP_P = flags.DEFINE_float('top_p', None, 'decode: nucleus sampling, in (0, 1].')
_ALLOW_CPU = flags.DEFINE_bool('allow_cpu', False,
                               'Run on the CPU although a GPU or TPU is attached.')
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    'coordinator_address', None, 'Multi-process run: HOST:PORT of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Multi-process run: processes.',
                                      lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, 'Multi-process run: this process, 0 to --num_processes - 1.',
    lower_bound=0)
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Join a multi-process run; JAX reads what the three flags above '
    'leave out from the launcher (Slurm, Open MPI, a Cloud TPU pod slice).')
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    'heartbeat_timeout', 100, 'Multi-process run: seconds the others wait for a silent '
    'process before they stop with an error.', lower_bound=1)


def _bindings():
  """--gin_param plus the bindings of the other flags."""
  bindings = list(_GIN_PARAM.value)
  if _DATA_DIR.value is not None:
    bindings.append(f'DATA_DIR = {_DATA_DIR.value!r}')
  if _N_DEVICES.value is not None:
    bindings.append(f'train.n_devices = {_N_DEVICES.value}')
  if _SEED.value is not None:
    bindings.append(f'train.random_seed = {_SEED.value}')
  if _PROMPT.value is not None:
    bindings.append(f'sample.prompt = {_PROMPT.value!r}')
  for flag in (_MAX_NEW_TOKENS, _TEMPERATURE, _TOP_K, _TOP_P):
    if flag.value is not None:
      bindings.append(f'sample.{flag.name} = {flag.value!r}')
  if _SEED.value is not None:
    bindings.append(f'sample.seed = {_SEED.value}')
  return bindings


def run(mode, output_dir):
  """Runs one mode on the parsed gin config."""
  if mode == 'vocab':
    vocab = configs.configured_vocab()
    print(f'vocabulary of {vocab.get_piece_size()} pieces ready')
    return
  if mode == 'decode':
    if not configs.has_binding('sample.vocab'):
      raise ValueError('--mode=decode: the config binds no vocabulary (sample.vocab) to '
                       'write its tokens as text')
    weights = checkpoints.read_weights(output_dir, configs.configured_model())
  else:
    loop = training.train(output_dir, evaluate_only=mode == 'eval')
    if loop.stopped_by:  # SIGTERM or SIGINT: checkpointed; exit 0 at once
      return
    weights = loop.model.weights
  sample = mode == 'decode' or (mode == 'train' and configs.has_binding('sample.vocab'))
  if sample and jax.process_index() == 0:
    print(decoding.sample(configs.configured_model(), weights), flush=True)


def _one_line(error):
  """The message of `error` on one line; for trax's LayerError, the error it wraps."""
  message = str(error)
  if isinstance(error, base.LayerError):  # 'Exception passing through layer ...' + trace
    causes = re.findall(r'^\w+(?:Error|Exception): (.*)$', message, flags=re.MULTILINE)
    message = causes[-1] if causes else message
  # gin adds where the error passed ('In call to configurable ...', 'In file ...'): dropped.
  message = re.split(r'\s+In (?:call to configurable|file) ', message)[0]
  return ' '.join(message.split())  # gin's and trax's messages span several lines


def main(argv):
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments: {argv[1:]}')
  if not _OUTPUT_DIR.value:
    sys.exit('error: --output_dir is required')
  logging.set_verbosity(logging.WARNING)  # the Loop prints its metrics itself
  warnings.filterwarnings('ignore', 'GzipFile was opened for writing')  # trax's checkpoints
  distributed = _DISTRIBUTED.value or any(
      flag.value is not None for flag in (_COORDINATOR_ADDRESS, _NUM_PROCESSES, _PROCESS_ID))
  if distributed:  # before anything touches a device
    try:
      parallel.initialize(_COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                          heartbeat_timeout_seconds=_HEARTBEAT_TIMEOUT.value)
    except (ValueError, TypeError, RuntimeError) as e:
      sys.exit(f'error: cannot join the multi-process run: {_one_line(e)} (give '
               '--coordinator_address, --num_processes and --process_id, or start it with a '
               'launcher JAX reads: Slurm, Open MPI, a Cloud TPU pod slice)')
  errors = (OSError, ValueError, KeyError, FloatingPointError, base.LayerError)
  if distributed:  # a collective with a process that is gone fails so, or as a ValueError
    errors += (jax.errors.JaxRuntimeError,)
  try:
    runtime.check_accelerator(allow_cpu=_ALLOW_CPU.value)
  except RuntimeError as e:
    sys.exit(f'error: {e}')
  print(runtime.describe(), flush=True)
  try:
    configs.parse(_GIN_FILE.value, _bindings())
    if _MODE.value == 'train':
      os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
    run(_MODE.value, _OUTPUT_DIR.value)
  except errors as e:
    if not distributed:
      sys.exit(f'error: {_one_line(e)}')
    # A process of the run that failed or was killed breaks the collectives of the others
    # (on CPU at once; on GPUs and TPUs JAX's heartbeat stops them). Exit now: JAX's
    # shutdown would wait for the processes that are gone.
    message = _one_line(e)
    if isinstance(e, jax.errors.JaxRuntimeError) or 'Gloo' in message:
      message += ' (a collective failed: did another process of the run stop? See its output)'
    print(f'error: process {jax.process_index()} of {jax.process_count()}: {message}',
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)  # pylint: disable=protected-access


if __name__ == '__main__':
  app.run(main)
