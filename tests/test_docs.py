"""The commands that the README and docs/ give run programs that exist, with flags they define.

Every `python -m sparse_scaling...` and `python main.py` command in a code block or span of
README.md and docs/**/*.md is parsed by the flags its program defines (absl's parser: unknown
flags, bad enum values and malformed numbers fail), and every `--gin_file` under
gin_configs/ that such a command names must exist. A doc that keeps a command from before a
flag was renamed fails here.
"""

import glob
import os
import re
import shlex

from tests.utils import ROOT
from tests.utils import flag_error

FENCE = re.compile(r'```[^\n]*\n(.*?)```', re.S)
SPAN = re.compile(r'`([^`]+)`')
COMMAND = re.compile(r'(?:^|\s)\S*python[\d.]*\s+'
                     r'(?:-m\s+(sparse_scaling(?:\.[\w.]*\w)?)|(main\.py))(?=\s|$)(.*)')
ELLIPSIS = ('...', '…')
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
