"""experiments/hlo_bytes.py on a hand-written HLO module whose traffic is counted by hand."""

import gzip

import pytest

from experiments import hlo_bytes

# f32[4,8] is 128 bytes, bf16[4,8] 64. The fused computation's add reads and writes nothing
# of its own (it runs inside the fusion); the copy pair moves `a` into memory space 1.
MODULE = """HloModule m, is_scheduled=true

%fused_computation (p0: f32[4,8], p1: f32[4,8]) -> f32[4,8] {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[4,8]{1,0} parameter(1)
  ROOT %add.1 = f32[4,8]{1,0} add(%p0, %p1)
}

%region_0.1 (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %add.2 = f32[] add(%x, %y)
}

ENTRY %main (a: f32[4,8], b: bf16[4,8]) -> (f32[4,8], f32[]) {
  %a = f32[4,8]{1,0:T(8,128)} parameter(0)
  %b = bf16[4,8]{1,0} parameter(1)
  %convert.1 = f32[4,8]{1,0} convert(%b), metadata={op_name="jit(f)/Model/block_3/convert_element_type"}
  %copy-start.1 = (f32[4,8]{1,0:S(1)}, f32[4,8]{1,0}, u32[]) copy-start(%a)
  %copy-done.1 = f32[4,8]{1,0:S(1)} copy-done(%copy-start.1)
  %fusion.1 = f32[4,8]{1,0} fusion(%copy-done.1, %convert.1), kind=kLoop, calls=%fused_computation, metadata={op_name="jit(f)/Model/block_7/add"}
  %zero = f32[] constant(0)
  %reduce.1 = f32[] reduce(%fusion.1, %zero), dimensions={0,1}, to_apply=%region_0.1, metadata={op_name="jit(f)/Model/reduce_sum"}
  ROOT %tuple.1 = (f32[4,8]{1,0}, f32[]) tuple(%fusion.1, %reduce.1)
}
"""


def test_shape_bytes_by_memory_space():
  assert hlo_bytes.shape_bytes('f32[4,8]{1,0:T(8,128)}') == {0: 128}
  assert hlo_bytes.shape_bytes('(f32[4,8]{1,0:S(1)}, bf16[4,8]{1,0}, u32[])') == {1: 128, 0: 64 + 4}
  assert hlo_bytes.shape_bytes('pred[3,5]') == {0: 15}
  with pytest.raises(ValueError, match='unknown HLO element type'):
    hlo_bytes.shape_bytes('q7[3]')


def test_traffic_by_hand():
  t = hlo_bytes.traffic(MODULE)
  # HBM: convert reads 64 and writes 128; copy-start reads `a` (128); copy-done writes to
  # space 1 (0 in HBM); the fusion reads the convert (128) and writes 128 (its space-1 input
  # is not HBM); the reduce reads the fusion (128) and the zero (4) and writes 4. The parameters, the
  # constant, the tuple and the instructions inside the fusion and the reducer move nothing.
  assert t['op'] == {'Model/block_*/convert_element_type': 192, '[copy of] ?': 128,
                     'Model/block_*/add': 256, 'Model/reduce_sum': 136}
  assert t['opcode'] == {'convert': 192, 'copy-start': 128, 'copy-done': 0, 'fusion': 256, 'reduce': 136}
  assert t['space'] == {'HBM': 192 + 128 + 256 + 136, 'S(1)': 128 + 128}
  assert t['kind'] == {'compute': 192 + 256 + 136, 'staging': 128}
  assert [hlo_bytes.kind(o) for o in ('all-reduce-start', 'all-gather', 'slice-start', 'copy', 'fusion')] == [
      'collective', 'collective', 'staging', 'compute', 'compute']
  every = hlo_bytes.traffic(MODULE, spaces=None)
  assert every['op']['Model/block_*/add'] == 256 + 128 and every['opcode']['copy-done'] == 128


def test_report_compares_two_files(tmp_path):
  a = tmp_path / 'a.hlo.txt.gz'
  with gzip.open(a, 'wt') as f:
    f.write(MODULE)
  b = tmp_path / 'b.hlo.txt'
  # The convert writes 128 bytes more, and the fusion reads them.
  b.write_text(MODULE.replace('%convert.1 = f32[4,8]', '%convert.1 = f32[8,8]'))
  text = hlo_bytes.report([str(a), str(b)], top=5, depth=None)
  assert 'B/A 1.360' in text  # (712 + 256) / 712
  assert hlo_bytes.step_bytes(hlo_bytes.traffic(MODULE)) == {'': 712}
  ops = text.split('    op\n')[1].splitlines()
  assert {r.split()[-1] for r in ops[:2]} == {'Model/block_*/convert_element_type', 'Model/block_*/add'}


def test_normalise_folds_layers_and_keeps_depth():
  name = 'jit(step_fn)/transpose(jvp(T5))/T5.encode/encoder/layers_11/mlp/wi_0/dot_general'
  assert hlo_bytes.normalise(name) == 'transpose(jvp(T5))/T5.encode/encoder/layers_*/mlp/wi_0/dot_general'
  assert hlo_bytes.normalise(name, depth=3) == 'transpose(jvp(T5))/T5.encode/dot_general'
  assert hlo_bytes.normalise('[copy of] jit(f)/stage_2/blocks_0/add') == '[copy of] stage_*/blocks_*/add'
  merged = '[fusion of] jit(f)/(layers_0/mlp/reduce_sum:layers_1/mlp/reduce_sum:head/add)'
  assert hlo_bytes.normalise(merged) == '[fusion of] layers_*/mlp/reduce_sum (+2 merged)'


COND = """HloModule c

%branch_a (pa: f32[16]) -> f32[16] {
  %pa = f32[16]{0} parameter(0)
  ROOT %neg.1 = f32[16]{0} negate(%pa), metadata={op_name="jit(f)/cond/branch_0_fun/neg"}
}

%branch_b (pb: f32[16]) -> f32[16] {
  %pb = f32[16]{0} parameter(0)
  %exp.1 = f32[16]{0} exponential(%pb), metadata={op_name="jit(f)/cond/branch_1_fun/exp"}
  ROOT %exp.2 = f32[16]{0} exponential(%exp.1), metadata={op_name="jit(f)/cond/branch_1_fun/exp"}
}

ENTRY %main (i: s32[], x: f32[16]) -> f32[16] {
  %i = s32[] parameter(0)
  %x = f32[16]{0} parameter(1)
  ROOT %conditional.1 = f32[16]{0} conditional(%i, %x, %x), branch_computations={%branch_a, %branch_b}
}
"""


def test_conditional_branches_are_named_apart():
  """A branch's rows carry its conditional and index: 64 + 64 bytes for the negate, two
  exponentials of 128 each; the conditional itself moves nothing of its own."""
  t = hlo_bytes.traffic(COND)
  assert t['op'] == {'<conditional.1#0> cond/branch_0_fun/neg': 128,
                     '<conditional.1#1> cond/branch_1_fun/exp': 256}
  assert hlo_bytes.step_bytes(t) == {'#0': 128, '#1': 256}
