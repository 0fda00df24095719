"""MoBA routing in jnp: which past key blocks each query token attends to.

Keys are cut into blocks of `block_size`. The score of a past block j for query t is
q_t . mean(k over block j); query t takes the top_k - 1 highest-scoring blocks that lie wholly
before its own block (fewer if fewer exist), per query head, plus its own block (causally).

Packed documents (segment ids, contiguous runs as packing makes them): a block's mean is taken
over the keys of the query's own document only, and blocks with none of them are not candidates,
so the routing of a document never depends on another document.

Routing is a discrete choice: no gradient flows through it (as in the MoBA paper); gradients
flow through the attention over the chosen blocks.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels._common import cdiv, group_queries, segment_starts


def moba_routing(q, k, *, block_size: int, top_k: int, segment_ids=None):
  """Chosen past blocks per query token and head: int32 [B, T, Hq, max(top_k - 1, 0)], -1 where
  there is no (further) candidate. The own block is implied and not listed."""
  q = jax.lax.stop_gradient(q)
  k = jax.lax.stop_gradient(k)
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  nb = cdiv(s, block_size)
  n_pick = min(top_k - 1, nb)
  if n_pick <= 0:
    return jnp.full((b, t, hq, 0), -1, jnp.int32)
  ct = jnp.promote_types(q.dtype, jnp.float32)
  kf = jnp.pad(k.astype(ct), ((0, 0), (0, nb * block_size - s), (0, 0), (0, 0)))
  # Prefix sums of keys: the sum over any key interval [lo, hi) is P[hi] - P[lo].
  prefix = jnp.concatenate([jnp.zeros((b, 1, hkv, d), ct), jnp.cumsum(kf, axis=1)], axis=1)
  blk_lo = jnp.arange(nb) * block_size  # [nb]
  blk_hi = blk_lo + block_size
  own = jnp.arange(t) // block_size  # [T]
  start = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_starts(segment_ids)
  lo = jnp.maximum(blk_lo[None, None, :], start[:, :, None])  # [B, T, nb]
  count = blk_hi[None, None, :] - lo
  candidate = (jnp.arange(nb)[None, None, :] < own[None, :, None]) & (count > 0)
  # Block sums: full blocks from P directly; the block holding the segment start is partial.
  full_sum = prefix[:, blk_hi] - prefix[:, blk_lo]  # [B, nb, Hkv, D]
  start_blk = start // block_size  # [B, T]
  partial_sum = (jnp.take_along_axis(prefix, (start_blk + 1)[:, :, None, None] * block_size,
                                     axis=1)
                 - jnp.take_along_axis(prefix, start[:, :, None, None], axis=1))  # [B, T, Hkv, D]
  q5 = group_queries(q.astype(ct), hkv)  # [B, T, Hkv, G, D]
  full_scores = jnp.einsum("btkgd,bjkd->btkgj", q5, full_sum)
  partial_scores = jnp.einsum("btkgd,btkd->btkg", q5, partial_sum)
  is_partial = (jnp.arange(nb)[None, None, :] == start_blk[:, :, None])  # [B, T, nb]
  sums = jnp.where(is_partial[:, :, None, None, :], partial_scores[..., None], full_scores)
  scores = sums / jnp.maximum(count, 1)[:, :, None, None, :].astype(ct)
  scores = jnp.where(candidate[:, :, None, None, :], scores, -jnp.inf).reshape(b, t, hq, nb)
  values, picks = jax.lax.top_k(scores, n_pick)
  return jnp.where(jnp.isfinite(values), picks, -1).astype(jnp.int32)


def moba_key_block_mask(routes_BTHP, num_k_blocks: int, block_size: int, t: int):
  """Boolean [B, Hq, T, nb]: the key blocks each query token attends (own block included)."""
  own = (jnp.arange(t) // block_size)[None, :, None, None]
  chosen = jnp.concatenate([jnp.broadcast_to(own, routes_BTHP.shape[:3] + (1,)), routes_BTHP],
                           axis=-1)
  hit = chosen[..., None] == jnp.arange(num_k_blocks)  # [B, T, Hq, P+1, nb]
  return jnp.moveaxis(jnp.any(hit, axis=-2), 2, 1)
