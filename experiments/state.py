"""The train state (one pytree that Orbax saves whole) and its shardings over the device mesh."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Everything that a resumed run needs: the step, dense params, optimizer and sparsity state.

  The data iterator's position is saved beside it (a JSON item of the same
  checkpoint); randomness is ``fold_in(seed, step)``, so it needs no state.
  """

  step: jax.Array
  params: PyTree
  opt_state: PyTree
  sparsity: PyTree


def make_mesh(config: ml_collections.ConfigDict, devices=None) -> Mesh:
  """A ``('data', 'fsdp')`` mesh; ``-1`` on one axis takes the remaining devices."""
  devices = jax.devices() if devices is None else devices
  n = len(devices)
  data, fsdp = config.data, config.fsdp
  if data == -1 and fsdp == -1:
    raise ValueError('mesh: at most one of mesh.data and mesh.fsdp may be -1.')
  if data == -1:
    data = n // fsdp if fsdp > 0 and n % fsdp == 0 else 0
  if fsdp == -1:
    fsdp = n // data if data > 0 and n % data == 0 else 0
  if data * fsdp != n:
    raise ValueError(f'mesh.data x mesh.fsdp = {config.data} x {config.fsdp} does not use the {n} '
                     f'devices; set them so that their product is {n} (-1 fills one axis).')
  return Mesh(np.asarray(devices).reshape(data, fsdp), ('data', 'fsdp'))


def leaf_spec(shape: tuple[int, ...], fsdp: int, min_size: int = 2**14) -> P:
  """FSDP rule: shard the largest axis divisible by the fsdp size; small leaves are replicated."""
  if fsdp <= 1 or not shape or int(np.prod(shape)) < min_size:
    return P()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % fsdp == 0:
      spec = [None] * len(shape)
      spec[axis] = 'fsdp'
      return P(*spec)
  return P()


def state_shardings(abstract_state: PyTree, mesh: Mesh) -> PyTree:
  """Shardings for every leaf of the (abstract) train state: params, Adam moments and masks alike."""
  fsdp = mesh.shape['fsdp']
  return jax.tree.map(lambda x: NamedSharding(mesh, leaf_spec(tuple(x.shape), fsdp)), abstract_state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The batch axis split over every device."""
  return NamedSharding(mesh, P(('data', 'fsdp')))


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles this host's part of the batch into global arrays."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def scalar(x) -> jax.Array:
  return jnp.asarray(x, jnp.int32)
