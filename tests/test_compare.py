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
