"""scripts/sweep.py, tables.py and figures.py on synthetic sweep folders the tests write themselves.

No training runs: the sweep's run mode gets a fake runner, and every workdir (config.json,
metrics.jsonl, final_metrics.json, checkpoints/<step>/) is written here.
"""

import csv
import dataclasses
import importlib.util
import io
import json
import os
import shlex
import sys
import types

import ml_collections
import numpy as np
import pytest

import nmsparse
from conftest import ROOT
from scripts import figures, sweep, tables

VIT = os.path.join(ROOT, 'configs', 'vit_fashion_mnist.py')
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


# ----------------------------------------------------------------------------- helpers

def fake_config(recipe='srste', nm='2:4', seed=0, task='classification', total_steps=100, **recipe_kw):
  """A config.json with what tables and figures read (the FLOPs tests use a real config)."""
  dense_frac = 0.0 if recipe == 'step' else 0.1  # STEP's dense phase ends at its AutoSwitch.
  rc = nmsparse.recipe_config(recipe, dense_frac=dense_frac, finetune_frac=0.1, **recipe_kw)
  return {'task': task, 'model': {'name': 'vit', 'variant': 'mu/7'}, 'data': {'name': 'fake_data'},
          'seed': seed, 'total_steps': total_steps, 'total_epochs': None, 'batch_size': 8,
          'sparsity': {'nm': nm, 'layers': 'mlp', 'recipe': rc, 'rules': None}}


def write_run(workdir, config=None, final=None, metrics=(), checkpoints=()):
  os.makedirs(workdir, exist_ok=True)
  if config is not None:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      json.dump(config, f)
  if final is not None:
    with open(os.path.join(workdir, 'final_metrics.json'), 'w') as f:
      json.dump(final, f)
  if metrics:
    with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
      f.writelines(json.dumps(row) + '\n' for row in metrics)
  for step in checkpoints:
    os.makedirs(os.path.join(workdir, 'checkpoints', str(step)), exist_ok=True)


def write_manifest(root, runs):
  sweep.write_json(os.path.join(root, sweep.MANIFEST), sweep.merge_manifest(sweep.load_manifest(root), runs))


def by_name(runs):
  return {r.name: r for r in runs}


# ----------------------------------------------------------------------------- sweep

def test_workdir_names_and_arguments_are_deterministic(tmp_path):
  args = (VIT, ['dense', 'srste', 'mdgf-linear'], ['2:4', '1:8'], [0, 1], str(tmp_path))
  runs = sweep.make_runs(*args, extra='epochs=3')
  assert runs == sweep.make_runs(*args, extra='epochs=3')
  # Dense has no N:M: one run per seed; seed, then N:M, then variant.
  assert [r.name for r in runs] == [
      'dense_s0_epochs3', 'srste_nm2x4_s0_epochs3', 'mdgf-linear_nm2x4_s0_epochs3',
      'srste_nm1x8_s0_epochs3', 'mdgf-linear_nm1x8_s0_epochs3',
      'dense_s1_epochs3', 'srste_nm2x4_s1_epochs3', 'mdgf-linear_nm2x4_s1_epochs3',
      'srste_nm1x8_s1_epochs3', 'mdgf-linear_nm1x8_s1_epochs3']
  r = by_name(runs)['mdgf-linear_nm2x4_s0_epochs3']
  assert r.arg == 'recipe=mdgf,decay=linear,nm=2:4,seed=0,epochs=3'
  assert r.argv('py') == ['py', '-m', 'experiments.main',
                          '--config=configs/vit_fashion_mnist.py:recipe=mdgf,decay=linear,nm=2:4,seed=0,epochs=3',
                          f'--workdir={tmp_path}/mdgf-linear_nm2x4_s0_epochs3']
  plain = sweep.make_runs(VIT, ['sdgf-geometric'], ['1:16'], [2], str(tmp_path),
                          overrides=['config.total_steps=200'])
  assert [(p.name, p.arg, p.overrides) for p in plain] == [
      ('sdgf-geometric_nm1x16_s2_total_steps200', 'recipe=sdgf,structure=geometric,nm=1:16,seed=2',
       ('total_steps=200',))]
  assert plain[0].argv()[-1] == '--config.total_steps=200'
  assert sweep.expand_variants('paper') == list(sweep.PAPER)
  with pytest.raises(ValueError, match='Unknown recipe variant'):
    sweep.expand_variants('dense,mdgf-lin')
  with pytest.raises(ValueError, match='grid sets'):
    sweep.make_runs(VIT, ['srste'], ['2:4'], [0], str(tmp_path), extra='nm=1:8')
  with pytest.raises(ValueError, match='contradicts'):
    sweep.make_runs(VIT, ['mdgf-linear'], ['2:4'], [0], str(tmp_path), extra='decay=cosine')


def test_manifest_refuses_a_name_with_another_command(tmp_path):
  a = sweep.make_runs(VIT, ['srste'], ['2:4'], [0], str(tmp_path))
  manifest = sweep.merge_manifest(sweep.load_manifest(str(tmp_path)), a)
  assert manifest['runs']['srste_nm2x4_s0']['command'] == a[0].command()
  b = [dataclasses.replace(a[0], arg=a[0].arg + ',layers=all')]
  with pytest.raises(ValueError, match='already in the manifest with another command'):
    sweep.merge_manifest(manifest, b)


class FakeRunner:
  """Stands in for the subprocess: records each argv, 'finishes' the run unless told to fail."""

  def __init__(self, fail=(), finish=True):
    self.calls, self.fail, self.finish = [], set(fail), finish

  def __call__(self, argv, *, cwd, log_path):
    assert cwd == sweep.REPO and log_path.endswith('.log')
    self.calls.append(list(argv))
    workdir = next(a.split('=', 1)[1] for a in argv if a.startswith('--workdir='))
    name = os.path.basename(workdir)
    os.makedirs(workdir, exist_ok=True)
    if name in self.fail:
      return 1
    if self.finish:
      write_run(workdir, final={'eval_accuracy': 0.5, 'step': 10})
    return 0


class Clock:
  """Each call advances 5 s: every run's wall time (end - start) is 5 s."""

  def __init__(self):
    self.t = 1000.0

  def __call__(self):
    self.t += 5.0
    return self.t


def sweep_args(root, mode='run', *more):
  return ['--config', VIT, '--recipes', 'dense,srste', '--nm', '2:4', '--seeds', '0,1', '--root', root,
          '--mode', mode, '--novalidate', '--python', 'py', *more]


def test_run_mode_skips_finished_resumes_interrupted_and_goes_on_after_a_failure(tmp_path):
  root = str(tmp_path / 'sweep')
  write_run(os.path.join(root, 'dense_s0'), final={'eval_accuracy': 0.9, 'step': 10})
  write_run(os.path.join(root, 'srste_nm2x4_s0'), metrics=[{'step': 40}], checkpoints=[20, 40])
  runner, out = FakeRunner(fail={'dense_s1'}), io.StringIO()
  code = sweep.main(sweep_args(root), runner=runner, clock=Clock(), out=out)
  assert code == 1  # One run failed ...
  ran = [os.path.basename(c[4].split('=', 1)[1]) for c in runner.calls]
  assert ran == ['srste_nm2x4_s0', 'dense_s1', 'srste_nm2x4_s1']  # ... and the next one still ran.
  manifest = sweep.load_manifest(root)['runs']
  assert set(manifest) == {'dense_s0', 'srste_nm2x4_s0', 'dense_s1', 'srste_nm2x4_s1'}
  # The interrupted run is resumed by rerunning exactly its manifest command.
  assert runner.calls[0] == shlex.split(manifest['srste_nm2x4_s0']['command'].replace('python', 'py', 1))
  attempts = sweep.read_jsonl(os.path.join(root, 'runs.jsonl'))
  assert [(a['name'], a['status'], a['returncode'], a['wall_time_s']) for a in attempts] == [
      ('srste_nm2x4_s0', 'ok', 0, 5.0), ('dense_s1', 'failed', 1, 5.0), ('srste_nm2x4_s1', 'ok', 0, 5.0)]
  assert attempts[0]['resumed_from_step'] == 40 and attempts[1]['resumed_from_step'] is None
  text = out.getvalue()
  assert '4 runs, 1 finished (skipped), 1 to resume, 2 to start' in text
  assert '[1/3] srste_nm2x4_s0: resume from step 40 | ETA unknown' in text
  # ETA from the finished runs' wall time: 1 ok run of 5 s, 2 runs left -> 10 s.
  assert '[2/3] dense_s1: start | ETA 10s' in text
  assert 'dense_s1: failed in 5s (exit 1' in text
  assert '1 run(s) did not finish: dense_s1 (failed, exit 1)' in text
  # Second pass: only the failed run is pending.
  runner2 = FakeRunner()
  assert sweep.main(sweep_args(root), runner=runner2, clock=Clock(), out=io.StringIO()) == 0
  assert [os.path.basename(c[4]) for c in runner2.calls] == ['dense_s1']


def test_run_mode_exit_zero_without_final_metrics_is_incomplete(tmp_path):
  root = str(tmp_path / 'sweep')
  runner = FakeRunner(finish=False)
  args = ['--config', VIT, '--recipes', 'srste', '--nm', '1:8', '--root', root, '--mode', 'run',
          '--novalidate']
  assert sweep.main(args, runner=runner, clock=Clock(), out=io.StringIO()) == 1
  assert [a['status'] for a in sweep.read_jsonl(os.path.join(root, 'runs.jsonl'))] == ['incomplete']


def test_subprocess_runner_logs_output_and_returns_the_exit_status(tmp_path):
  log = str(tmp_path / 'logs' / 'x.log')
  code = sweep.subprocess_runner([sys.executable, '-c', 'print("hello from the run"); raise SystemExit(3)'],
                                 cwd=str(tmp_path), log_path=log)
  assert code == 3
  with open(log) as f:
    text = f.read()
  assert 'hello from the run' in text and '-c' in text.splitlines()[1]


def test_print_and_write_modes_give_one_command_per_pending_run(tmp_path):
  root = str(tmp_path / 'sweep')
  write_run(os.path.join(root, 'srste_nm2x4_s1'), final={'eval_accuracy': 0.9})
  write_run(os.path.join(root, 'dense_s0'), checkpoints=[5])  # Interrupted: pending.
  out = io.StringIO()
  assert sweep.main(sweep_args(root, 'print'), out=out) == 0
  lines = out.getvalue().splitlines()
  names = [os.path.basename(shlex.split(line)[4].split('=', 1)[1]) for line in lines]
  assert names == ['dense_s0', 'srste_nm2x4_s0', 'dense_s1']
  assert all(shlex.split(line)[:3] == ['py', '-m', 'experiments.main'] for line in lines)
  target = str(tmp_path / 'jobs.sh')
  assert sweep.main(sweep_args(root, 'write', '--out', target), out=io.StringIO()) == 0
  with open(target) as f:
    written = [line.rstrip('\n') for line in f if not line.startswith('#')]
  assert written == lines


def test_dry_run_writes_nothing_and_bad_arguments_exit_2(tmp_path, capsys):
  root = str(tmp_path / 'sweep')
  out = io.StringIO()
  assert sweep.main(sweep_args(root, 'run', '--dry_run'), runner=FakeRunner(), out=out) == 0
  assert not os.path.exists(root)
  assert 'dry run: 4 of 4 runs pending' in out.getvalue()
  bad = ['--config', VIT, '--recipes', 'srste', '--nm', '2:4', '--root', root, '--extra', 'foo=1']
  assert sweep.main(bad, out=io.StringIO()) == 2  # Validated against the real config file.
  assert "Unknown config argument 'foo'" in capsys.readouterr().err
  assert sweep.main(bad[:-2] + ['--nm', '3:2'], out=io.StringIO()) == 2
  assert "'3:2' is not of the form N:M" in capsys.readouterr().err


# ----------------------------------------------------------------------------- tables

def test_rows_go_in_the_papers_recipe_order_then_by_run_length():
  rows = [('srste', 'epochs15_diagnostics_points60'), ('srste', 'epochs5_diagnostics_points60'),
          ('mdgf-exp', 'epochs1'), ('srste', 'epochs1_flops_of_mdgf-exp'), ('srste', 'epochs1'), ('dense', '')]
  assert sorted(rows, key=tables.row_sort_key) == [
      ('dense', ''), ('srste', 'epochs1'), ('srste', 'epochs1_flops_of_mdgf-exp'),
      ('srste', 'epochs5_diagnostics_points60'), ('srste', 'epochs15_diagnostics_points60'), ('mdgf-exp', 'epochs1')]


def test_cell_mean_and_sample_std_by_hand():
  # 0.80, 0.82, 0.84 x 100: mean 82, sample std sqrt((4 + 0 + 4) / (3 - 1)) = 2.
  assert tables.format_cell([80.0, 82.0, 84.0]) == '82.00 ± 2.00 (3)'
  assert tables.format_cell([80.0]) == '80.00 (1)'
  assert tables.format_cell([]) == '—'
  mean, std, n = tables.summarize([90.0, 91.0])
  assert (mean, n) == (90.5, 2) and std == pytest.approx(0.5 ** 0.5)
  m = tables.choose_metric('classification')
  assert (m.key, m.scale, m.higher_is_better) == ('eval_accuracy', 100.0, True)
  m = tables.choose_metric('seq2seq')
  assert (m.key, m.scale) == ('eval_bleu', 1.0)
  m = tables.choose_metric('seq2seq', 'eval/perplexity')
  assert (m.key, m.scale, m.higher_is_better) == ('eval_perplexity', 1.0, False)


def make_sweep(root):
  """dense x3 (one failed), srste at 2:4 x3 and at 1:8 (finished, interrupted, missing)."""
  runs = by_name(sweep.make_runs(VIT, ['dense', 'srste'], ['2:4', '1:8'], [0, 1, 2], root))
  write_manifest(root, runs.values())
  for seed, acc in enumerate((0.80, 0.82, 0.84)):
    write_run(os.path.join(root, f'srste_nm2x4_s{seed}'), fake_config('srste', '2:4', seed),
              {'eval_accuracy': acc, 'step': 100})
  write_run(os.path.join(root, 'srste_nm1x8_s0'), fake_config('srste', '1:8', 0),
            {'eval_accuracy': 0.70, 'step': 100})
  write_run(os.path.join(root, 'srste_nm1x8_s1'), fake_config('srste', '1:8', 1),
            metrics=[{'step': 50, 'train/loss': 1.0}], checkpoints=[25, 50])
  for seed, acc in enumerate((0.90, 0.91)):
    write_run(os.path.join(root, f'dense_s{seed}'), fake_config('dense', '1:8', seed),
              {'eval_accuracy': acc, 'step': 100})
  write_run(os.path.join(root, 'dense_s2'), fake_config('dense', '1:8', 2), metrics=[{'step': 10}])
  with open(os.path.join(root, 'runs.jsonl'), 'w') as f:
    f.write(json.dumps({'name': 'dense_s2', 'status': 'failed', 'returncode': 1}) + '\n')


def test_tables_cells_missing_runs_and_csv_round_trip(tmp_path, capsys):
  root = str(tmp_path / 'sweep')
  make_sweep(root)
  assert tables.main(['--root', root, '--noflops']) == 0
  printed = capsys.readouterr().out
  with open(os.path.join(root, 'tables', 'results.md')) as f:
    md = f.read()
  assert md.strip() in printed
  assert '| recipe | 2:4 | 1:8 |' in md
  assert '| SR-STE | 82.00 ± 2.00 (3) | 70.00 (1) |' in md
  # Dense: 90, 91 -> 90.50 ± 0.71 (2), the same runs in both columns.
  assert '| Dense | 90.50 ± 0.71 (2) | 90.50 ± 0.71 (2) |' in md
  assert 'ddof = 1' in md
  assert 'Not in the table (3 run(s))' in md
  assert '`dense_s2` (Dense, no N:M, seed 2): failed: last attempt failed (exit 1)' in md
  assert '`srste_nm1x8_s1` (SR-STE, 1:8, seed 1): interrupted: latest checkpoint at step 50' in md
  assert '`srste_nm1x8_s2` (SR-STE, 1:8, seed 2): missing: no workdir' in md
  with open(os.path.join(root, 'tables', 'results.csv')) as f:
    rows = {(r['recipe'], r['nm']): r for r in csv.DictReader(f)}
  cell = rows[('srste', '2:4')]
  assert int(cell['n']) == 3
  assert (float(cell['mean']), float(cell['std'])) == (pytest.approx(82.0), pytest.approx(2.0))
  assert cell['values'] == '80;82;84' and cell['metric'] == 'eval_accuracy'
  assert cell['runs'] == 'srste_nm2x4_s0;srste_nm2x4_s1;srste_nm2x4_s2'
  assert (int(rows[('srste', '1:8')]['n']), rows[('srste', '1:8')]['std']) == (1, '')
  with open(os.path.join(root, 'tables', 'runs.csv')) as f:
    states = {r['name']: r['state'] for r in csv.DictReader(f)}
  assert states == {'dense_s0': 'finished', 'dense_s1': 'finished', 'dense_s2': 'failed',
                    'srste_nm2x4_s0': 'finished', 'srste_nm2x4_s1': 'finished',
                    'srste_nm2x4_s2': 'finished', 'srste_nm1x8_s0': 'finished',
                    'srste_nm1x8_s1': 'interrupted', 'srste_nm1x8_s2': 'missing'}


def test_tables_without_manifest_read_the_recipe_from_config_json(tmp_path):
  root = str(tmp_path / 'loose')
  for seed, bleu in enumerate((20.0, 22.0)):
    write_run(os.path.join(root, f'run{seed}'), fake_config('mdgf', '1:8', seed, task='seq2seq',
                                                             **{'decay.kind': 'linear'}),
              {'eval_bleu': bleu, 'eval_accuracy': 0.5, 'step': 100})
  text, results, _ = tables.render(tables.collect([root]), with_flops=False)
  # BLEU 20, 22: mean 21, sample std sqrt(2) = 1.41.
  assert '| MDGF-linear | 21.00 ± 1.41 (2) |' in text
  assert results[0]['recipe'] == 'mdgf-linear' and results[0]['metric'] == 'eval_bleu'


def load_config(arg):
  spec = importlib.util.spec_from_file_location('vit_fashion_mnist_for_test', VIT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_flops_columns_and_equal_flops_pairs_by_hand(tmp_path):
  """runlocal ViT mu/14 on 28 px: 4 patches, width 64, 4 blocks, MLP 256, GAP, 10 classes."""
  root = str(tmp_path / 'sweep')
  runs = sweep.make_runs(VIT, ['dense', 'srste'], ['1:8'], [0], root, extra='runlocal')
  runs += sweep.make_runs(VIT, ['dense'], ['1:8'], [0], root, extra='runlocal',
                          overrides=['config.total_steps=13'])
  write_manifest(root, runs)
  accs = {'dense_s0_runlocal': 0.60, 'srste_nm1x8_s0_runlocal': 0.55, 'dense_s0_runlocal_total_steps13': 0.58}
  for r in runs:
    config = load_config(r.arg)
    for item in r.overrides:
      key, value = item.split('=')
      config[key] = int(value)
    write_run(os.path.join(root, r.name), json.loads(config.to_json_best_effort()),
              {'eval_accuracy': accs[r.name], 'step': config.total_steps})
  records = tables.collect([root])
  flops = tables.flops_for(records)
  # Inference MACs per example: embedding 4 * 14*14*64; per block q, k, v, out 4 * 4 * 64*64,
  # MLP 2 * 4 * 64*256, attention 2 * 4^2 * 64; head 64*10.
  emb, qkvo, mlp, attn, head = 4 * 14 * 14 * 64, 4 * 4 * 64 * 64, 2 * 4 * 64 * 256, 2 * 16 * 64, 640
  dense_macs = emb + 4 * (qkvo + mlp + attn) + head
  assert dense_macs == 845440
  srste = flops['srste_nm1x8_s0_runlocal']
  assert srste['inference_macs'] == emb + 4 * (qkvo + mlp / 8 + attn) + head == 386688
  assert srste['dense_inference_macs'] == dense_macs
  assert flops['dense_s0_runlocal']['inference_macs'] == dense_macs
  # Training, 20 steps of batch 32: 2 dense steps (3 dense matmuls), 16 sparse + 2 fine-tune steps
  # with forward and input gradient of the MLP at 1/8 and its weight gradient dense (SR-STE).
  dense_step = 3 * dense_macs
  sparse_step = 3 * (dense_macs - 4 * mlp) + 4 * mlp * (2 / 8 + 1)
  assert srste['train_flops'] == pytest.approx(2 * 32 * (2 * dense_step + 18 * sparse_step))
  assert srste['ratio'] == pytest.approx((2 * dense_step + 18 * sparse_step) / (20 * dense_step))
  assert flops['dense_s0_runlocal']['ratio'] == 1.0
  assert flops['dense_s0_runlocal_total_steps13']['train_flops'] == pytest.approx(2 * 32 * 13 * dense_step)
  text, results, _ = tables.render(records)
  assert '| SR-STE [runlocal] | 386.7 K MACs · x0.674 |' in text
  assert '| Dense [runlocal] | 845.4 K MACs · x1.000 |' in text
  assert '| Dense [runlocal_total_steps13] | 845.4 K MACs · x1.000 |' in text
  # 13 dense steps are 0.964 x the SR-STE run's FLOPs (within 5 %), 20 steps 1.48 x: one pair.
  # Dense steps at equal FLOPs: 20 * 0.6744 = 13.49 -> 13. Difference 55.00 - 58.00.
  assert ('| 1:8 | SR-STE [runlocal] | 55.00 (1) | 2.19 GFLOP | x0.674 | 13 | Dense [runlocal_total_steps13] '
          '(2.11 GFLOP) | 58.00 | -3.00 |') in text
  assert 'No equal-training-FLOPs pairs' not in text
  text, _, _ = tables.render(records, tolerance=0.01)
  assert 'none (closest Dense [runlocal_total_steps13]: x0.96 the FLOPs)' in text
  assert 'No equal-training-FLOPs pairs exist in this sweep' in text


def test_t5_tokens_and_attention_macs_by_hand():
  model = types.SimpleNamespace(num_heads=4, d_kv=16, num_encoder_layers=2, num_decoder_layers=3)
  config = ml_collections.ConfigDict({'model': {'name': 't5'}})
  batch = {'inputs': np.zeros((1, 24)), 'targets': np.zeros((1, 10))}
  tokens, extra = tables.token_accounting(config, model, batch)
  assert [tokens(p) for p in ('encoder/layers_0/mlp/wo/kernel', 'decoder/layers_1/self_attention/k/kernel',
                              'decoder/layers_1/encoder_decoder_attention/q/kernel',
                              'decoder/layers_1/encoder_decoder_attention/k/kernel',
                              'decoder/layers_1/encoder_decoder_attention/v/kernel',
                              'decoder/logits_dense/kernel')] == [24, 10, 10, 24, 24, 10]
  # Per layer, h * d_kv = 64: encoder 2 * 24^2 * 64; decoder 2 * 10^2 * 64 + 2 * 10 * 24 * 64.
  assert extra == 2 * 2 * 24 * 24 * 64 + 3 * (2 * 10 * 10 * 64 + 2 * 10 * 24 * 64)
  with pytest.raises(NotImplementedError, match='vit and t5 only'):
    tables.token_accounting(ml_collections.ConfigDict({'model': {'name': 'swinv2'}}), model, batch)


# ----------------------------------------------------------------------------- figures

def test_schedule_curves_and_seed_mean_by_hand():
  lin = nmsparse.recipe_config('mdgf', dense_frac=0.1, finetune_frac=0.1,
                               **{'decay.kind': 'linear', 'decay.rate': 0.01})
  steps, a, d = figures.schedule_curves(lin, 100, '2:4')
  assert list(steps) == list(range(100))
  # Dense until step 10, then a = 1 - 0.01 (step - 10), fine-tune from step 90 (a = 0).
  assert (a[0], a[10], a[30], a[95]) == (1.0, 1.0, pytest.approx(0.8), 0.0)
  assert (d[5], d[10], d[95]) == (1.0, 0.5, 0.5)
  sdgf = nmsparse.recipe_config('sdgf', dense_frac=0.1, finetune_frac=0.1)
  _, a, d = figures.schedule_curves(sdgf, 100, '1:8')
  # Stepwise 7:8, 4:8, 2:8, 1:8 over the 80 sparse steps: stages start at 10, 30, 50, 70.
  assert [d[i] for i in (9, 10, 29, 30, 50, 70, 99)] == [1.0, 7 / 8, 7 / 8, 0.5, 0.25, 0.125, 0.125]
  assert a[9] == 1.0 and a[10] == 0.0
  steps, mean, count = figures.seed_mean([([1, 2], [1.0, 3.0]), ([1, 2, 3], [3.0, 5.0, 7.0])])
  assert list(steps) == [1, 2, 3] and list(mean) == [2.0, 4.0, 7.0] and list(count) == [2, 2, 1]


def test_step_switch_is_read_from_the_logged_phase(tmp_path):
  # A row at step s logs the phase of step s - 1: phase 0 at 10, 1 at 20 -> switch at step 19.
  write_run(str(tmp_path), metrics=[{'step': 10, 'sparsity/phase': 0.0}, {'step': 15, 'train/loss': 1.0},
                                    {'step': 20, 'sparsity/phase': 1.0}, {'step': 30, 'sparsity/phase': 2.0}])
  assert tables.step_switch(str(tmp_path)) == 19
  write_run(str(tmp_path / 'dense_only'), metrics=[{'step': 10, 'sparsity/phase': 0.0}])
  assert tables.step_switch(str(tmp_path / 'dense_only')) is None


def diag_rows(total, noise):
  rows = []
  for step in range(1, total + 1, 10):
    row = {'step': step, 'time': 0.0, 'train/loss': 1.0, 'sparsity/phase': float(step > 10),
           'sparsity/decay': 1.0 if step <= 10 else 0.0, 'sparsity/density': 1.0 if step <= 10 else 0.5,
           'sparsity/mask_flip_rate': 0.01 / step, 'grad/kept_grad_norm': 1.0 + step / 100,
           'grad/pruned_grad_norm': 0.5, 'grad/kept_grad_rms': 0.01, 'grad/pruned_grad_rms': 0.005}
    if noise:
      row.update({'grad/kept_grad_noise_ratio': 2.0, 'grad/pruned_grad_noise_ratio': 4.0})
    rows.append(row)
  return rows


def test_figures_write_png_files(tmp_path, capsys):
  root = str(tmp_path / 'sweep')
  runs = sweep.make_runs(VIT, ['dense', 'srste', 'mdgf-linear', 'sdgf-stepwise', 'step'], ['2:4', '1:8'],
                         [0, 1], root)
  write_manifest(root, runs)
  kw = {'mdgf-linear': {'decay.kind': 'linear'}, 'sdgf-stepwise': {'structure.kind': 'stepwise'}}
  for i, r in enumerate(runs):
    recipe = sweep.VARIANTS[r.variant]['recipe']
    write_run(os.path.join(root, r.name), fake_config(recipe, r.nm or '1:8', r.seed, **kw.get(r.variant, {})),
              {'eval_accuracy': 0.5 + 0.01 * i, 'step': 100}, diag_rows(100, noise=r.seed == 0))
  assert figures.main(['--root', root, '--out', str(tmp_path / 'figs')]) == 0
  paths = capsys.readouterr().out.split()
  names = sorted(os.path.basename(p) for p in paths)
  assert names == sorted(f'vit_fashion_mnist_{k}.png' for k in (
      'metric_vs_sparsity', 'schedules_nm2x4', 'schedules_nm1x8', 'dynamics_nm2x4', 'dynamics_nm1x8'))
  for p in paths:
    with open(p, 'rb') as f:
      assert f.read(8) == PNG_MAGIC
    assert os.path.getsize(p) > 20_000, p


def test_legend_labels_leave_out_a_setting_every_curve_shares():
  rows = [('mdgf-exp', 'varianttiny_steps400'), ('srste', 'varianttiny_steps400')]
  common = tables.common_setting(rows)
  assert common == 'varianttiny_steps400'
  assert tables.row_label(rows[0], common) == 'MDGF-exponential'
  assert figures._setting(common) == '\nsetting: varianttiny_steps400'  # Once, in the title.
  mixed = [('srste', 'epochs1'), ('srste', 'epochs5')]
  assert tables.common_setting(mixed) is None
  assert [tables.row_label(r, None) for r in mixed] == ['SR-STE [epochs1]', 'SR-STE [epochs5]']


def test_match_flops_gives_the_length_of_equal_training_flops(tmp_path):
  # SR-STE prunes the forward after a 10 % dense warm-up, MDGF-exponential keeps most of it dense:
  # at equal training FLOPs SR-STE trains longer. The chosen length is the best integer: one step
  # more or less moves its FLOPs further from MDGF's 20-step run.
  runs = sweep.make_runs(VIT, ['srste', 'dense'], ['1:16'], [0], str(tmp_path), extra='runlocal=True')
  with pytest.raises(ValueError, match='dense_s0_runlocalTrue is dense'):
    sweep.match_flops(runs, 'mdgf-exp', 'runlocal=True')
  (run,) = sweep.match_flops(runs[:1], 'mdgf-exp', 'runlocal=True')
  assert run.name == 'srste_nm1x16_s0_runlocalTrue_flops_of_mdgf-exp' and run.workdir.endswith(run.name)
  steps = int(run.overrides[-1].removeprefix('total_steps='))
  config = sweep.build_config(run)
  assert config.total_steps == steps > 20
  ref = sweep.build_config(sweep.make_runs(VIT, ['mdgf-exp'], ['1:16'], [0], str(tmp_path), extra='runlocal=True')[0])
  target = tables.run_flops(ref.to_dict(), 20)['train_flops']
  flops = {s: tables.run_flops(config.to_dict(), s)['train_flops'] for s in (steps - 1, steps, steps + 1)}
  assert abs(flops[steps] - target) <= min(abs(flops[steps - 1] - target), abs(flops[steps + 1] - target))
  assert abs(flops[steps] / target - 1) < 0.05
  with pytest.raises(ValueError, match='STEP'):
    sweep.match_flops(runs[:1], 'step', 'runlocal=True')


def test_init_from_pairs_each_run_with_its_own_finished_pretraining_run(tmp_path):
  pre = str(tmp_path / 'pre')
  source = sweep.make_runs(VIT, ['dense', 'srste'], ['1:16'], [0, 1], pre, extra='epochs=1')
  write_manifest(pre, source)
  for run in source:
    write_run(sweep.run_path(run), final={'accuracy': 0.5} if run.seed == 0 else None, checkpoints=[3])
  fine = sweep.make_runs(VIT, ['dense', 'srste'], ['1:16'], [0], str(tmp_path / 'ft'), extra='epochs=2')
  out = sweep.init_from_runs(fine, pre)
  assert [r.name for r in out] == ['dense_s0_epochs2_from_pre', 'srste_nm1x16_s0_epochs2_from_pre']
  # Each run loads its own recipe's and seed's model, not another's.
  assert out[1].overrides[-1] == f'init_from.path={source[1].workdir}' and source[1].name == 'srste_nm1x16_s0_epochs1'
  assert out[0].overrides[-1].endswith('/dense_s0_epochs1')
  assert sweep.build_config(out[1]).init_from.path == source[1].workdir
  # Seed 1's pretraining has checkpoints but no final metrics: refused, not loaded half-trained.
  seed1 = sweep.make_runs(VIT, ['srste'], ['1:16'], [1], str(tmp_path / 'ft'), extra='epochs=2')
  with pytest.raises(ValueError, match='srste_nm1x16_s1_epochs1 is interrupted, not finished.*wait for it'):
    sweep.init_from_runs(seed1, pre)
  with pytest.raises(ValueError, match='no run of srste 1:32 seed 0'):
    sweep.init_from_runs(sweep.make_runs(VIT, ['srste'], ['1:32'], [0], str(tmp_path / 'ft')), pre)
  # Two settings of the same cell in the source: ambiguous until --init_setting names one.
  write_manifest(pre, sweep.make_runs(VIT, ['srste'], ['1:16'], [0], pre, extra='epochs=3'))
  with pytest.raises(ValueError, match="settings 'epochs1', 'epochs3'.*--init_setting"):
    sweep.init_from_runs(fine[1:], pre)
  assert sweep.init_from_runs(fine[1:], pre, 'epochs1')[0].overrides == out[1].overrides
  with pytest.raises(ValueError, match='no sweep manifest'):
    sweep.init_from_runs(fine, str(tmp_path / 'nowhere'))


def test_a_section_of_several_model_variants_names_them_all():
  rec = lambda variant: types.SimpleNamespace(config=dict(fake_config(), model={'name': 'vit', 'variant': variant}))
  assert tables.describe_runs([rec('mu/7')], 'x') == 'vit mu/7 on fake_data (classification)'
  assert tables.describe_runs([rec('mu/7'), rec('tiny/7'), rec('mu/7')], 'x') == \
      'vit mu/7, tiny/7 on fake_data (classification)'
  assert tables.describe_runs([types.SimpleNamespace(config=None)], 'fallback') == 'fallback'


def test_manifest_update_rereads_the_file_so_side_by_side_sweeps_keep_both(tmp_path):
  root = str(tmp_path)
  a = sweep.make_runs(VIT, ['srste'], ['1:16'], [0], root)
  b = sweep.make_runs(VIT, ['mdgf-exp'], ['1:16'], [0], root)
  stale = sweep.load_manifest(root)  # What sweep B read before sweep A wrote.
  sweep.update_manifest(root, a)
  sweep.merge_manifest(stale, b)     # B's early check passes on its stale copy...
  sweep.update_manifest(root, b)     # ...and its write keeps A's run.
  assert sorted(sweep.load_manifest(root)['runs']) == ['mdgf-exp_nm1x16_s0', 'srste_nm1x16_s0']
  clash = [dataclasses.replace(a[0], arg=a[0].arg + ',epochs=2')]
  with pytest.raises(ValueError, match='already in the manifest with another command'):
    sweep.update_manifest(root, clash)


def test_a_run_locked_by_another_sweep_or_finished_meanwhile_is_not_run_again(tmp_path):
  import fcntl
  root = str(tmp_path / 'sweep')
  runs = sweep.make_runs(VIT, ['dense', 'srste'], ['2:4'], [0], root)
  busy = sweep.run_path(runs[0])
  os.makedirs(busy)
  held = open(os.path.join(busy, sweep.RUN_LOCK), 'w')  # Another sweep process is running dense_s0.
  fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)

  class FinishesTheNextOne(FakeRunner):  # While srste runs, a side-by-side sweep finishes dense_s1.
    def __call__(self, argv, **kw):
      write_run(sweep.run_path(later[0]), final={'eval_accuracy': 0.5, 'step': 10})
      return super().__call__(argv, **kw)

  later = sweep.make_runs(VIT, ['dense'], ['2:4'], [1], root)
  runner, out = FinishesTheNextOne(), io.StringIO()
  records = sweep.execute(runs + later, root, runner=runner, python='py', clock=Clock(), out=out)
  assert [c[4].rsplit('/', 1)[1] for c in runner.calls] == ['srste_nm2x4_s0']  # Neither dense run.
  assert [(r['name'], r['status']) for r in records] == [('dense_s0', 'busy'), ('srste_nm2x4_s0', 'ok')]
  text = out.getvalue()
  assert 'dense_s0: skipped, another sweep process is running it' in text
  assert '[2/3] srste_nm2x4_s0: start | ETA unknown' in text  # Not "0s" from the skipped run.
  assert '[2/3] srste_nm2x4_s0: ok in 5s | 1 ok, 0 not, 1 left' in text  # The skipped run is no failure.
  assert 'did not finish' not in text
  assert '1 run(s) left to the other sweep process(es) that hold them: dense_s0' in text
  assert 'dense_s1: finished meanwhile (skipped)' in text
  assert [a['name'] for a in sweep.read_jsonl(os.path.join(root, 'runs.jsonl'))] == ['srste_nm2x4_s0']
  held.close()  # Released: the next sweep runs it.
  runner2 = FakeRunner()
  sweep.execute(runs, root, runner=runner2, python='py', clock=Clock(), out=io.StringIO())
  assert [c[4].rsplit('/', 1)[1] for c in runner2.calls] == ['dense_s0']


def test_validate_checks_every_runs_config_with_its_set_values_before_any_run(tmp_path):
  root = str(tmp_path / 'sweep')
  good = sweep.make_runs(VIT, ['sdgf-stepwise'], ['1:16'], [0], root,
                         overrides=['config.sparsity.recipe.finetune_frac=0.3'])
  sweep.validate(good)
  bad_value = sweep.make_runs(VIT, ['sdgf-stepwise'], ['1:16'], [0], root,
                              overrides=['config.sparsity.recipe.sdgf_inner=srste'])
  with pytest.raises(ValueError, match='sdgf-stepwise_nm1x16_s0_sdgf_innersrste: config.sparsity.recipe: '
                                       '.*sdgf_inner=.srste.; choose "ste" or "mdgf"'):
    sweep.validate(bad_value)
  no_key = sweep.make_runs(VIT, ['srste'], ['1:16'], [0], root, overrides=['config.sparsity.recipe.lam=1e-3'])
  with pytest.raises(ValueError, match="has no key 'sparsity.recipe.lam'"):
    sweep.validate(no_key)


def test_flops_of_a_config_this_code_cannot_rebuild_is_named_not_guessed():
  # A config.json of another schema (no model section): its FLOPs are an error the table names.
  config = {'task': 'classification', 'batch_size': 8, 'sparsity': {}}
  record = tables.Record(name='old', workdir='/nonexistent', variant='srste', nm='1:8', seed=0, setting='',
                         section='vit', state='finished', detail='', config=config,
                         final={'step': 10, 'eval_accuracy': 0.5})
  [(name, entry)] = tables.flops_for([record]).items()
  assert name == 'old' and set(entry) == {'error'} and "'model'" in entry['error']
