"""scripts/tune.py: a setting chosen on validation, compared on test; values by hand."""

import dataclasses

import pytest

from scripts import tables
from scripts import tune


def _record(variant, nm, seed, setting, val, test=None):
  final = {'eval_accuracy': val / 100} | ({} if test is None else {'test_accuracy': test / 100})
  return tables.Record(name=f'{variant}_{nm}_s{seed}_{setting}', workdir='', variant=variant, nm=nm, seed=seed,
                       setting=setting, section='vit', state='finished', detail='', config={}, final=final)


def _runs():
  d = 'epochs1_val10'
  rs = []
  for seed in range(3):
    rs.append(_record('srste', '1:16', seed, d, 80 + seed, 79 + seed))                       # default
    rs.append(_record('srste', '1:16', seed, d + '_srste_lambda6e-5', 82 + seed, 80 + seed))  # best on val
    rs.append(_record('mdgf-exp', '1:16', seed, d, 83.0, 82 + seed))                          # best on val
    rs.append(_record('mdgf-exp', '1:16', seed, d + '_final0.1', 81.0, 90.0))  # Best on test: never chosen.
  rs.append(_record('mdgf-exp', '1:16', 3, d, 99.0, 99.0))  # Seed 3 only here: not in the common seeds.
  return rs


def test_the_setting_is_chosen_on_validation_and_compared_on_test():
  g = tune.grid(_runs(), ['srste', 'mdgf-exp'], ['1:16'])
  choices = {k: tune.choose(v) for k, v in g.items()}
  s, m = choices[('srste', '1:16')], choices[('mdgf-exp', '1:16')]
  assert s['chosen'] == 'epochs1_val10_srste_lambda6e-5' and s['default'] == 'epochs1_val10'
  assert m['chosen'] == 'epochs1_val10' and m['seeds'] == [0, 1, 2]  # Seed 3 is not in every setting.
  assert m['unused'] == [3] and s['unused'] == []
  assert tune.label(s['chosen'], s['default']) == 'srste_lambda6e-5'
  # mdgf-exp default rows: validation 83, 83, 83; test 82, 83, 84 (mean 83, std 1).
  row = next(r for r in m['rows'] if r[0] == 'epochs1_val10')
  assert row[1:] == (3, pytest.approx(83.0), pytest.approx(0.0), pytest.approx(83.0), pytest.approx(1.0))
  (chosen,) = tune.compare_chosen(g, choices, 'srste', 'chosen')
  assert chosen['diffs'] == pytest.approx([2.0, 2.0, 2.0])  # (82, 83, 84) - (80, 81, 82)
  (default,) = tune.compare_chosen(g, choices, 'srste', 'default')
  assert default['diffs'] == pytest.approx([3.0, 3.0, 3.0])  # (82, 83, 84) - (79, 80, 81)
  text = tune.markdown(g, choices, 'srste')
  assert '| SR-STE | 1:16 | srste_lambda6e-5 | 3 | 83.00 ± 1.00 | 81.00 ± 1.00 | **chosen** |' in text
  assert 'Left out because not every setting has them yet: MDGF-exponential 1:16 (seeds [3]).' in text


def test_a_run_without_a_test_split_is_refused():
  rs = _runs() + [_record('srste', '1:16', 0, 'epochs1', 85.0)]  # Trained on all of train, eval on test.
  with pytest.raises(ValueError, match='srste_1:16_s0_epochs1 has no .test_accuracy.'):
    tune.grid(rs, ['srste', 'mdgf-exp'], None)


def test_settings_without_a_common_seed_are_refused():
  with pytest.raises(ValueError, match='no seed in common'):
    tune.choose({'a': {0: (1.0, 1.0)}, 'a_x': {1: (1.0, 1.0)}})


def test_figure_is_written(tmp_path):
  g = tune.grid(_runs(), ['srste', 'mdgf-exp'], ['1:16'])
  path = tune.figure({k: tune.choose(v) for k, v in g.items()}, str(tmp_path / 'f' / 'tuning.png'))
  assert (tmp_path / 'f' / 'tuning.png').stat().st_size > 1000 and path.endswith('tuning.png')


def test_unfinished_runs_are_named_not_silently_dropped():
  running = dataclasses.replace(_record('srste', '1:32', 0, 'epochs1_val10_finetune_frac0.3', 0.0), state='interrupted')
  other = dataclasses.replace(_record('dense', '1:32', 0, 'epochs1_val10', 0.0), state='started')  # Not tuned.
  rs = _runs() + [running, other]
  assert tune.grid(rs, ['srste', 'mdgf-exp'], None).keys() == {('srste', '1:16'), ('mdgf-exp', '1:16')}
  assert tune.unfinished(rs, ['srste', 'mdgf-exp'], None) == [
      'srste_1:32_s0_epochs1_val10_finetune_frac0.3 (interrupted)']
  assert tune.unfinished(rs, ['srste', 'mdgf-exp'], ['1:16']) == []


def test_sensitivity_pairs_each_setting_with_its_recipes_default_on_validation():
  g = tune.grid(_runs(), ['srste', 'mdgf-exp'], ['1:16'])
  found = tune.sensitivity(g, {k: tune.choose(v) for k, v in g.items()})
  by = {(c['a'], c['setting']): c for c in found}
  assert sorted(by) == [('mdgf-exp', 'final0.1 - default'), ('srste', 'srste_lambda6e-5 - default')]
  assert by[('srste', 'srste_lambda6e-5 - default')]['diffs'] == pytest.approx([2.0, 2.0, 2.0])  # 82+s - (80+s)
  assert by[('mdgf-exp', 'final0.1 - default')]['diffs'] == pytest.approx([-2.0, -2.0, -2.0])  # 81 - 83 (seed 3 out)
  assert by[('mdgf-exp', 'final0.1 - default')]['positive'] == 0
  assert '| MDGF-exponential | 1:16 | final0.1 - default | -2.00 ± 0.00 |' in tune.sensitivity_markdown(found)
