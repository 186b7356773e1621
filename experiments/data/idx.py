"""Reader for the idx format of (Fashion-)MNIST, plain or gzipped.

An idx file is: two zero bytes, a type code, the number of dimensions ``ndim``,
then ``ndim`` big-endian uint32 sizes, then the data in C order (big-endian).
"""

from __future__ import annotations

import gzip
import os

import numpy as np

# Type codes of the idx format and the big-endian numpy dtype each one stores.
DTYPES = {
    0x08: np.dtype('u1'),
    0x09: np.dtype('i1'),
    0x0B: np.dtype('>i2'),
    0x0C: np.dtype('>i4'),
    0x0D: np.dtype('>f4'),
    0x0E: np.dtype('>f8'),
}


class IdxFormatError(ValueError):
  """An idx file whose header or size does not match its data."""


def parse_idx(data: bytes, *, name: str = '<bytes>') -> np.ndarray:
  """The array stored in the idx bytes ``data`` (native byte order)."""
  if len(data) < 4:
    raise IdxFormatError(f'{name}: {len(data)} bytes is too short for an idx magic number.')
  zero0, zero1, code, ndim = data[:4]
  if zero0 or zero1 or code not in DTYPES or ndim == 0:
    raise IdxFormatError(
        f'{name}: bad idx magic 0x{data[:4].hex()}: expected 0x0000, a type code in '
        f'{{{", ".join(f"0x{c:02x}" for c in DTYPES)}}} and a number of dimensions >= 1. '
        'Is this an idx file (gunzipped if it was .gz)?')
  header = 4 + 4 * ndim
  if len(data) < header:
    raise IdxFormatError(
        f'{name}: truncated header: {ndim} dimensions need {header} bytes, file has {len(data)}.')
  shape = tuple(int(s) for s in np.frombuffer(data, dtype='>u4', count=ndim, offset=4))
  dtype = DTYPES[code]
  expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if len(data) - header != expected:
    raise IdxFormatError(
        f'{name}: header says shape {shape} of {dtype} ({expected} bytes of data), '
        f'but the file has {len(data) - header} bytes after the header.')
  array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
  return array.astype(dtype.newbyteorder('='), copy=True)


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """The array in the idx file ``path``; gzip is detected from the content."""
  with open(path, 'rb') as f:
    data = f.read()
  if data[:2] == b'\x1f\x8b':
    try:
      data = gzip.decompress(data)
    except (OSError, EOFError) as e:
      raise IdxFormatError(f'{path}: broken gzip stream: {e}') from e
  return parse_idx(data, name=os.fspath(path))
