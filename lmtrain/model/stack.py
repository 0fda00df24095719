"""How the block stack runs: rematerialisation policies, scan over layers, and the conversion of
parameter trees (and anything shaped like them: Adam's moments) between the two layouts.

Layouts of the `params` tree (nnx pure dicts):
  unscanned: {"blocks": {0: block, 1: block, ..., L-1: block}, ...}
  scanned:   {"stack": {p: block with every leaf stacked [G, ...]}, "tail": {r: block}, ...}
where P is the period of the layer pattern (1 without one), G = L // P the repeating groups and
layer g * P + p is stack[p][g]; the L - G * P layers left over (`tail`, absent when none) are
layers G * P + r. A stacked leaf's logical axes start with "layers" (replicated), so the
sharding rules of lmtrain.parallel apply to the rest unchanged.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

LAYERS_AXIS = "layers"

# train.remat: what each block keeps for the backward pass; everything else is recomputed.
REMAT_POLICIES = {
    "none": None,  # keep every activation (no recompute)
    # keep only each block's input (the residual stream); the whole block is recomputed
    "full": jax.checkpoint_policies.nothing_saveable,
    # keep the outputs of the weight matmuls (q/k/v/o projections, MLP gate/up/down); recompute
    # norms, activations and the attention itself
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def pattern_period(kinds: tuple[str, ...]) -> int:
  """The shortest p with kinds[i] == kinds[i % p] for every layer: the group that scan repeats."""
  n = len(kinds)
  for p in range(1, n + 1):
    if all(kinds[i] == kinds[i % p] for i in range(n)):
      return p
  return n


def scan_groups(kinds: tuple[str, ...]) -> tuple[int, int, int]:
  """(period P, groups G, leftover layers R) with L = G * P + R."""
  period = pattern_period(kinds)
  return period, len(kinds) // period, len(kinds) % period


class LayerStructureError(ValueError):
  """Blocks at the same place of the pattern differ in more than their parameters."""


def stack_blocks(blocks: list, first_layer: int) -> nnx.Module:
  """One Block whose every variable is the blocks' stacked on a new leading axis named
  "layers". The layer index a mixer reads at run time (`at_layer`) is set to `first_layer` in
  every block first: it is an input of the scan, not part of the structure compared here."""
  for b in blocks:
    b.at_layer(first_layer)
  modules = blocks
  graphdef, _ = nnx.split(modules[0])
  for m in modules[1:]:
    if nnx.split(m)[0] != graphdef:
      raise LayerStructureError(
          f"{type(m.attn).__name__} layers differ in more than their parameters (a value "
          "derived from the layer index at construction?): scan_layers cannot stack them")
  states = [nnx.split(m)[1] for m in modules]
  is_var = lambda x: isinstance(x, nnx.Variable)
  stacked = jax.tree.map(lambda *vs: vs[0].replace(jnp.stack([v[...] for v in vs])), *states,
                         is_leaf=is_var)
  stacked = nnx.spmd.add_axis(stacked, 0, {nnx.PARTITION_NAME: LAYERS_AXIS})
  return nnx.merge(graphdef, stacked)


# -- the two layouts of parameter-shaped trees ---------------------------------------------------

def is_params(node) -> bool:
  return isinstance(node, dict) and "embed" in node and ("blocks" in node or "stack" in node)


def is_scanned(params) -> bool:
  return "stack" in params


def _blocks_in_order(params, take: Callable) -> list:
  """The per-layer block trees of either layout, layer 0 first."""
  if not is_scanned(params):
    return [params["blocks"][k] for k in sorted(params["blocks"], key=int)]
  stack = [params["stack"][k] for k in sorted(params["stack"], key=int)]
  groups = jax.tree.leaves(stack[0])[0].shape[0]
  out = [jax.tree.map(lambda x: take(x, g), stack[p]) for g in range(groups)
         for p in range(len(stack))]
  tail = params.get("tail", {})
  return out + [tail[k] for k in sorted(tail, key=int)]


def _key_type(params):
  """Layer keys as the tree has them (int in nnx pure dicts, str in some restored trees)."""
  group = params.get("blocks") or params.get("stack")
  return type(next(iter(group)))


def to_unscanned(params, *, take: Callable = lambda x, g: x[g]):
  """A params-shaped tree in the unscanned layout (unchanged when it already is)."""
  if not is_scanned(params):
    return params
  key = _key_type(params)
  out = {k: v for k, v in params.items() if k not in ("stack", "tail")}
  out["blocks"] = {key(i): b for i, b in enumerate(_blocks_in_order(params, take))}
  return out


def to_scanned(params, period: int, *, take: Callable = lambda x, g: x[g],
               stack: Callable = jnp.stack):
  """A params-shaped tree in the scanned layout of pattern period `period`."""
  key = _key_type(params)
  blocks = _blocks_in_order(params, take)
  groups = len(blocks) // period
  out = {k: v for k, v in params.items() if k not in ("blocks", "stack", "tail")}
  out["stack"] = {key(p): jax.tree.map(lambda *xs: stack(list(xs)),
                                       *[blocks[g * period + p] for g in range(groups)])
                  for p in range(period)}
  if len(blocks) > groups * period:
    out["tail"] = {key(r): b for r, b in enumerate(blocks[groups * period:])}
  return out


def convert_tree(node, fn: Callable):
  """Applies `fn` to every params-shaped dict in `node` (the params and, inside an optax state,
  the moments), rebuilding dicts, lists, tuples and namedtuples around them."""
  if is_params(node):
    return fn(node)
  if isinstance(node, dict):
    return {k: convert_tree(v, fn) for k, v in node.items()}
  if isinstance(node, tuple) and hasattr(node, "_fields"):
    return type(node)(*(convert_tree(v, fn) for v in node))
  if isinstance(node, (list, tuple)):
    return type(node)(convert_tree(v, fn) for v in node)
  return node


def find_params(node):
  """The first params-shaped dict in a tree (None when there is none)."""
  if is_params(node):
    return node
  children = node.values() if isinstance(node, dict) else (
      node if isinstance(node, (list, tuple)) else ())
  for child in children:
    found = find_params(child)
    if found is not None:
      return found
  return None


def period_of(params) -> int:
  """The pattern period of a scanned params tree."""
  return len(params["stack"])


# -- abstract leaves (ShapeDtypeStruct with a sharding): the same conversions on shapes ----------

def abstract_take(x, g):
  del g
  sharding = x.sharding
  if isinstance(sharding, jax.sharding.NamedSharding):
    spec = tuple(sharding.spec)[1:]
    sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
  return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=sharding)


def abstract_stack(xs):
  x = xs[0]
  sharding = x.sharding
  if isinstance(sharding, jax.sharding.NamedSharding):
    spec = (None, *tuple(sharding.spec))
    sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
  return jax.ShapeDtypeStruct((len(xs), *x.shape), x.dtype, sharding=sharding)
