"""The commands that the README and docs/ give run programs that exist, with flags they define,
and the files they name exist.

Every `python -m sparse_scaling...` and `python main.py` command in a code block or span of
README.md and docs/**/*.md is parsed by the flags its program defines (absl's parser: unknown
flags, bad enum values and malformed numbers fail), and every `--gin_file` under
gin_configs/ that such a command names must exist. A doc that keeps a command from before a
flag was renamed fails here. Every file a span names (`layers/sparse_ff.py`, `lm.gin`,
`results/table1.md`, `trax/layers/research/sparsity.py`) must exist too, except the files that
runs write, and so must every name a span gives as one of the package's modules and an
attribute (`decoding.compiler_options`, `sparse_ff.CPU_CHUNK_BYTES`), and every link of a doc
to one of its own headings (`[...](#the-fused-blocks)`, the contents of docs/decoding_gpu.md)
must reach one.
"""

import functools
import glob
import importlib
import os
import re
import shlex

import trax

from tests.utils import ROOT
from tests.utils import flag_error

FENCE = re.compile(r'```[^\n]*\n(.*?)```', re.S)
SPAN = re.compile(r'`([^`]+)`')
COMMAND = re.compile(r'(?:^|\s)\S*python[\d.]*\s+'
                     r'(?:-m\s+(sparse_scaling(?:\.[\w.]*\w)?)|(main\.py))(?=\s|$)(.*)')
ELLIPSIS = ('...', '…')
GIN_DIRS = ('tiny/', 'paper/', 'models/', 'runs/', 'reproduce/')
FILE = re.compile(r'^[\w.\-/]+\.(?:py|gin|md|json|png|ipynb|sh|toml|txt)$')
# Where a path in a span may be relative to, besides the doc's own folder.
FILE_ROOTS = ('', 'sparse_scaling', 'docs', 'docs/results', 'gin_configs', 'tests')
RUN_OUTPUTS = ('config.gin', 'run.json', 'manifest.json')   # what a run writes in its folder
ATTRIBUTE = re.compile(r'^([a-z_0-9]+)\.([A-Za-z_]\w*)(?:\(.*\))?$')   # `module.name(...)`
# Names the docs give as removed code (docs/decoding_gpu.md: "not kept", "Removed: ..."), and a
# file whose name looks like one.
NOT_ATTRIBUTES = ('sparse_ff_kernel.ATOMIC', 'sparse_ff_kernel.SUM_KERNEL', 'decoding.packed',
                  'vocab.model')


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


def named_files(text):
  """The file names of Markdown `text`'s spans, less those that runs write."""
  return [name for name in SPAN.findall(FENCE.sub('', text))
          if FILE.match(name) and os.path.basename(name) not in RUN_OUTPUTS
          and 'NNNN' not in name]


@functools.lru_cache(maxsize=None)
def _file_names():
  """The names of the repository's own files (not .venv's or a run's)."""
  folders = ('sparse_scaling', 'gin_configs', 'tests', 'docs', 'notebooks', '.ci')
  paths = [path for folder in folders
           for path in glob.glob(os.path.join(ROOT, folder, '**', '*'), recursive=True)]
  return {os.path.basename(path) for path in paths + glob.glob(os.path.join(ROOT, '*'))}


def exists(name, doc):
  """Whether `name`, from the doc at path `doc`, names a file: from the repository's root or
  one of FILE_ROOTS, the doc's folder, trax's package, or by its name alone (`lm.gin`)."""
  places = [os.path.join(ROOT, root, name) for root in FILE_ROOTS]
  places += [os.path.join(os.path.dirname(doc), name),
             os.path.join(os.path.dirname(os.path.dirname(trax.__file__)), name)]
  return (any(os.path.exists(place) for place in places)
          or '/' not in name and name in _file_names())


def test_documented_files_exist():
  missing, seen = [], 0
  for doc in doc_files():
    with open(doc, encoding='utf-8') as f:
      names = named_files(f.read())
    seen += len(names)
    missing += [f'{os.path.relpath(doc, ROOT)}: `{name}`' for name in names
                if not exists(name, doc)]
  assert seen > 300, seen
  assert not missing, '\n'.join(missing)


def test_the_check_finds_a_file_that_is_gone():
  readme = os.path.join(ROOT, 'README.md')
  names = named_files('`layers/no_such_layer.py`, `layers/sparse_ff.py`, `lm.gin`, '
                      '`docs/results/table1.md`, `trax/layers/research/sparsity.py` and a '
                      "run's `config.gin`")
  assert [name for name in names if not exists(name, readme)] == ['layers/no_such_layer.py']


HEADING = re.compile(r'^#{1,6} (.+?)\s*$', re.M)
HEADING_LINK = re.compile(r'\]\(#([^)\s]+)\)')   # [text](#id): a heading of the same doc


def missing_headings(text):
  """The ids that Markdown `text` links to within itself (`[...](#id)`) and no heading of it
  has: a heading's id as GitHub makes it (lower case, punctuation but - and _ dropped,
  spaces as -)."""
  ids = {re.sub(r'[^\w\- ]', '', heading.lower()).replace(' ', '-')
         for heading in HEADING.findall(FENCE.sub('', text))}
  return [link for link in HEADING_LINK.findall(text) if link not in ids]


def test_links_within_a_doc_reach_its_headings():
  missing, seen = [], 0
  for doc in doc_files():
    with open(doc, encoding='utf-8') as f:
      text = f.read()
    seen += len(HEADING_LINK.findall(text))
    missing += [f'{os.path.relpath(doc, ROOT)}: #{link}' for link in missing_headings(text)]
  assert seen > 30, seen
  assert not missing, '\n'.join(missing)


def test_the_check_finds_a_link_to_a_heading_that_is_gone():
  text = ("- [The fused blocks](#the-fused-blocks)\n- [Gone](#gone)\n"
          "- [Attention's own kernel at 17B](#attentions-own-kernel-at-17b)\n\n"
          "```bash\n# a comment, not a heading\n```\n"
          "## The fused blocks\n\n### Attention's own kernel at 17B\n")
  assert missing_headings(text) == ['gone']
  assert missing_headings(text.replace('## The fused blocks', 'The fused blocks')) == [
      'the-fused-blocks', 'gone']


def package_modules():
  """The package's modules by their last name: 'sparse_ff' -> 'sparse_scaling.layers.sparse_ff'."""
  paths = glob.glob(os.path.join(ROOT, 'sparse_scaling', '*.py'))
  paths += glob.glob(os.path.join(ROOT, 'sparse_scaling', '*', '*.py'))
  modules = {}
  for path in sorted(paths):
    parts = os.path.relpath(path, ROOT)[:-len('.py')].split(os.sep)
    if parts[-1] not in ('__init__', '__main__'):
      modules.setdefault(parts[-1], '.'.join(parts))
  return modules


def attribute_names(text, modules):
  """(module, attribute) of each span of Markdown `text` that names one of `modules` (by last
  name) and an attribute of it, less NOT_ATTRIBUTES."""
  names = []
  for span in SPAN.findall(FENCE.sub('', text)):
    match = ATTRIBUTE.match(span)
    if (match and match.group(1) in modules and not FILE.match(span)
        and span not in NOT_ATTRIBUTES):
      names.append((modules[match.group(1)], match.group(2)))
  return names


def test_documented_module_attributes_exist():
  modules, missing, seen = package_modules(), [], 0
  for doc in doc_files():
    with open(doc, encoding='utf-8') as f:
      names = attribute_names(f.read(), modules)
    seen += len(names)
    missing += [f'{os.path.relpath(doc, ROOT)}: `{module}.{name}`' for module, name in names
                if not hasattr(importlib.import_module(module), name)]
  assert seen > 40, seen
  assert not missing, '\n'.join(missing)


def test_the_check_finds_a_name_that_is_gone():
  names = attribute_names('`decoding.compiler_options(weights)`, `sparse_ff.NO_SUCH_NAME`, '
                          '`table1.md`, `numpy.sum` and `decoding.packed`', package_modules())
  assert names == [('sparse_scaling.decoding', 'compiler_options'),
                   ('sparse_scaling.layers.sparse_ff', 'NO_SUCH_NAME')]
  assert [hasattr(importlib.import_module(module), name) for module, name in names] == [
      True, False]
