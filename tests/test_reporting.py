"""The progress line's ETA under a fake clock: diagnostics steps are timed apart from ordinary ones."""

import re

import pytest

from experiments import reporting


class FakeClock:
  def __init__(self):
    self.now = 1000.0

  def __call__(self) -> float:
    return self.now


def eta_seconds(line: str) -> float | None:
  m = re.search(r'ETA (\d+):(\d\d):(\d\d)', line)
  return None if m is None else int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3])


def simulate(total, log_every, diag_every, step_time, diag_time, compile_time=30.0, start=0):
  """Runs the train loop's schedule of steps and progress updates; yields (step, ETA shown, true time left)."""
  clock = FakeClock()
  progress = reporting.Progress(start, total, diagnostics_every=diag_every, clock=clock)
  times = [diag_time if reporting.is_diagnostics_step(s, diag_every, total) else step_time
           for s in range(total)]
  compiled = set()
  for step in range(start, total):
    diag = reporting.is_diagnostics_step(step, diag_every, total)
    clock.now += times[step] + (compile_time if diag not in compiled else 0.0)
    compiled.add(diag)
    done = step + 1
    if done % log_every == 0 or diag or done == total:
      yield done, eta_seconds(progress.update(done)), sum(times[done:])


@pytest.mark.parametrize('log_every,diag_every', [(100, 100), (50, 100), (30, 100), (5, 5), (7, 10)])
def test_eta_is_steady_when_diagnostics_steps_are_slow(log_every, diag_every):
  # Ordinary steps 0.1 s, diagnostics steps 3 s: the old single rate jumped by 30x at every
  # diagnostics step. Once both kinds are timed, the ETA is the true time left (to the second).
  total = 2340
  shown = list(simulate(total, log_every, diag_every, step_time=0.1, diag_time=3.0))
  warm = [(step, eta, true) for step, eta, true in shown if step > 2 * diag_every + log_every]
  assert len(warm) > 10
  for step, eta, true in warm:
    assert eta is not None, step
    assert abs(eta - true) <= 1.0 + 0.01 * true, (step, eta, true)


def test_compilation_sets_no_rate_and_eta_appears_after_one_timed_interval():
  shown = list(simulate(100, 5, 10, step_time=0.1, diag_time=1.0, compile_time=60.0))
  assert shown[0][1] is None  # First interval: the diagnostics step's compilation.
  etas = [eta for _, eta, _ in shown if eta is not None]
  assert etas and max(etas) < 30  # Never an ETA inflated by a compilation (60 s).


def test_smoothing_follows_a_change_of_speed_without_jumping():
  clock = FakeClock()
  progress = reporting.Progress(0, 10_000, clock=clock, smoothing=0.3)
  seen = []
  for step in range(100, 3100, 100):
    clock.now += 100 * (0.1 if step <= 1500 else 0.2)
    progress.update(step)
    seen.append(progress.step_time)
  assert seen[1:15] == pytest.approx([0.1] * 14)
  assert seen[15] == pytest.approx(0.13)  # 30 % of the way to the new speed, not all of it.
  assert all(a <= b + 1e-12 for a, b in zip(seen[1:], seen[2:]))
  assert seen[-1] == pytest.approx(0.2, rel=1e-2)
  assert progress.steps_per_sec == pytest.approx(1 / seen[-1])


def test_pause_excludes_evaluation_time():
  clock = FakeClock()
  progress = reporting.Progress(0, 1000, clock=clock)
  for step in (10, 20, 30):
    clock.now += 1.0
    progress.update(step)
  clock.now += 500.0  # An evaluation.
  progress.pause(30)
  clock.now += 1.0
  line = progress.update(40)
  assert progress.step_time == pytest.approx(0.1)
  assert eta_seconds(line) == 96


@pytest.mark.parametrize('start,stop,every,total', [
    (0, 100, 10, 100), (1, 100, 10, 100), (5, 37, 10, 40), (0, 20, 0, 20), (3, 3, 5, 10), (0, 2340, 100, 2340),
    (99, 101, 100, 101), (0, 7, 3, 7)])
def test_count_diagnostics_steps_matches_the_loop_rule(start, stop, every, total):
  expected = sum(reporting.is_diagnostics_step(s, every, total) for s in range(start, stop))
  assert reporting.count_diagnostics_steps(start, stop, every, total) == expected


def test_eta_is_zero_at_the_end_even_before_a_rate_is_known():
  clock = FakeClock()
  progress = reporting.Progress(0, 20, clock=clock)
  clock.now += 5.0
  assert progress.update(20).endswith('ETA 0:00:00')
