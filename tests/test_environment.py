"""environment.describe(): what every run records about the software and the machine it ran on."""

import json
import subprocess

from experiments import environment

X86 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu vme sse sse2 ssse3 fma sse4_1 sse4_2 popcnt aes avx f16c avx2 bmi1 bmi2 avx512f avx512bw hypervisor

processor\t: 1
model name\t: Other CPU
flags\t\t: fpu sse
"""

ARM = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp asimddp sve i8mm bf16
CPU part\t: 0xd40
"""


def test_cpu_info_reads_the_first_processor_and_its_isa():
  info = environment.cpu_info(X86)
  assert info['model'] == 'AMD EPYC 7B13'
  assert info['isa'] == sorted(['sse', 'sse2', 'ssse3', 'fma', 'sse4_1', 'sse4_2', 'popcnt', 'aes', 'avx', 'f16c',
                                'avx2', 'bmi1', 'bmi2', 'avx512f', 'avx512bw'])
  arm = environment.cpu_info(ARM)
  assert arm['model'] == '0xd40'
  assert {'asimd', 'sve', 'i8mm', 'bf16', 'asimddp'} <= set(arm['isa']) and 'evtstrm' not in arm['isa']


def test_describe_names_versions_commit_cpu_and_devices():
  env = environment.describe()
  json.dumps(env)  # JSON-ready.
  assert set(env['packages']) == {'jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'grain',
                                  'tensorflow-datasets', 'numpy', 'ml_collections'}
  assert all(env['packages'].values())  # All installed in the test environment.
  assert env['python'].count('.') == 2
  head = subprocess.run(['git', '-C', environment.ROOT, 'rev-parse', 'HEAD'], capture_output=True, text=True,
                        check=True).stdout.strip()
  assert env['nmsparse']['commit'] == head and isinstance(env['nmsparse']['dirty'], bool)
  assert env['cpu']['model'] and env['cpu']['isa'] is not None
  assert env['jax']['device_kind'] and env['jax']['backend'] and env['platform']
  assert 'XLA_FLAGS' in env


def test_git_state_outside_a_repository_says_why(tmp_path):
  state = environment.git_state(str(tmp_path))
  assert state['commit'] is None and state['dirty'] is None and 'CalledProcessError' in state['error']


def test_missing_package_is_recorded_as_none():
  assert environment.package_versions(('numpy', 'no-such-package-nmsparse')) == {
      'numpy': environment.package_versions(('numpy',))['numpy'], 'no-such-package-nmsparse': None}
