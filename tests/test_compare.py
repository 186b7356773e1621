"""scripts/compare.py: paired differences and their t intervals, by hand."""

import math

import pytest

from scripts import compare


def test_t_quantiles_match_the_published_table():
  # Student's t, two-sided 95 %: 12.706 (1 df), 4.303 (2), 2.776 (4) (any statistics table).
  assert [round(compare.t_quantile(0.975, df), 3) for df in (1, 2, 4)] == [12.706, 4.303, 2.776]


def test_paired_interval_by_hand():
  c = compare.paired([1.0, 2.0, 3.0])
  half = 4.303 * 1.0 / math.sqrt(3)  # std of 1, 2, 3 is 1 (ddof = 1)
  assert c['mean'] == 2.0 and c['std'] == pytest.approx(1.0)
  assert (c['low'], c['high']) == (pytest.approx(2 - half, abs=1e-3), pytest.approx(2 + half, abs=1e-3))
  assert c['positive'] == 3 and c['shown'] is False  # The interval [-0.48, 4.48] straddles 0.
  c = compare.paired([0.8, 1.0, 0.6, 0.9, 0.7])
  assert c['shown'] is True and c['low'] > 0  # mean 0.8, std 0.158, half 2.776 * 0.0707 = 0.196
  assert c['low'] == pytest.approx(0.8 - 2.776 * math.sqrt(0.025) / math.sqrt(5), abs=1e-3)
  one = compare.paired([0.5])
  assert one['std'] is None and one['shown'] is False
  with pytest.raises(ValueError, match='no paired seeds'):
    compare.paired([])


def _record(variant, nm, seed, setting, epochs, acc):
  from scripts import tables
  return tables.Record(name=f'{variant}_{nm}_{seed}_{setting}', workdir='', variant=variant, nm=nm, seed=seed,
                       setting=setting, section='vit', state='finished', detail='',
                       config={'total_epochs': epochs}, final={'eval_accuracy': acc})


def _grid():
  # SR-STE vs MDGF at 1:16; 1 epoch: differences +1, +2, +3 points; 5 epochs: -0.5, +0.5.
  rs = []
  for seed, (b1, a1) in enumerate([(0.80, 0.81), (0.80, 0.82), (0.70, 0.73)]):
    rs += [_record('srste', '1:16', seed, 'epochs1', 1.0, b1), _record('mdgf-exp', '1:16', seed, 'epochs1', 1.0, a1)]
  for seed, (b5, a5) in enumerate([(0.85, 0.845), (0.85, 0.855)]):
    rs += [_record('srste', '1:16', seed, 'epochs5', 5.0, b5), _record('mdgf-exp', '1:16', seed, 'epochs5', 5.0, a5)]
  rs.append(_record('mdgf-exp', '1:16', 9, 'epochs5', 5.0, 0.99))  # No SR-STE partner: not paired.
  return rs


def test_by_length_pairs_seeds_and_reads_the_length(tmp_path):
  from scripts import tables
  metric = tables.choose_metric('classification')
  found = compare.by_length(_grid(), metric, ['mdgf-exp'], 'srste', None, ['1:16'])
  by_x = {c['x']: c for c in found}
  assert sorted(by_x) == [1.0, 5.0]
  assert by_x[1.0]['diffs'] == pytest.approx([1.0, 2.0, 3.0]) and by_x[1.0]['mean'] == pytest.approx(2.0)
  assert by_x[5.0]['seeds'] == [0, 1] and by_x[5.0]['mean'] == pytest.approx(0.0, abs=1e-9)
  assert by_x[5.0]['positive'] == 1 and by_x[5.0]['shown'] is False
  longer = [_record(v, '1:16', 0, 'epochs15', 15.0, acc) for v, acc in (('srste', 0.9), ('mdgf-exp', 0.9))]
  found = compare.by_length(longer + _grid(), metric, ['mdgf-exp'], 'srste', None, ['1:16'])
  assert [c['setting'] for c in found] == ['epochs1', 'epochs5', 'epochs15']  # By length, not by name.
  path = compare.gap_figure(found, str(tmp_path / 'gap.png'), 'total epochs')
  assert (tmp_path / 'gap.png').stat().st_size > 1000 and path.endswith('gap.png')


def test_by_length_refuses_ambiguous_lengths():
  from scripts import tables
  metric = tables.choose_metric('classification')
  rs = _grid() + [_record('srste', '1:16', 0, 'epochs5_other', 5.0, 0.8),
                  _record('mdgf-exp', '1:16', 0, 'epochs5_other', 5.0, 0.8)]
  with pytest.raises(ValueError, match="'epochs5' and 'epochs5_other' both have total_epochs = 5"):
    compare.by_length(rs, metric, ['mdgf-exp'], 'srste', None, ['1:16'])
  assert len(compare.by_length(rs, metric, ['mdgf-exp'], 'srste', ['epochs1', 'epochs5'], ['1:16'])) == 2
  mixed = _grid() + [_record('srste', '1:16', 5, 'epochs1', 2.0, 0.8)]
  with pytest.raises(ValueError, match="setting 'epochs1'"):
    compare.by_length(mixed, metric, ['mdgf-exp'], 'srste', None, ['1:16'])


def test_cells_against_dense_and_across_settings():
  from scripts import tables
  metric = tables.choose_metric('classification')
  rs = _grid() + [_record('dense', None, s, 'epochs1', 1.0, acc) for s, acc in enumerate([0.82, 0.83, 0.74])]
  found = compare.cells(rs, metric, 'srste', 'dense', 'epochs1', None)
  assert [c['diffs'] for c in found] == [pytest.approx([-2.0, -3.0, -4.0])]  # B is dense: no N:M of its own.
  # A in one setting against B in another: SR-STE at 5 epochs minus MDGF at 1 epoch, seeds 0 and 1.
  found = compare.cells(rs, metric, 'srste', 'mdgf-exp', 'epochs5', None, setting_b='epochs1')
  assert found[0]['setting'] == 'epochs5 vs epochs1' and found[0]['diffs'] == pytest.approx([4.0, 3.0])


def test_by_length_pairs_each_setting_with_its_own_b_setting():
  from scripts import tables
  metric = tables.choose_metric('classification')
  # SR-STE run longer (settings *_long) against MDGF's runs of each length: A's length is x.
  rs = _grid() + [_record('srste', '1:16', s, 'epochs1_long', 1.0, acc) for s, acc in enumerate([0.84, 0.85, 0.76])]
  rs += [_record('srste', '1:16', s, 'epochs5_long', 5.0, acc) for s, acc in enumerate([0.86, 0.85])]
  found = compare.by_length(rs, metric, ['srste'], 'mdgf-exp', ['epochs1_long', 'epochs5_long'], ['1:16'],
                            settings_b=['epochs1', 'epochs5'])
  assert [c['x'] for c in found] == [1.0, 5.0]
  assert found[0]['setting'] == 'epochs1_long vs epochs1'
  assert found[0]['diffs'] == pytest.approx([3.0, 3.0, 3.0])  # 84-81, 85-82, 76-73.
  assert found[1]['diffs'] == pytest.approx([1.5, -0.5])  # 86-84.5, 85-85.5.
  assert compare.pair_label(found[0]) == 'SR-STE - MDGF-exponential'
  matched = found[0] | {'setting': 'epochs1_flops_of_mdgf-exp vs epochs1'}
  assert compare.pair_label(matched) == "SR-STE at MDGF-exponential's FLOPs - MDGF-exponential"
  with pytest.raises(ValueError, match='one B setting per --setting'):
    compare.by_length(rs, metric, ['srste'], 'mdgf-exp', ['epochs1_long', 'epochs5_long'], ['1:16'],
                      settings_b=['epochs1', 'epochs5', 'epochs15'])
  # One B setting serves every A setting; none pairs each with its own.
  assert compare.setting_pairs(['x', 'y'], ['b']) == [('x', 'b'), ('y', 'b')]
  assert compare.setting_pairs(['x', 'y'], None) == [('x', None), ('y', None)]
  assert compare.setting_pairs(None, None) == [(None, None)]
  assert compare.setting_pairs(None, ['b']) == [(None, 'b')]  # Every A setting against B's 'b'.
  with pytest.raises(ValueError, match='one B setting per --setting'):
    compare.setting_pairs(None, ['b', 'c'])


def test_markdown_table_by_hand():
  from scripts import tables
  metric = tables.choose_metric('classification')
  found = compare.cells(_grid(), metric, 'mdgf-exp', 'srste', 'epochs1', None)
  text = compare.markdown(found)
  # Differences 1, 2, 3: mean 2, std 1, half-width 4.303 / sqrt(3) = 2.48 -> [-0.48, +4.48].
  assert '| mdgf-exp - srste | 1:16 | epochs1 | +2.00 ± 1.00 | [-0.48, +4.48] | 3 of 3 | not shown |' in text
