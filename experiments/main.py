r"""Train and evaluate a sparse transformer: the command-line entry point.

    python -m experiments.main --config=configs/vit_fashion_mnist.py --workdir=/tmp/vit
    python -m experiments.main --config=configs/vit_fashion_mnist.py:recipe=srste,nm=1:16 \
        --config.total_steps=200 --workdir=/tmp/vit_srste
    python -m experiments.main --mode=evaluate --config=... --workdir=/tmp/vit   # + N:M export

Rerunning the same command resumes from the newest checkpoint in ``--workdir``.
"""

from __future__ import annotations

import logging as std_logging
import os
import sys
from typing import NoReturn

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> dict[str, flags.FlagHolder]:
  """The command line's flags on ``flag_values``; returns their holders by name."""
  holders = dict(
      config=config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py[:args]).',
                                             flag_values=flag_values, lock_config=True),
      workdir=flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and the config.',
                                  flag_values=flag_values),
      mode=flags.DEFINE_enum('mode', 'train', ['train', 'evaluate', 'compile'],
                             'train (and evaluate at the end) | evaluate the newest checkpoint and export it | '
                             'compile the steps for --topology ahead of time: HBM, FLOPs, roofline time, cost.',
                             flag_values=flag_values),
      topology=flags.DEFINE_list('topology', [], 'For --mode=compile: Cloud TPU topologies, e.g. '
                                 'v4:2x2x4,v5e:4x8 (no TPU needed: libtpu compiles for them).',
                                 flag_values=flag_values),
      coordinator_address=flags.DEFINE_string(
          'coordinator_address', None, 'host:port of process 0 for a multi-process run (else autodetected on pods).',
          flag_values=flag_values),
      num_processes=flags.DEFINE_integer('num_processes', None, 'Processes in a multi-process run.',
                                         flag_values=flag_values),
      process_id=flags.DEFINE_integer('process_id', None, 'This process in a multi-process run.',
                                      flag_values=flag_values),
      compile_programs=flags.DEFINE_list('compile_programs', ['train', 'diagnostics', 'eval'],
                                         'For --mode=compile: which steps to compile (train always).',
                                         flag_values=flag_values),
  )
  flags.mark_flags_as_required(['config', 'workdir'], flag_values=flag_values)
  return holders


_FLAGS = define_flags()


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """absl's flag parsing (``app.run``'s ``flags_parser``) with every config error as one line.

  A config file that cannot be loaded, a ``get_config`` argument it rejects, an unknown
  ``--config.<field>`` or a bad flag value prints ``FATAL Flags parsing error: <what, what to
  do>`` and exits with status 1 before anything runs (so nothing is created).
  """
  try:
    rest = flag_values(argv)
    config = flag_values['config'].value
    if not isinstance(config, ml_collections.ConfigDict):
      config.keys()  # ml_collections defers a load failure (OSError) to the first access.
    _check_recipe(config, argv)
  except flags.Error as e:
    _fail(_flag_error_line(e, argv))
  except (AttributeError, KeyError) as e:
    line = _unknown_field_line(e, argv)
    if line is None:
      raise  # Not a mistyped --config.<field>: a bug in the config file, shown with its traceback.
    _fail(line)
  except OSError as e:
    _fail(_load_error_line(e, argv))
  return rest


def _check_recipe(config: ml_collections.ConfigDict, argv: list[str]) -> None:
  """The sparsity recipe with its ``--config.sparsity.recipe.*`` overrides, checked now."""
  import nmsparse  # pylint: disable=g-import-not-at-top
  if 'sparsity' not in config:
    return
  try:
    nmsparse.recipes.check_config(config.sparsity.recipe)
  except (ValueError, TypeError, KeyError) as e:
    message = e.args[0] if isinstance(e, KeyError) and e.args else e
    _fail(f'{_arg(argv, "config")}: config.sparsity.recipe: {_one_line(message)}')


def _fail(line: str) -> NoReturn:
  sys.stderr.write(f'FATAL Flags parsing error: {line}\n')
  sys.exit(1)


def _one_line(text: str) -> str:
  return ' '.join(str(text).split())


def _arg(argv: list[str], name: str) -> str:
  """The ``--name=value`` argument as written (``--name`` when it has no ``=`` form)."""
  return next((a for a in argv if a.lstrip('-').startswith(f'{name}=')), f'--{name}')


def _flag_error_line(error: flags.Error, argv: list[str]) -> str:
  """What the flag parser rejected; for a ``get_config`` error, the config's own message."""
  e = error.__context__
  while e is not None:
    if str(e).startswith('Error whilst parsing config file') and e.__context__ is not None:
      root = e.__context__
      return (f'{_arg(argv, "config")}: {_one_line(root)} (raised by get_config; '
              'fix the argument after the colon).')
    e = e.__context__
  return _one_line(error)


def _unknown_field_line(error: Exception, argv: list[str]) -> str | None:
  """``--config.<field>``: no such field, with ml_collections' suggestion; None if no override names it."""
  e = error
  while e.args and isinstance(e.args[0], BaseException):
    e = e.args[0]
  message = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
  key, _, hint = message.partition('\n')
  key = key.strip('\'"')
  for a in argv:
    path = a.lstrip('-').split('=', 1)[0]
    for prefix in ('config.', 'noconfig.'):
      if path.startswith(prefix) and key in path[len(prefix):].split('.'):
        source = _arg(argv, 'config').partition('=')[2].partition(':')[0] or 'the config file'
        return _one_line(f'--{path}: the config has no field {key!r}. {hint} Check the name against {source}.')
  return None


def _load_error_line(error: OSError, argv: list[str]) -> str:
  cause = error.__cause__ or error
  last = str(cause).strip().splitlines()[-1].strip()
  return (f'{_arg(argv, "config")}: cannot load the config file ({last}); give a configs/*.py file, '
          'e.g. --config=configs/vit_fashion_mnist.py.')


class _DropChatter(std_logging.Filter):
  """Drops INFO records of Orbax and friends (every checkpoint logs dozens of lines), and JAX's
  "Unable to initialize backend 'tpu'" on a machine without that backend (JAX probes every
  platform it knows; a real failure to start a backend that is there is a warning or an error)."""

  NOISY = ('/orbax/', '/grain/', '/tensorstore/', '/jax/_src/distributed')

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno > std_logging.INFO:
      return True
    if record.pathname.endswith('xla_bridge.py'):
      return not record.getMessage().startswith('Unable to initialize backend')
    return not any(p in record.pathname for p in self.NOISY)


def quiet_library_logs() -> None:
  for handler in std_logging.getLogger().handlers + [logging.get_absl_handler()]:
    handler.addFilter(_DropChatter())


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  import jax  # pylint: disable=g-import-not-at-top
  f = {name: holder.value for name, holder in _FLAGS.items()}
  if f['coordinator_address'] or f['num_processes'] or os.environ.get('NMSPARSE_DISTRIBUTED'):
    jax.distributed.initialize(f['coordinator_address'], f['num_processes'], f['process_id'])
  std_logging.getLogger().setLevel(std_logging.INFO)
  quiet_library_logs()
  final = run(f['mode'], f['config'], f['workdir'], f['topology'], f['compile_programs'])
  if jax.process_index() == 0 and final:
    print(' '.join(f'{k}={v:.4f}' for k, v in sorted(final.items())), file=sys.stdout, flush=True)


def run(mode: str, config: ml_collections.ConfigDict, workdir: str,
        topologies: list[str] | None = None, programs: list[str] | None = None) -> dict[str, float]:
  """Trains, evaluates or plans; a workdir of another run, or a plan that does not fit, exits with
  one line (status 1)."""
  from experiments import checkpoints, compile_plan, evaluate, train  # pylint: disable=g-import-not-at-top
  try:
    if mode == 'compile':
      if not topologies:
        sys.exit('FATAL --mode=compile needs --topology, e.g. --topology=v4:2x2x4 (a v4-32).')
      return compile_plan.run(config, workdir, topologies, tuple(programs or compile_plan.PROGRAMS))
    if mode == 'train':
      return train.train_and_evaluate(config, workdir)
    return evaluate.evaluate_and_export(config, workdir)
  except (checkpoints.CannotResume, compile_plan.DoesNotFit) as e:  # Nothing was written.
    sys.exit(f'FATAL {type(e).__name__}: {e}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
