"""Meshes and shardings: the mesh from config, one table of logical axis rules, and the shardings
of parameters and batches derived from it."""
from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "sequence")

# Logical axis name -> mesh axes. Parameters name their axes in the model (lmtrain.model.layers);
# this table is the only place that says how they are laid out.
LOGICAL_AXIS_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "seq": "sequence",
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "layers": None,  # the stacked axis of train.scan_layers: every device holds every layer
}


class MeshError(ValueError):
  """The mesh sizes do not fit the devices; the message is one line."""


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
  """Sizes of (data, fsdp, tensor, sequence) with -1 resolved to the rest of the devices."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise MeshError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide {num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise MeshError(f"mesh {dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} devices, "
                    f"but there are {num_devices}")
  return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_to_spec(logical_axes, shape, mesh: Mesh) -> P:
  """PartitionSpec for an array whose dims have these logical names.

  A dim whose size the mesh axes do not divide (e.g. one kv head over tensor=2) is replicated,
  and a mesh axis is used at most once per array.
  """
  used, spec = set(), []
  for name, size in zip(logical_axes, shape):
    axes = LOGICAL_AXIS_RULES.get(name) if name else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
    if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
      used.update(axes)
      spec.append(axes[0] if len(axes) == 1 else axes)
    else:
      spec.append(None)
  return P(*spec)


def param_shardings(abstract_params, logical_axes, mesh: Mesh):
  """NamedShardings for a params tree, given its tree of logical axis tuples."""
  return jax.tree.map(
      lambda x, axes: NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh)),
      abstract_params, logical_axes)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches [B, T] are split over data x fsdp on B and over sequence on T (whose columns the
  trainer lays out zigzag for ring attention, see `sequence_layout`)."""
  return NamedSharding(mesh, P(("data", "fsdp"), "sequence"))


def sequence_layout(mesh: Mesh, seq_len: int):
  """The column permutation of batches for sequence parallelism (None without it)."""
  n = mesh.shape["sequence"]
  if n == 1:
    return None
  from lmtrain.ring_attention import zigzag_permutation
  return zigzag_permutation(seq_len, n)


def check_config_fits_mesh(cfg, shape: tuple[int, ...]) -> None:
  """Raises MeshError (one line) when the batch or the model cannot be laid out on the mesh."""
  sizes = dict(zip(MESH_AXES, shape))
  rows = sizes["data"] * sizes["fsdp"]
  if cfg.data.batch_size % rows:
    raise MeshError(f"data.batch_size={cfg.data.batch_size} is not divisible by "
                    f"mesh data x fsdp = {rows}")
  if sizes["sequence"] > 1:
    from lmtrain.model import layer_kinds, mixers
    from lmtrain.model.transformer import mixer_options
    for kind in dict.fromkeys(layer_kinds(cfg.model)):
      why = mixers.get(kind).sequence_parallel_error(mixer_options(cfg.model.attention, kind))
      if why:
        raise MeshError(f"mesh.sequence={sizes['sequence']} (sequence parallelism): {why}")
    if cfg.data.seq_len % (2 * sizes["sequence"]):
      raise MeshError(f"data.seq_len={cfg.data.seq_len} is not divisible by 2 x mesh.sequence "
                      f"= {2 * sizes['sequence']} (the zigzag layout of ring attention)")


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
