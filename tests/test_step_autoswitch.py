"""scripts/step_autoswitch.py: the switch step, what fired it and Zbar, on hand-made run folders."""

import json

import pytest

from scripts import step_autoswitch, tables


def _run(tmp_path, name, rows, step_cfg, total=468):
  d = tmp_path / name
  d.mkdir()
  s = dict(t_min=0.1, t_max=0.5, t_min_steps=None, t_max_steps=None, threshold=1e-8, scale_free=False,
           window=None, statistic='mean')
  s.update(step_cfg)
  config = {'task': 'classification', 'sparsity': {'recipe': {'name': 'step', 'step': s}}}
  (d / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  final = {'step': total, 'eval_accuracy': 0.78}
  return tables.Record(name=name, workdir=str(d), variant='step', nm='1:16', seed=0, setting='epochs1',
                       section='vit', state='finished', detail='', config=config, final=final)


def test_threshold_after_t_min(tmp_path):
  # T_min = round(0.1 * 468) = 47; Zbar far below 1e-8 from the start: the switch at 48 is the threshold's.
  rows = [{'step': k, 'sparsity/autoswitch_zbar': 3e-11, 'sparsity/switch_step': -1, 'sparsity/phase': 0}
          for k in (10, 20, 30, 40)]
  rows.append({'step': 50, 'sparsity/autoswitch_zbar': float('nan'), 'sparsity/switch_step': 48,
               'sparsity/phase': 1})
  rows.append({'step': 60, 'sparsity/autoswitch_zbar': 3e-11, 'sparsity/switch_step': 48})  # Window frozen.
  metric = tables.choose_metric('classification')
  f = step_autoswitch.analyse(_run(tmp_path, 'a', rows, {}), metric)
  assert (f['t_min'], f['t_max'], f['switch'], f['exact']) == (47, 234, 48, True)
  assert f['fired'] == 'threshold (after T_min)' and f['zbar_before'] == pytest.approx(3e-11)
  assert f['metric'] == pytest.approx(78.0) and len(f['curve']) == 4  # Up to the switch, finite only
  assert '| 48 | 10.3% | threshold (after T_min) | 3.00e-11 | 78.00 |' in step_autoswitch.table([f], metric)


def test_t_max_bound_and_old_runs(tmp_path):
  metric = tables.choose_metric('classification')
  rows = [{'step': k, 'sparsity/autoswitch_zbar': 5e-6, 'sparsity/switch_step': -1} for k in (100, 200)]
  rows.append({'step': 300, 'sparsity/switch_step': 236})  # T_max = 234: fired at 235 or later by the bound
  f = step_autoswitch.analyse(_run(tmp_path, 'b', rows, {}), metric)
  assert f['fired'] == 'T_max bound' and f['switch'] == 236
  # A run from before the statistic was logged: the switch is bounded by the first sparse row.
  old = [{'step': 1, 'sparsity/phase': 0}, {'step': 100, 'sparsity/phase': 1}]
  f = step_autoswitch.analyse(_run(tmp_path, 'c', old, {'t_max': None}), metric)
  assert (f['switch'], f['exact'], f['t_max'], f['zbar_before']) == (99, False, None, None)
  assert '| <= 99 |' in step_autoswitch.table([f], metric)
