"""Sparse attention on the block-list TPU flash kernel (pallas_kernels/blockwise/pallas_tpu.py):
a sliding window becomes the band of key blocks plus the in-tile window mask, a BlockMask its
static block lists. Only listed key blocks are loaded and computed.

MoBA: the routing (routing.py, jnp) picks key blocks per query token and head; a query tile's
list is the union of its tokens' blocks (per batch and head, so the lists are computed, not
static), and inside a tile each query keeps only the blocks it chose, from its routes
[B, Hq, T, top_k - 1] read beside q. Kernel tiles divide the MoBA block, so a tile belongs to
exactly one routed block.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels._common import cdiv
from pallas_kernels.blockwise.pallas_tpu import (DEFAULT_BLOCK, _block_size, _Config, _flash,
                                                 block_keep_for, dense_block_keep,
                                                 flash_attention_tpu)
from pallas_kernels.sparse.patterns import BlockMask, MoBA, SlidingWindow
from pallas_kernels.sparse.routing import moba_key_block_mask, moba_routing


def _blocks_for(pattern, t: int, block: int) -> int:
  if isinstance(pattern, BlockMask):
    if pattern.block_size % 8:
      raise ValueError(f"sparse_attention: the TPU kernel needs BlockMask block_size divisible "
                       f"by 8; got {pattern.block_size}")
    return pattern.block_size
  return block


def sparse_flash_tpu(q, k, v, *, pattern, causal=True, segment_ids=None, sm_scale=None,
                     alibi_slopes=None, interpret=None, block=DEFAULT_BLOCK):
  if isinstance(pattern, MoBA):
    return _moba(q, k, v, pattern, segment_ids=segment_ids, sm_scale=sm_scale,
                 alibi_slopes=alibi_slopes, interpret=interpret, block=block)
  bs = _blocks_for(pattern, q.shape[1], block)
  kw = dict(causal=causal, segment_ids=segment_ids, sm_scale=sm_scale, alibi_slopes=alibi_slopes,
            interpret=interpret, block_q=bs, block_k=bs)
  if isinstance(pattern, SlidingWindow):
    return flash_attention_tpu(q, k, v, window=pattern.window, **kw)
  return flash_attention_tpu(q, k, v, block_keep=pattern.array, **kw)


def visited_blocks(pattern, t: int, *, causal=True, block=DEFAULT_BLOCK) -> int:
  """How many (query block, key block) tiles the kernel computes for this pattern and length."""
  bs = _block_size(t, _blocks_for(pattern, t, block))
  n = cdiv(t, bs)
  if isinstance(pattern, SlidingWindow):
    return int(block_keep_for(n, n, bs, bs, causal=causal, window=pattern.window).sum())
  return int((block_keep_for(n, n, bs, bs, causal=causal) & pattern.array).sum())


# ---- MoBA ----------------------------------------------------------------------------------------

def moba_tile(moba_block: int, t: int, block: int = DEFAULT_BLOCK) -> int:
  """The kernel tile for a MoBA block: the largest multiple of 8 dividing it, at most `block`
  (and no longer than T rounded up to 8)."""
  if moba_block % 8:
    raise ValueError(f"sparse_attention: the TPU kernel needs MoBA block_size divisible by 8; "
                     f"got {moba_block}")
  cap = min(block, moba_block, _block_size(t, block))
  return next(c for c in range(cap - cap % 8, 7, -8) if moba_block % c == 0)


def lists_from_keep_jnp(keep, n_max: int):
  """lists_from_keep for a traced keep [..., rows, cols]: (idx [..., rows, n_max] ascending, padded
  with the row's last kept column; count [..., rows]); n_max bounds every row's count."""
  order = jnp.argsort(~keep, axis=-1, stable=True)[..., :n_max].astype(jnp.int32)
  count = jnp.sum(keep, axis=-1, dtype=jnp.int32)
  last = jnp.take_along_axis(order, jnp.maximum(count - 1, 0)[..., None], axis=-1)
  idx = jnp.where(jnp.arange(n_max) < count[..., None], order, last)
  return idx, count


def moba_tile_keep(routes_BTHP, t: int, moba_block: int, tile: int):
  """[B, Hq, nq, nk]: the (query tile, key tile) pairs some query of the tile needs."""
  nb = cdiv(t, moba_block)
  nq = nk = cdiv(t, tile)
  sel = moba_key_block_mask(routes_BTHP, nb, moba_block, t)  # [B, Hq, T, nb], own block in
  sel = jnp.pad(sel, ((0, 0), (0, 0), (0, nq * tile - t), (0, 0)))
  tile_blocks = jnp.any(sel.reshape(*sel.shape[:2], nq, tile, nb), axis=3)  # [B, Hq, nq, nb]
  keep = jnp.repeat(tile_blocks, moba_block // tile, axis=-1)[..., :nk]
  return keep & jnp.asarray(dense_block_keep(nq, nk, tile, tile, True))


def _moba(q, k, v, pattern: MoBA, *, segment_ids, sm_scale, alibi_slopes, interpret, block):
  if alibi_slopes is not None:
    raise ValueError("the Pallas TPU attention kernel does not take alibi_slopes yet "
                     "(use impl='reference' or 'xla')")
  b, t, hq, _ = q.shape
  mb = pattern.block_size
  tile = moba_tile(mb, t, block)
  nq = cdiv(t, tile)
  routes = moba_routing(q, k, block_size=mb, top_k=pattern.top_k, segment_ids=segment_ids)
  if routes.shape[-1] == 0:  # top_k 1: the own block only; one column of "no choice"
    routes = jnp.full((b, t, hq, 1), -1, jnp.int32)
  keep = moba_tile_keep(routes, t, mb, tile)
  n_routes = routes.shape[-1]
  per_tile = (mb // tile) * (min(tile * n_routes, cdiv(t, mb)) + 1)  # own block + the unions
  fwd = lists_from_keep_jnp(keep, min(nq, per_tile))
  bwd = lists_from_keep_jnp(jnp.swapaxes(keep, -1, -2), nq)
  routes_t = jnp.pad(routes, ((0, 0), (0, nq * tile - t), (0, 0), (0, 0)),
                     constant_values=-1).transpose(0, 2, 1, 3)  # [B, Hq, Tp, P]
  scale = q.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale)
  cfg = _Config(t=t, s=t, bq=tile, bk=tile, causal=True, window=None, scale=scale,
                interpret=interpret or False, key=("moba", mb, pattern.top_k), per_head=True,
                num_routes=n_routes, route_block=mb)
  return _flash(q, k, v, segment_ids, (fwd, bwd, routes_t), cfg)


def moba_visited_tiles(q, k, pattern: MoBA, *, segment_ids=None, block=DEFAULT_BLOCK):
  """How many (query tile, key tile) pairs the MoBA kernel computes for these inputs, summed over
  batch and heads (the forward's list counts)."""
  t = q.shape[1]
  tile = moba_tile(pattern.block_size, t, block)
  routes = moba_routing(q, k, block_size=pattern.block_size, top_k=pattern.top_k,
                        segment_ids=segment_ids)
  if routes.shape[-1] == 0:
    routes = jnp.full(q.shape[:3] + (1,), -1, jnp.int32)
  return int(jax.device_get(jnp.sum(moba_tile_keep(routes, t, pattern.block_size, tile))))
