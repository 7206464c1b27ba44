"""The commands that the README and docs/ give run programs that exist, with flags they define.

Every `python -m sparse_scaling...` and `python main.py` command in a code block or span of
README.md and docs/**/*.md is parsed by the flags its program defines (absl's parser: unknown
flags, bad enum values and malformed numbers fail), and every `--gin_file` under
gin_configs/ that such a command names must exist. A doc that keeps a command from before a
flag was renamed fails here.
"""

import contextlib
import functools
import glob
import importlib
import importlib.util
import os
import re
import shlex

from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FENCE = re.compile(r'```[^\n]*\n(.*?)```', re.S)
SPAN = re.compile(r'`([^`]+)`')
COMMAND = re.compile(r'(?:^|\s)\S*python[\d.]*\s+'
                     r'(?:-m\s+(sparse_scaling(?:\.[\w.]*\w)?)|(main\.py))(?=\s|$)(.*)')
ELLIPSIS = ('...', '…')
APP_FLAGS = ('help', 'helpshort', 'helpfull', 'helpxml', 'only_check_args')
GIN_DIRS = ('tiny/', 'paper/', 'models/', 'runs/', 'reproduce/')


def doc_files():
  return [os.path.join(ROOT, 'README.md')] + sorted(
      glob.glob(os.path.join(ROOT, 'docs', '**', '*.md'), recursive=True))


def commands(text):
  """(program, argument list) of each command in Markdown `text`: fenced blocks line by line
  (a trailing backslash continues a line), spans whole; `...` (an elided part) is dropped."""
  codes = [line for block in FENCE.findall(text)
           for line in re.sub(r'\\\n\s*', ' ', block).splitlines()]
  codes += [' '.join(span.split()) for span in SPAN.findall(FENCE.sub('', text))]
  for code in codes:
    for part in re.split(r'&&|;|\|', code.split(' # ')[0]):
      match = COMMAND.search(part)
      if match:
        rest = match.group(3)
        try:
          args = shlex.split(rest)
        except ValueError:   # the command inside a quoted string: `--command='... main.py ...'`
          args = shlex.split(rest.rstrip('\'" '))
        yield match.group(1) or 'main.py', [a for a in args if a not in ELLIPSIS]


@contextlib.contextmanager
def _defining_into(flag_values):
  """absl's DEFINE_* functions define into `flag_values` instead of the process's FLAGS."""
  saved = {name: getattr(flags, name) for name in dir(flags) if name.startswith('DEFINE')}
  try:
    for name, define in saved.items():
      setattr(flags, name, functools.partial(define, flag_values=flag_values))
    yield
  finally:
    for name, define in saved.items():
      setattr(flags, name, define)


@functools.lru_cache(maxsize=None)
def program_flags(program):
  """A FlagValues with the flags `program` defines: a module's `define_flags` or
  `_define_flags`, main.py's when it is loaded."""
  flag_values = flags.FlagValues()
  with _defining_into(flag_values):
    if program in ('main.py', 'sparse_scaling'):
      spec = importlib.util.spec_from_file_location('_docs_main', os.path.join(ROOT, 'main.py'))
      spec.loader.exec_module(importlib.util.module_from_spec(spec))
    else:
      module = importlib.import_module(program)
      define = getattr(module, 'define_flags', None) or getattr(module, '_define_flags')
      define()
  return flag_values


def flag_error(program, args):
  """Why `program args` would not parse, or None (absl.app's --help and the like aside)."""
  flag_values = program_flags(program)
  flag_values.unparse_flags()
  args = [a for a in args if a.lstrip('-').split('=')[0] not in APP_FLAGS]
  try:
    flag_values(['program'] + args)
  except Exception as error:  # pylint: disable=broad-except
    return str(error).splitlines()[0]
  return None


def test_documented_commands_parse():
  failures, seen = [], 0
  for path in doc_files():
    with open(path, encoding='utf-8') as f:
      for program, args in commands(f.read()):
        seen += 1
        error = flag_error(program, args)
        if error:
          failures.append(f'{os.path.relpath(path, ROOT)}: {program} {shlex.join(args)}: {error}')
  assert seen > 100, seen   # the extraction found the docs' commands
  assert not failures, '\n'.join(failures)


def test_documented_gin_files_exist():
  missing, seen = [], 0
  for path in doc_files():
    with open(path, encoding='utf-8') as f:
      for program, args in commands(f.read()):
        for arg in args:
          name = arg.split('=', 1)[1] if arg.startswith('--gin_file=') else None
          if name and name.startswith(GIN_DIRS):
            seen += 1
            if not os.path.exists(os.path.join(ROOT, 'gin_configs', name)):
              missing.append(f'{os.path.relpath(path, ROOT)}: {program} --gin_file={name}')
  assert seen > 10, seen
  assert not missing, '\n'.join(missing)


def test_the_check_finds_a_stale_command():
  text = """Run
```bash
python -m sparse_scaling.bench.table1 --shapes 800m \\
    --copies three   # a comment
```
and `python -m sparse_scaling.bench.table1 --no_such_flag`, `python main.py --mode=fly`,
`python -m sparse_scaling --gin_file=tiny/lm.gin --steps=3`,
`python -m sparse_scaling.bench.<name>` (a placeholder, no command),
`python -m sparse_scaling.bench.table1 --shapes 800m ... --program` (elided, fine).
"""
  found = list(commands(text))
  assert [program for program, _ in found] == ['sparse_scaling.bench.table1'] * 2 + [
      'main.py', 'sparse_scaling', 'sparse_scaling.bench.table1']
  assert found[0][1] == ['--shapes', '800m', '--copies', 'three']
  errors = [flag_error(program, args) for program, args in found]
  assert 'copies' in errors[0]
  assert 'no_such_flag' in errors[1]
  assert 'mode' in errors[2]
  assert 'steps' in errors[3]   # `python -m sparse_scaling` is main.py, which has no --steps
  assert errors[4] is None
