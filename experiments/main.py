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

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py[:args]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and the config.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'evaluate'],
                          'train (and evaluate at the end) | evaluate the newest checkpoint and export it.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0 for a multi-process run (else autodetected on pods).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in a multi-process run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process in a multi-process run.')
flags.mark_flags_as_required(['config', 'workdir'])


class _DropChatter(std_logging.Filter):
  """Drops INFO records of Orbax and friends (every checkpoint logs dozens of lines)."""

  NOISY = ('/orbax/', '/grain/', '/tensorstore/', '/jax/_src/distributed')

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno > std_logging.INFO or not any(p in record.pathname for p in self.NOISY)


def quiet_library_logs() -> None:
  for handler in std_logging.getLogger().handlers + [logging.get_absl_handler()]:
    handler.addFilter(_DropChatter())


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  import jax  # pylint: disable=g-import-not-at-top
  if _COORDINATOR.value or _NUM_PROCESSES.value or os.environ.get('NMSPARSE_DISTRIBUTED'):
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  std_logging.getLogger().setLevel(std_logging.INFO)
  quiet_library_logs()
  from experiments import evaluate, train  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  if _MODE.value == 'train':
    final = train.train_and_evaluate(config, _WORKDIR.value)
  else:
    final = evaluate.evaluate_and_export(config, _WORKDIR.value)
  if jax.process_index() == 0 and final:
    print(' '.join(f'{k}={v:.4f}' for k, v in sorted(final.items())), file=sys.stdout, flush=True)


if __name__ == '__main__':
  app.run(main)
