"""scripts/tpu_plan.py: the grid issue 12 asks for, and its tables from per-cell JSON files."""

import importlib
import json
import os
import re
import threading
import time

import pytest

from scripts import tpu_plan

time_sleep = time.sleep  # The real one: the runner's polling sleep is shortened in a test.


def test_grid_covers_every_setting_recipe_and_generation():
  cells = tpu_plan.cells(gpu=False)
  names = {(c.model, c.recipe, c.nm, c.layers, c.topology) for c in cells}
  assert len(names) == len(cells)  # No cell twice.
  for model, presets in (('vit', ('mlp', 'mlp_qkv')), ('swinv2', ('mlp', 'mlp_qkv')), ('t5', ('all',))):
    for recipe in ('ste', 'srste', 'mdgf', 'sdgf', 'mdgf_sdgf', 'step'):
      for layers in presets:
        assert (model, recipe, '1:16', layers, 'v4:2x2x4') in names
    assert (model, 'mdgf', '2:4', presets[0], 'v4:2x2x4') in names
    for topology in ('v4:2x2x4', 'v5e:4x8'):
      assert (model, 'dense', '1:16', presets[0], topology) in names
    assert (model, 'mdgf', '1:16', presets[0], 'v5e:4x8') in names
  # 3 models x (dense + 6 recipes x presets + MDGF 2:4) on v4, and 2 cells each on v5e.
  assert len(cells) == (1 + 12 + 1) * 2 + (1 + 6 + 1) + 3 * 2
  with_gpu = tpu_plan.cells(gpu=True)
  assert len(with_gpu) == len(cells) + (1 + 12 + 1) * 2 + (1 + 6 + 1)
  # Every program (train, diagnostics, eval) for ViT's dense and MDGF 1:16 on each slice; the
  # eval step beside the train step for the others (their diagnostics compile is too long here).
  full = {(c.model, c.recipe, c.topology) for c in cells if c.programs == tpu_plan.PROGRAMS}
  assert full == {('vit', r, t) for r in ('dense', 'mdgf') for t in ('v4:2x2x4', 'v5e:4x8')}
  assert all('eval' in c.programs for c in cells if c.recipe in ('dense', 'mdgf') and c.nm == '1:16'
             and c.layers in ('mlp', 'all'))
  cmd = tpu_plan.Cell('vit', 'sdgf', '1:16', 'mlp_qkv', 'v4:2x2x4', ('train',)).command()
  assert '--config=configs/vit_imagenet.py:recipe=sdgf,nm=1:16,layers=mlp_qkv' in cmd
  assert '--topology=v4:2x2x4' in cmd and '--mode=compile' in cmd
  assert not any('mesh' in a for a in cmd)
  # SwinV2-B on v5e shards its state 8 ways (8.8 % headroom data parallel): in the command and the name.
  swin = [c for c in cells if c.model == 'swinv2' and c.topology == 'v5e:4x8']
  assert len(swin) == 2 and all(c.fsdp == 8 and c.name.endswith('_fsdp8') for c in swin)
  assert {'--config.mesh.fsdp=8', '--config.mesh.data=-1'} <= set(swin[0].command())
  assert all(c.fsdp == 1 for c in cells if c not in swin)


def _result(flops, nbytes, step_s, total_bytes, programs=('train',)):
  prog = dict(flops=flops, bytes_accessed=nbytes, step_s=step_s, bound='memory', total_bytes=total_bytes)
  return dict(chips=16, chip=dict(name='v4'), devices=32, mesh=dict(data=32, fsdp=1), per_device_batch=128.0,
              total_steps=1000,
              hbm_per_device_bytes=16e9, headroom=0.25, mfu=0.5, examples_per_s=1000.0,
              run_wall_s=7200.0, run_chip_hours=32.0, programs={p: prog for p in programs})


def test_table_ratios_to_dense_and_program_order():
  dense = tpu_plan.Cell('vit', 'dense', '1:16', 'mlp', 'v4:2x2x4', tpu_plan.PROGRAMS)
  ste = tpu_plan.Cell('vit', 'ste', '1:16', 'mlp', 'v4:2x2x4', ('train',))
  # JSON files store programs in sorted key order: diagnostics, eval, train.
  d = _result(100.0, 200.0, 0.010, 12e9, programs=('diagnostics', 'eval', 'train'))
  s = _result(101.0, 210.0, 0.0105, 11e9)
  text = tpu_plan.table({ste: s, dense: d})
  rows = [l for l in text.splitlines() if l.startswith('| dense') or l.startswith('| ste')]
  assert rows[0].startswith('| dense')  # Dense first whatever the dict order.
  cols = [c.strip() for c in rows[1].strip('|').split('|')]
  # FLOPs 101 / 100, bytes 210 / 200, time 10.5 / 10 ms: by hand.
  assert cols[-4:] == ['1.0100', '1.0500', '1.0500', '-']  # No HLO count in these results.
  assert cols[3] == '32 x 1' and cols[4] == '11.00' and cols[7] == '10.5'  # mesh, HBM GB, step ms.
  assert [c.strip() for c in rows[0].strip('|').split('|')][6] == 't+d+e'
  d['programs']['train'] = dict(d['programs']['train'], hlo_hbm_bytes=80.0)
  s['programs']['train'] = dict(s['programs']['train'], hlo_hbm_bytes=81.0)
  rows = [l for l in tpu_plan.table({ste: s, dense: d}).splitlines() if l.startswith('| ste')]
  assert rows[0].strip('|').split('|')[-1].strip() == '1.0125'  # 81 / 80
  # A step with a conditional (STEP's AutoSwitch): the range over its branches.
  s['programs']['train'].update(hlo_hbm_bytes=84.0, hlo_hbm_bytes_by_branch={'0': 84.0, '1': 81.0})
  rows = [l for l in tpu_plan.table({ste: s, dense: d}).splitlines() if l.startswith('| ste')]
  assert rows[0].strip('|').split('|')[-1].strip() == '1.0125-1.0500'  # 81 / 80 and 84 / 80


def test_write_replaces_only_the_marked_tables(tmp_path, monkeypatch):
  monkeypatch.setattr(tpu_plan, 'ROOT', str(tmp_path))
  (tmp_path / 'results').mkdir()
  doc = tmp_path / tpu_plan.DOC
  doc.write_text(f'intro\n{tpu_plan.BEGIN}\nold table\n{tpu_plan.END}\nanalysis\n')
  monkeypatch.setattr(tpu_plan, 'load', lambda: {})
  assert tpu_plan.main(['--mode', 'table', '--write']) == 0
  text = doc.read_text()
  assert text.startswith('intro\n') and text.endswith(f'{tpu_plan.END}\nanalysis\n')
  assert 'old table' not in text
  doc.write_text('no markers\n')
  with pytest.raises(SystemExit, match='markers'):
    tpu_plan.main(['--mode', 'table', '--write'])


def test_run_order_puts_what_matters_most_first():
  order = sorted(tpu_plan.cells(gpu=True), key=tpu_plan.priority)
  first = {'vit': 'mlp', 'swinv2': 'mlp', 't5': 'all'}
  main = lambda c: c.recipe in ('dense', 'mdgf') and c.nm == '1:16' and c.layers == first[c.model]
  # v4: dense and MDGF 1:16 of every model before anything else.
  assert all(main(c) and c.topology == 'v4:2x2x4' for c in order[:6])
  pos = {c: i for i, c in enumerate(order)}
  v4_first = [pos[c] for c in order if c.topology == 'v4:2x2x4' and c.layers == first[c.model]]
  v5e = [pos[c] for c in order if c.topology == 'v5e:4x8']
  v4_second = [pos[c] for c in order if c.topology == 'v4:2x2x4' and c.layers != first[c.model]]
  gpu = [c for c in order if c.topology == 'h100:8']
  assert max(v4_first) < min(v5e) and max(v5e) < min(v4_second) and max(v4_second) < pos[gpu[0]]
  assert {(c.model, c.recipe) for c in gpu[:6]} == {(m, r) for m in first for r in ('dense', 'mdgf')}
  assert all(c.nm == '1:16' for c in gpu[:6])
  # Within a stage, recipe by recipe with every model in turn (a stopped grid has each model).
  ste = [c.model for c in order if c.recipe == 'ste' and c.topology == 'v4:2x2x4' and c.layers == first[c.model]]
  assert ste == ['vit', 'swinv2', 't5'] and order[6].recipe == 'ste'


def test_run_keeps_concurrent_compiles_within_host_memory(monkeypatch, tmp_path):
  """Two T5 compiles beside a ViT-B/16 diagnostics compile were killed on a 24 GB machine:
  with 20.5 GiB to share, a T5 or SwinV2 cell (18 GiB) runs alone, ViT SDGF (14 GiB) only beside a
  ViT train step (4 GiB), other ViT cells two at a time."""
  grid = [tpu_plan.Cell(m, r, '1:16', l, 'v4:2x2x4', p) for m, r, l, p in (
      ('vit', 'dense', 'mlp', tpu_plan.PROGRAMS), ('t5', 'dense', 'all', ('train', 'eval')),
      ('vit', 'ste', 'mlp', ('train',)), ('t5', 'ste', 'all', ('train',)),
      ('vit', 'sdgf', 'mlp', ('train',)), ('swinv2', 'ste', 'mlp', ('train',)),
      ('vit', 'mdgf_sdgf', 'mlp_qkv', ('train',)), ('vit', 'srste', 'mlp', ('train',)))]
  monkeypatch.setattr(tpu_plan, 'ROOT', str(tmp_path))
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(tpu_plan, 'cells', lambda gpu=True: list(grid))
  monkeypatch.setattr(tpu_plan, 'host_budget_gib', lambda: 20.5)
  lock, running, seen = threading.Lock(), [], []

  def fake_run_cell(cell, python):
    with lock:
      running.append(cell)
      seen.append(tuple(running))
    time_sleep(0.05)
    with lock:
      running.remove(cell)
    return cell, 0, 0.05

  monkeypatch.setattr(tpu_plan, 'run_cell', fake_run_cell)
  monkeypatch.setattr(tpu_plan.time, 'sleep', lambda s: time_sleep(min(s, 0.01)))
  assert tpu_plan.run(jobs=2, python='python') == 0
  assert len(seen) == len(grid)  # Every cell ran once.
  for running_now in seen:  # 18 GiB + anything > 20.5 GiB; 14 + 7 too; 14 + 4 and 7 + 4 fit.
    assert sum(tpu_plan.host_gib(c) for c in running_now) <= 20.5 or len(running_now) == 1, seen
    models = {c.model for c in running_now}
    assert len(running_now) == 1 or not models & {'t5', 'swinv2'}, seen
    assert sum(c.recipe in ('sdgf', 'mdgf_sdgf') for c in running_now) <= 1, seen
  assert any(len(running_now) == 2 for running_now in seen), seen  # The second worker is used.


@pytest.mark.parametrize('model', ['vit', 'swinv2', 't5'])
def test_config_docstrings_quote_the_compiled_plan(model):
  """The paper configs' "Hardware" lines quote results/tpu_plan/: dense on v4-32, its HBM per
  device, the device's HBM, the headroom, the roofline step time and chip-hours; ViT-B/16 also
  MDGF 1:16's HBM. A recompiled cell that moves them fails here until the docstring follows."""
  config_file, presets, _ = tpu_plan.MODELS[model]
  doc = importlib.import_module(config_file[:-3].replace('/', '.')).__doc__
  doc = ' '.join(doc.split())  # Lines joined.

  def load(recipe):
    cell = tpu_plan.Cell(model, recipe, '1:16', presets[0], tpu_plan.PRIMARY, tpu_plan.PROGRAMS)
    with open(os.path.join(tpu_plan.ROOT, cell.json_path)) as f:
      return json.load(f)

  dense = load('dense')
  need = max(p['total_bytes'] for p in dense['programs'].values())
  quoted = (f'{need / 1e9:.2f} GB of a device\'s {dense["hbm_per_device_bytes"] / 1e9:.2f} GB '
            f'({dense["headroom"] * 100:.0f} % headroom')
  assert quoted in doc, (quoted, doc)
  assert re.search(rf'roofline is {dense["programs"]["train"]["step_s"] * 1e3:.0f} ms', doc), doc
  assert f'{dense["run_chip_hours"]:.0f} chip-hours' in doc, doc
  if model == 'vit':
    mdgf = load('mdgf')
    assert f'MDGF 1:16: {max(p["total_bytes"] for p in mdgf["programs"].values()) / 1e9:.2f} GB' in doc, doc
