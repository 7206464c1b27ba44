"""sparse_scaling.runtime: version checks at import, the accelerator check, quiet imports."""

import inspect
import os
import subprocess
import sys
import warnings

import pytest

from sparse_scaling import runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('python, jax_version, message', [
    ((3, 10), '0.10.2', 'Python >= 3.11'),
    ((3, 11), '0.4.30', 'jax >= 0.10.2'),
    ((3, 12), '0.10.1', 'jax >= 0.10.2'),
])
def test_versions_below_the_tested_range_raise_one_line(python, jax_version, message):
  with pytest.raises(ImportError, match=message) as error:
    runtime.check_versions(python, jax_version)
  assert '\n' not in str(error.value) and 'tested' in str(error.value)


@pytest.mark.parametrize('python, jax_version', [((3, 13), '0.10.2'), ((3, 11), '0.13.0')])
def test_versions_above_the_tested_range_warn(python, jax_version):
  with pytest.warns(UserWarning, match='tested on'):
    runtime.check_versions(python, jax_version)


@pytest.mark.parametrize('python, jax_version', [((3, 11), '0.10.2'), ((3, 12), '0.11.2'),
                                                 ((3, 12), '0.11.0'), ((3, 12), '0.12.0.1')])
def test_tested_versions_pass_silently(python, jax_version):
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    runtime.check_versions(python, jax_version)


@pytest.mark.parametrize('version, tested', [('0.10.2', True), ('0.11.0', True), ('0.11.2', True),
                                             ('0.11.9', True), ('0.12.0.1', True),
                                             ('0.12.3', True), ('0.10.1', False),
                                             ('0.4.35', False), ('0.13.0', False)])
def test_tested_jax_is_the_range_the_notebook_keeps(version, tested):
  assert runtime.tested_jax(version) == tested


def test_importing_the_package_with_an_old_jax_fails_before_trax_is_imported():
  code = ('import importlib.metadata as m, sys\n'
          'version = m.version\n'
          "m.version = lambda name: '0.4.30' if name == 'jax' else version(name)\n"
          'try:\n'
          '  import sparse_scaling\n'
          'finally:\n'
          "  print('trax imported:', 'trax' in sys.modules)\n")
  result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1].startswith(
      'ImportError: sparse_scaling needs jax >= 0.10.2'), result.stderr[-2000:]
  assert 'trax imported: False' in result.stdout


@pytest.fixture
def gpu_attached(monkeypatch):
  """A GPU in /dev that JAX does not see (JAX without its CUDA plugin)."""
  import jax  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(runtime, 'accelerator_hardware', lambda: ('gpu', '/dev/nvidia0'))
  monkeypatch.setattr(jax, 'default_backend', lambda: 'cpu')
  monkeypatch.delenv('JAX_PLATFORMS', raising=False)


def test_attached_gpu_that_jax_does_not_see_stops_the_run(gpu_attached):  # pylint: disable=unused-argument
  with pytest.raises(RuntimeError, match=r'GPU is attached \(/dev/nvidia0\).*--allow_cpu') as e:
    runtime.check_accelerator()
  assert '\n' not in str(e.value)


def test_allow_cpu_or_jax_platforms_cpu_runs_on_the_cpu(gpu_attached, monkeypatch):  # pylint: disable=unused-argument
  runtime.check_accelerator(allow_cpu=True)
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  runtime.check_accelerator()


def test_no_accelerator_attached_runs_on_the_cpu(monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(runtime, 'accelerator_hardware', lambda: None)
  monkeypatch.setattr(jax, 'default_backend', lambda: 'cpu')
  monkeypatch.delenv('JAX_PLATFORMS', raising=False)
  runtime.check_accelerator()


@pytest.mark.parametrize('files, expected', [
    ({'/dev/nvidia[0-9]*': ['/dev/nvidia1', '/dev/nvidia0']}, ('gpu', '/dev/nvidia0')),
    ({'/dev/accel[0-9]*': ['/dev/accel0']}, ('tpu', '/dev/accel0')),
    ({'/dev/vfio/[0-9]*': ['/dev/vfio/0']}, ('tpu', '/dev/vfio/0')),
    ({}, None),
])
def test_accelerator_hardware_reads_the_device_files(monkeypatch, files, expected):
  monkeypatch.setattr(runtime.glob, 'glob', lambda pattern: files.get(pattern, []))
  assert runtime.accelerator_hardware() == expected


def test_describe_names_backend_devices_and_versions():
  import jax  # pylint: disable=g-import-not-at-top
  line = runtime.describe()
  assert line.startswith(f'running on {jax.default_backend()}: {jax.device_count()} x '
                         f'{jax.devices()[0].device_kind}')
  assert f'jax {jax.__version__}' in line and 'trax 1.4.1' in line


def test_quiet_imports_drop_the_notices_and_pass_on_the_rest(capfd):
  from gym_notices import notices  # pylint: disable=g-import-not-at-top
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  banner = notices.notices[importlib.metadata.version('gym')]
  with runtime.quiet_imports():
    os.write(2, b'WARNING: All log messages before absl::InitializeLog() is called are '
                b'written to STDERR\n'
                b'I0000 00:00:1.1 1 port.cc:153] oneDNN custom operations are on. You may\n'
                b'I0000 00:00:1.2 1 cudart_stub.cc:31] Could not find cuda drivers on your '
                b'machine, GPU will not be used.\n'
                b'E0000 00:00:1.4 1 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA '
                b'error: Failed call to cuInit: UNKNOWN ERROR (303)\n'
                b'E0000 00:00:1.3 1 something.cc:1] a real error\n')
    print(banner, file=sys.stderr)
    print('a real warning', file=sys.stderr)
  err = capfd.readouterr().err
  assert err.splitlines() == ['E0000 00:00:1.3 1 something.cc:1] a real error',
                              'a real warning']


def test_syntax_warnings_of_trax_sources_are_ignored_and_others_shown():
  source = 'x = 1\nif x is not ():\n  pass\n'  # as trax/supervised/training.py l.1388
  site = os.path.join('site-packages', 'trax', 'supervised', 'training.py')
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    runtime.ignore_trax_syntax_warnings()
    compile(source, site, 'exec')
    assert not caught
    compile(source, os.path.join('site-packages', 'mine', 'training.py'), 'exec')
  assert [w.category for w in caught] == [SyntaxWarning]


def test_tensorflow_is_kept_off_the_gpus(monkeypatch):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  calls = []
  monkeypatch.setattr(tf.config, 'set_visible_devices', lambda *args: calls.append(args))
  runtime.keep_tensorflow_off_gpus()
  assert calls == [([], 'GPU')]

  def initialized(*args):
    raise RuntimeError('Visible devices cannot be modified after being initialized')

  monkeypatch.setattr(tf.config, 'set_visible_devices', initialized)
  runtime.keep_tensorflow_off_gpus()  # someone set TensorFlow up already: left as it is


def _stack():
  return [(info.frame, info.filename, info.lineno, info.function) for info in inspect.stack()]


def test_stack_without_source_lists_the_frames_inspect_does():
  real = inspect.stack
  expected = _stack()
  with runtime.stack_without_source():
    assert inspect.stack is not real
    listed = _stack()
    assert inspect.stack()[0].code_context is None  # no source read
  assert inspect.stack is real
  # The same files and functions; the same frames and lines below `_stack`'s own frame, but
  # for this test's line of the call.
  assert [f[1:4:2] for f in listed] == [f[1:4:2] for f in expected]
  assert [f[0] for f in listed[1:]] == [f[0] for f in expected[1:]]
  assert [f[2] for f in listed[2:]] == [f[2] for f in expected[2:]]


def test_trax_imported_by_the_package_names_where_its_shape_asserts_were_defined():
  # trax's assert_shape records the file and line of each decorated layer at import, which
  # `compat.apply` runs inside `stack_without_source`.
  from trax import layers as tl  # pylint: disable=g-import-not-at-top
  dense = tl.Dense(4)
  message = dense._before_assert_fun._message  # pylint: disable=protected-access
  assert message.startswith(f'Defined at {inspect.getsourcefile(tl.core)}:')
  assert message.endswith(' function input')
