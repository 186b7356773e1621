"""scripts/record.py: a committed result keeps every run, its environment and whether they agree."""

import json

import pytest

from scripts import record


def _workdir(tmp_path, name, accuracy, times=(100.0, 160.5), env=True):
  d = tmp_path / name
  d.mkdir()
  final = {'eval_accuracy': accuracy, 'step': 20.0}
  if env:
    final['environment'] = {'python': '3.12.1', 'cpu': {'model': 'x'}}
  (d / 'final_metrics.json').write_text(json.dumps(final))
  (d / 'metrics.jsonl').write_text(''.join(json.dumps({'step': i, 'time': t}) + '\n'
                                           for i, t in enumerate(times)))
  return str(d)


def test_two_identical_runs_then_a_different_one(tmp_path):
  out = str(tmp_path / 'r.json')
  cmd = 'python -m experiments.main --config=x'
  record.main(['--workdir', _workdir(tmp_path, 'a', 0.5), '--out', out, '--command', cmd])
  record.main(['--workdir', _workdir(tmp_path, 'b', 0.5, times=(0.0, 30.0)), '--out', out,
               '--command', cmd, '--note', 'shared'])
  r = json.loads(open(out).read())
  assert r['identical'] is True and len(r['runs']) == 2
  assert [x['wall_time_s'] for x in r['runs']] == [60.5, 30.0]  # Last minus first logged time.
  assert r['runs'][1]['note'] == 'shared' and r['runs'][0]['environment']['python'] == '3.12.1'
  assert r['final'] == {'eval_accuracy': 0.5, 'step': 20.0} and r['steps'] == 20
  record.main(['--workdir', _workdir(tmp_path, 'c', 0.51), '--out', out, '--command', cmd])
  assert json.loads(open(out).read())['identical'] is False


def test_refuses_another_command_and_unfinished_or_old_runs(tmp_path):
  out = str(tmp_path / 'r.json')
  record.main(['--workdir', _workdir(tmp_path, 'a', 0.5), '--out', out, '--command', 'one'])
  with pytest.raises(ValueError, match='another command'):
    record.main(['--workdir', _workdir(tmp_path, 'b', 0.5), '--out', out, '--command', 'two'])
  with pytest.raises(FileNotFoundError, match='has not finished'):
    record.main(['--workdir', str(tmp_path), '--out', out, '--command', 'one'])
  with pytest.raises(ValueError, match='no "environment"'):
    record.main(['--workdir', _workdir(tmp_path, 'old', 0.5, env=False), '--out', out, '--command', 'one'])
