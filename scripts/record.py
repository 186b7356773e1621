r"""Stamps a finished run as a committed result: ``results/NAME.json``.

    python -m scripts.record --workdir workdirs/vit_fmnist --out results/vit_fmnist_default.json \
        --command "python -m experiments.main --config=configs/vit_fashion_mnist.py --workdir=workdirs/vit_fmnist" \
        [--note "machine shared with ..."]

The record holds the command, the final metrics, the steps, the run's wall time (first to last
line of its ``metrics.jsonl``, so start-up before the first logged step is not in it, and a
resumed run counts its pauses) and the environment the run recorded (package versions, git
commit, CPU). Run it again with the same ``--out`` after a second run of the same command:
the run is appended, and whether the final metrics of all runs agree to the last digit is
recorded under ``identical``. Another command or other final metrics for the same ``--out``
are kept apart: the file says which runs disagree rather than picking one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any


def read_run(workdir: str) -> dict[str, Any]:
  """``{final, environment, steps, wall_time_s}`` of a finished run; a clear error if it is not finished."""
  path = os.path.join(workdir, 'final_metrics.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist: the run in {workdir} has not finished.')
  with open(path) as f:
    final = json.load(f)
  env = final.pop('environment', None)
  if env is None:
    raise ValueError(f'{path} has no "environment": it was written by an older version; rerun it.')
  times = []
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      times.append(json.loads(line)['time'])
  return dict(final=final, environment=env, steps=int(final['step']),
              wall_time_s=round(max(times) - min(times), 1))


def merge(record: dict[str, Any] | None, command: str, run: dict[str, Any], note: str | None) -> dict:
  """The record with ``run`` appended; ``identical`` says whether every run's final metrics agree."""
  if record is not None and record.get('command') != command:
    raise ValueError(f'the record holds runs of another command:\n  {record.get("command")}\n'
                     f'not:\n  {command}\nwrite to another --out.')
  record = record or dict(command=command, runs=[])
  entry = dict(final=run['final'], steps=run['steps'], wall_time_s=run['wall_time_s'],
               environment=run['environment'])
  if note:
    entry['note'] = note
  runs = record['runs'] + [entry]
  finals = [json.dumps(r['final'], sort_keys=True) for r in runs]
  return dict(command=command, final=runs[0]['final'], steps=runs[0]['steps'],
              identical=len(set(finals)) == 1, runs=runs)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--out', required=True)
  parser.add_argument('--command', required=True, help='The command that produced the run, as a user types it.')
  parser.add_argument('--note', default=None, help='What else ran on the machine, for the wall time.')
  args = parser.parse_args(argv)
  run = read_run(args.workdir)
  record = None
  if os.path.exists(args.out):
    with open(args.out) as f:
      record = json.load(f)
    if 'runs' not in record or any('environment' not in r for r in record['runs']):
      record = None  # A record from before environments were kept: replaced, not mixed.
  record = merge(record, args.command, run, args.note)
  with open(args.out, 'w') as f:
    json.dump(record, f, indent=2, sort_keys=True)
    f.write('\n')
  print(f'{args.out}: {len(record["runs"])} run(s), identical={record["identical"]}, '
        f'final {record["final"]}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
