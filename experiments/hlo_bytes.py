r"""Which source op moves the bytes: HBM traffic of a compiled program, attributed by op name.

    python -m experiments.hlo_bytes WORKDIR/train_v4_2x2x4.hlo.txt.gz              # one program
    python -m experiments.hlo_bytes DENSE.hlo.txt.gz SPARSE.hlo.txt.gz --top 25    # what B adds to A

``--mode=compile`` writes each program's optimised HLO next to its JSON. Every
instruction the device runs (a fusion, a matmul, a copy, a collective; not the ops
inside a fusion) reads its operands from HBM and writes its result there; this script
counts those bytes (logical sizes, no tile padding) and sums them by the JAX op name in
the instruction's metadata, with layer indices folded (``encoderblock_7`` ->
``encoderblock_*``), so that the line a recipe adds, or a copy XLA inserted, is named.
XLA's own ``bytes accessed`` is close to this total but not equal (it pads to tiles and
counts a fusion's sliced reads exactly); the attribution, not the total, is the point.
Instructions in loop bodies are counted once, not per trip. A conditional runs one of its
branches: their rows are prefixed ``<conditional#branch>`` so that each can be read
alone, and the totals count every branch.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gzip
import os
import re
import sys
from typing import Collection

DTYPE_BYTES = {'pred': 1, 's4': 0.5, 'u4': 0.5, 's8': 1, 'u8': 1, 'f8e4m3fn': 1, 'f8e5m2': 1,
               'bf16': 2, 'f16': 2, 's16': 2, 'u16': 2, 'f32': 4, 's32': 4, 'u32': 4,
               'f64': 8, 's64': 8, 'u64': 8, 'c64': 8, 'c128': 16, 'token': 0}
# Instructions that move no data of their own.
FREE = {'parameter', 'get-tuple-element', 'tuple', 'constant', 'bitcast', 'after-all', 'partition-id',
        'replica-id', 'while', 'conditional', 'call', 'opt-barrier', 'iota'}

_ARRAY = re.compile(r'\b([a-z]+\d*(?:e\dm\d\w*)?)\[([\d,]*)\](\{[^}]*\})?')
_SPACE = re.compile(r'S\((\d+)\)')
_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%([\w.\-]+) = (.*)$')
_COMP = re.compile(r'^(ENTRY\s+)?%([\w.\-]+) ')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r'\b(calls|to_apply)=%([\w.\-]+)')
_BRANCHES = re.compile(r'branch_computations=\{([^}]*)\}')
_TRUE = re.compile(r'true_computation=%([\w.\-]+)')
_FALSE = re.compile(r'false_computation=%([\w.\-]+)')


@dataclasses.dataclass
class Instr:
  name: str
  computation: str
  opcode: str
  out_bytes: dict[int, float]  # By memory space.
  operands: list[str]
  op_name: str


def shape_bytes(shape: str) -> dict[int, float]:
  """Bytes of an HLO shape string (an array or a tuple of arrays) by memory space (0 is HBM;
  the layout's ``S(n)`` names another, such as on-chip memory), tile padding ignored."""
  total: dict[int, float] = collections.Counter()
  for dtype, dims, layout in _ARRAY.findall(shape):
    if dtype not in DTYPE_BYTES:
      raise ValueError(f'unknown HLO element type {dtype!r} in {shape[:80]!r}; add it to DTYPE_BYTES.')
    n = 1
    for d in filter(None, dims.split(',')):
      n *= int(d)
    space = _SPACE.search(layout or '')
    total[int(space.group(1)) if space else 0] += n * DTYPE_BYTES[dtype]
  return total


def _closing(s: str, start: int) -> int:
  """Index of the parenthesis that closes the one at ``s[start]``."""
  depth = 0
  for i in range(start, len(s)):
    if s[i] == '(':
      depth += 1
    elif s[i] == ')':
      depth -= 1
      if depth == 0:
        return i
  raise ValueError(f'unbalanced parentheses in {s[:120]!r}')


COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'collective-permute', 'all-to-all')


def kind(opcode: str) -> str:
  """``collective``; ``staging`` (the asynchronous copies and slices with which the compiler
  moves operands between memories ahead of use); or ``compute`` (fusions, matmuls, the rest)."""
  base = opcode.removesuffix('-start').removesuffix('-done')
  if base in COLLECTIVES:
    return 'collective'
  if base in ('copy', 'slice', 'dynamic-slice') and base != opcode:
    return 'staging'
  return 'compute'


def parse(text: str) -> tuple[list[Instr], set[str], dict[str, str]]:
  """Every instruction of an HLO module; the computations that run inside another op
  (fusion bodies, reducers), whose instructions touch no HBM of their own; and the branches
  of each conditional, named ``<conditional>#<branch index>``."""
  instrs, inner, branches = [], set(), {}
  computation = ''
  for line in text.splitlines():
    if not line.startswith(' '):
      m = _COMP.match(line)
      if m:
        computation = m.group(2)
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    name, rest = m.groups()
    if rest.startswith('('):
      end = _closing(rest, 0)
      shape, rest = rest[:end + 1], rest[end + 1:].lstrip()
    else:
      shape, _, rest = rest.partition(' ')
    paren = rest.find('(')
    opcode = rest[:paren]
    end = _closing(rest, paren)
    operands = re.findall(r'%([\w.\-]+)', rest[paren:end + 1])
    attrs = rest[end + 1:]
    for kind, callee in _CALLS.findall(attrs):
      if kind == 'to_apply' or opcode == 'fusion':
        inner.add(callee)
    if opcode == 'conditional':
      listed = _BRANCHES.search(attrs)
      callees = (re.findall(r'%([\w.\-]+)', listed.group(1)) if listed else
                 [m.group(1) for m in (_TRUE.search(attrs), _FALSE.search(attrs)) if m])
      branches.update({c: f'{name}#{k}' for k, c in enumerate(callees)})
    op = _OP_NAME.search(attrs)
    instrs.append(Instr(name, computation, opcode, shape_bytes(shape), operands, op.group(1) if op else ''))
  return instrs, inner, branches


def normalise(op_name: str, depth: int | None = None) -> str:
  """``jit(step_fn)/jvp(ViT)/Transformer/encoderblock_3/MlpBlock_0/Dense_0/dot_general`` ->
  ``jvp(ViT)/Transformer/encoderblock_*/MlpBlock_0/Dense_0/dot_general``."""
  prefix, _, rest = op_name.rpartition('] ')
  prefix = prefix + '] ' if prefix else ''
  rest = re.sub(r'^jit\([^)]*\)/', '', rest)
  if rest.startswith('(') and rest.endswith(')') and ':' in rest:  # A merged op's names (GPU).
    names = rest[1:-1].split(':')
    return prefix + normalise(names[0], depth) + f' (+{len(names) - 1} merged)'
  parts = rest.split('/')
  if parts and parts[0].startswith('jit('):
    parts = parts[1:]
  parts = [re.sub(r'(block|layers|layer|stage|blocks)_\d+', r'\1_*', p) for p in parts]
  if depth is not None and len(parts) > depth:
    parts = parts[:depth - 1] + [parts[-1]]
  return prefix + '/'.join(parts)


def traffic(text: str, depth: int | None = None, spaces: Collection[int] | None = (0,)
            ) -> dict[str, collections.Counter]:
  """Bytes moved by normalised op name, opcode, :func:`kind` and conditional branch (counting
  only ``spaces``; default: HBM, space 0; None: every space), and by memory space."""
  instrs, inner, branches = parse(text)
  by_name = {i.name: i for i in instrs}
  by_op, by_opcode, by_space = collections.Counter(), collections.Counter(), collections.Counter()
  by_branch = collections.Counter()  # '#k': branch k of every conditional; 'outside' them.
  by_kind = collections.Counter()
  for i in instrs:
    if i.computation in inner or i.opcode in FREE:
      continue
    moved = collections.Counter()
    if not i.opcode.endswith('-done'):  # An async pair: the start reads, the done writes.
      for o in i.operands:
        if o in by_name:
          moved.update(by_name[o].out_bytes)
    if not i.opcode.endswith('-start'):
      moved.update(i.out_bytes)
    by_space.update({f'S({k})' if k else 'HBM': v for k, v in moved.items()})
    counted = sum(v for k, v in moved.items() if spaces is None or k in spaces)
    name = i.op_name
    if not name:  # Copies and layout changes XLA inserted carry no op name: name them by their input.
      source = next((by_name[o] for o in i.operands if o in by_name), None)
      while source is not None and not source.op_name and source.operands:
        source = by_name.get(source.operands[0])
      name = f'[{i.opcode.removesuffix("-start").removesuffix("-done")} of] ' + (
          source.op_name if source is not None and source.op_name else '?')
    branch = f'<{branches[i.computation]}> ' if i.computation in branches else ''
    by_op[branch + normalise(name, depth)] += counted
    by_opcode[i.opcode] += counted
    by_kind[kind(i.opcode)] += counted
    by_branch['#' + branches[i.computation].rpartition('#')[2] if branch else 'outside'] += counted
  return dict(space=by_space, kind=by_kind, opcode=by_opcode, op=by_op, branch=by_branch)


def step_bytes(t: dict[str, collections.Counter]) -> dict[str, float]:
  """Bytes of one step: ``{'': total}`` without conditionals; with them, one entry per branch
  index k, the step in which every conditional takes its branch k."""
  outside = t['branch']['outside']
  taken = {k: outside + v for k, v in sorted(t['branch'].items()) if k != 'outside'}
  return taken or {'': outside}


def _read(path: str) -> str:
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rt') as f:
    return f.read()


def report(paths: list[str], top: int, depth: int | None, spaces: Collection[int] | None = (0,)) -> str:
  """The tables: one program's largest op names, or what the second adds to the first."""
  t = [traffic(_read(p), depth, spaces) for p in paths]
  lines = []
  gb = lambda x: f'{x / 1e9:9.3f}'  # noqa: E731
  def totals(x):
    return ', '.join(f'{v / 1e9:.3f} GB' + (f' (every conditional takes branch {k})' if k else '')
                     for k, v in step_bytes(x).items())

  if len(t) == 1:
    total = sum(t[0]['op'].values())
    lines.append(f'{paths[0]}: {totals(t[0])} moved per step in the spaces counted')
    for table in ('space', 'kind', 'opcode', 'branch', 'op'):
      if table == 'branch' and set(t[0][table]) == {'outside'}:
        continue
      lines.append(f'\n  GB        share  {table}')
      for key, v in sorted(t[0][table].items(), key=lambda kv: (-kv[1], kv[0]))[:top]:
        lines.append(f'  {gb(v)} {v / total:6.1%}  {key}')
    return '\n'.join(lines)
  a, b = t
  sa, sb = step_bytes(a), step_bytes(b)
  ta = max(sa.values())
  lines.append(f'A {paths[0]}: {totals(a)}\nB {paths[1]}: {totals(b)}')
  for k, tb in sb.items():
    lines.append(f'B/A {tb / ta:.3f}, B-A {(tb - ta) / 1e9:+.3f} GB' + (f' with branch {k}' if k else ''))
  for table in ('space', 'kind', 'opcode', 'branch', 'op'):
    keys = set(a[table]) | set(b[table])
    if table == 'branch' and keys == {'outside'}:
      continue
    diff = sorted(keys, key=lambda k: (-abs(b[table][k] - a[table][k]), k))[:top]  # Ties: by name, stable.
    lines.append(f'\n  A GB      B GB      B-A GB    {table}')
    for k in diff:
      lines.append(f'  {gb(a[table][k])} {gb(b[table][k])} {(b[table][k] - a[table][k]) / 1e9:+9.3f}  {k}')
  return '\n'.join(lines)


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('hlo', nargs='+', help='one or two *.hlo.txt[.gz] files written by --mode=compile')
  p.add_argument('--top', type=int, default=20, help='rows per table')
  p.add_argument('--depth', type=int, default=None,
                 help='keep this many components of the op name (the last one, the primitive, always)')
  p.add_argument('--spaces', default='0',
                 help='memory spaces counted in the opcode and op tables: 0 is HBM; "all", or e.g. 0,3')
  args = p.parse_args(argv)
  if len(args.hlo) > 2:
    p.error(f'give one HLO file, or two to compare; got {len(args.hlo)}.')
  missing = [h for h in args.hlo if not os.path.isfile(h)]
  if missing:
    p.error(f'no such file: {", ".join(missing)} (python -m experiments.main --mode=compile writes '
            '<program>_<topology>.hlo.txt.gz into its --workdir).')
  spaces = None if args.spaces == 'all' else {int(x) for x in args.spaces.split(',')}
  print(report(args.hlo, args.top, args.depth, spaces))


if __name__ == '__main__':
  main(sys.argv[1:])
