"""What the benchmarks and the reproductions share, so that each program is its measurement and
its table: where results go, Markdown tables, JSON files, figures, child processes, model
dimensions from gin files, and how a program defines its flags and starts.

  if __name__ == '__main__':
    common.run(main, define_flags)   # compat.apply(), the flags, absl's app.run(main)
"""

import contextlib
import functools
import json
import pathlib
import shlex
import subprocess
import sys
import threading

from absl import app
from absl import flags
import gin

from sparse_scaling import compat
from sparse_scaling import configs

ROOT = pathlib.Path(__file__).resolve().parents[2]
RESULTS_DIR = ROOT / 'docs' / 'results'  # Read when a program writes: tests may move it.


# --- programs ------------------------------------------------------------------------------

def define_flags(json_output=False, shapes=(), writes=None):
  """Defines the flags that several programs share; a program calls this in its own
  `define_flags`, which runs only when it is the program (others have namesakes).

  Args:
    json_output: --json: print one JSON list of rows last.
    shapes: the program's shape names: --shapes measures some of them, and refuses others
      when the flags are parsed.
    writes: --write (default true), e.g. 'docs/results/memory.md': what the program writes.
  """
  if json_output:
    flags.DEFINE_bool('json', False, 'Print one JSON list of rows last.')
  if shapes:
    names = list(shapes)
    flags.DEFINE_list('shapes', None, f"Shapes to measure, of {names} (default: the program's).")
    flags.register_validator('shapes', lambda values: values is None or set(values) <= set(names),
                             message=f'each shape must be one of {names}')
  if writes:
    flags.DEFINE_bool('write', True, f'Write {writes}.')


def run(main, define_program_flags):
  """Runs a program: the package's setup (`compat.apply`), its flags, then `app.run(main)`.
  A usage error that main raises (`app.UsageError`: flags that parse but do not go together)
  ends the program with status 1 and one line on stderr, 'error: ' and its message, where
  absl would print the program's whole help before it."""
  compat.apply()
  define_program_flags()
  app.run(functools.partial(_usage_in_one_line, main))


def _usage_in_one_line(main, argv):
  try:
    return main(argv)
  except app.UsageError as error:
    sys.exit(f'error: {error}')


# --- tables, JSON and figures ----------------------------------------------------------------

def table_row(cells):
  """One row of a Markdown table: '| a | b |'."""
  return '| ' + ' | '.join(str(cell) for cell in cells) + ' |'


def table_header(columns):
  """A Markdown table's header and rule, as two lines of text."""
  return table_row(columns) + '\n|' + '---|' * len(columns)


def table(columns, rows):
  """A Markdown table of `rows` (lists of cells) under `columns`, as text."""
  return '\n'.join([table_header(columns), *map(table_row, rows)])


def command_line(module, variables=()):
  """This program's command line as it was run, `python -m module` and its arguments, after
  the environment variables `variables` ('NAME=value'), for a results file's header."""
  return ' '.join([*variables, shlex.join(['python', '-m', module, *sys.argv[1:]])])


def write_json(path, data):
  """Writes `data` to `path` as indented JSON, creating its directory."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(data, indent=1) + '\n')


def merge_json(path, rows, key):
  """Writes `rows` into the JSON list of rows at `path`, in place of the saved rows that have
  one of their values of `key` (e.g. the shapes measured again; a field's name, or a function
  of a row); returns the whole list."""
  path = pathlib.Path(path)
  key_of = key if callable(key) else (lambda row: row[key])
  replaced = {key_of(row) for row in rows}
  earlier = json.loads(path.read_text()) if path.exists() else []
  merged = [row for row in earlier if key_of(row) not in replaced] + list(rows)
  write_json(path, merged)
  return merged


def pyplot():
  """matplotlib's pyplot on the Agg backend (figures for files, no display), imported on use."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def save_figure(fig, path):
  """Lays out `fig`, saves it to `path` (100 dpi) and closes it."""
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  pyplot().close(fig)


# --- child processes --------------------------------------------------------------------------

def module_command(module, *args):
  """The command that runs `python -m module args` unbuffered, with this interpreter."""
  return [sys.executable, '-u', '-m', module, *args]


def run_child(command, read, env=None, kill_after_s=None):
  """Runs `command` in a child process from the repository root, isolated from this one.

  Its stdout and stderr, merged, are handed to `read` as an iterator of lines while the child
  runs (`read` may echo them as they come). A child still running `kill_after_s` seconds after
  it started is killed.

  Returns:
    (exit status: negative for the signal that ended the child, whether it was killed for
    its time, what `read` returned).
  """
  child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, bufsize=1)
  killed = threading.Event()

  def kill():
    killed.set()
    child.kill()

  killer = None if kill_after_s is None else threading.Timer(kill_after_s, kill)
  with contextlib.ExitStack() as stack:
    if killer:
      killer.start()
      stack.callback(killer.cancel)
    try:
      result = read(line.rstrip('\n') for line in child.stdout)
    finally:
      returncode = child.wait()
  return returncode, killed.is_set(), result


# --- model dimensions ---------------------------------------------------------------------------

def parse_gin(gin_files, bindings=()):
  """Parses `gin_files` (paths under gin_configs/) and `bindings` from a cleared config."""
  gin.clear_config()
  configs.parse(gin_files, bindings)


def macros(names):
  """The parsed config's values of the gin macros `names`, by lowercase name; a macro that
  names another (`FF_SPARSITY = %SPARSE_FF`) gives that one's value."""
  return {name.lower(): resolve(gin.query_parameter('%' + name)) for name in names}


def resolve(value):
  """A queried gin value with macro references followed (`%SPARSE_FF` -> 32)."""
  while isinstance(value, gin.config.ConfigurableReference):
    value = value.scoped_configurable_fn()
  return value
