"""notebooks/scaling_transformers.ipynb runs top to bottom at tiny size on CPU, and is
committed with its outputs cleared."""

import pathlib

import pytest

# The dev extra; a machine without it (a bare GPU runtime) skips these tests.
nbformat = pytest.importorskip('nbformat', reason='nbformat (the dev extra) is not installed')
NotebookClient = pytest.importorskip(
    'nbclient', reason='nbclient (the dev extra) is not installed').NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / 'notebooks' / 'scaling_transformers.ipynb'
CELL_TIMEOUT_S = 600


def _code_cells(notebook):
  return [cell for cell in notebook.cells if cell.cell_type == 'code']


def test_committed_notebook_has_its_outputs_cleared():
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(notebook)
  for cell in _code_cells(notebook):
    assert not cell.outputs and cell.execution_count is None, cell.source[:80]


def test_notebook_runs_top_to_bottom_at_tiny_size_on_cpu(tmp_path, monkeypatch):
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  tagged = [i for i, cell in enumerate(notebook.cells)
            if 'parameters' in cell.metadata.get('tags', [])]
  assert len(tagged) == 1, 'one cell tagged `parameters`'
  # As papermill does: a cell after the parameters cell overrides them. Two copy-task steps
  # run its training, decoding, accuracy and curve (an evaluation at step 1); the copy task
  # learning to copy is test_terraformer.py's (-m slow). Four LM steps (evaluations at steps
  # 1, 2 and 4) run the LM's training, sampling, decoding and curves; a loss that falls with
  # training is test_compat.py's.
  notebook.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(
      f'TINY = True\nWORK_DIR = {str(tmp_path / "runs")!r}\nCOPY_STEPS = 2\nLM_STEPS = 4',
      metadata={'tags': ['injected-parameters']}))
  copy = tmp_path / NOTEBOOK.name
  nbformat.write(notebook, copy)
  notebook = nbformat.read(copy, as_version=4)
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  # From the repository root, as a user opens it; raises CellExecutionError on a failing cell.
  NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name='python3',
                 resources={'metadata': {'path': str(ROOT)}}).execute()
  outputs = [output for cell in _code_cells(notebook) for output in cell.outputs]
  assert not [output for output in outputs if output.output_type == 'error']
  text = ''.join(output.get('text', '') for output in outputs)
  assert 'CPU: ' in text and 'token accuracy' in text and '--- sample' in text
  assert any('image/png' in output.get('data', {}) for output in outputs)  # the plots
