"""Sparse attention in jnp: a dense masked reference and a block-skipping path.

`sparse_reference` builds the full [T, S] mask of the pattern and runs dense softmax attention:
the oracle. `sparse_blockwise` gathers, for each query block (or each query token, for MoBA's
per-token routing), only the key blocks the pattern keeps, so its work is proportional to the
kept blocks; it is what the kernels do, minus the tiling.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels._common import cdiv, group_queries, ungroup_queries
from pallas_kernels.blockwise.reference import (cap, compute_dtype, dense_attention,
                                               softmax_with_sinks)
from pallas_kernels.sparse.patterns import BlockMask, MoBA, SlidingWindow
from pallas_kernels.sparse.routing import moba_key_block_mask, moba_routing

DEFAULT_BLOCK = 64


def _token_mask_from_blocks(block_mask_QK, block_size: int, t: int, s: int):
  """[nq, nk] block mask -> [T, S] token mask."""
  qb = np.arange(t) // block_size
  kb = np.arange(s) // block_size
  return block_mask_QK[qb][:, kb]


def _check_block_mask(pattern: BlockMask, t: int, s: int):
  want = (cdiv(t, pattern.block_size), cdiv(s, pattern.block_size))
  if pattern.array.shape != want:
    raise ValueError(f"sparse_attention: BlockMask of shape {pattern.array.shape} does not fit "
                     f"T={t}, S={s} with block_size={pattern.block_size} (needs {want})")


def pattern_mask(pattern, q, k, *, segment_ids=None):
  """The pattern as a boolean mask broadcastable to [B, Hq, T, S] (without causality)."""
  t, s = q.shape[1], k.shape[1]
  if isinstance(pattern, SlidingWindow):
    qp, kp = np.arange(t)[:, None], np.arange(s)[None, :]
    return jnp.asarray(np.abs(qp - kp) < pattern.window)[None, None]  # causal keeps s <= t
  if isinstance(pattern, BlockMask):
    _check_block_mask(pattern, t, s)
    return jnp.asarray(_token_mask_from_blocks(pattern.array, pattern.block_size, t, s))[None, None]
  if isinstance(pattern, MoBA):
    routes = moba_routing(q, k, block_size=pattern.block_size, top_k=pattern.top_k,
                          segment_ids=segment_ids)
    nb = cdiv(s, pattern.block_size)
    blocks = moba_key_block_mask(routes, nb, pattern.block_size, t)  # [B, Hq, T, nb]
    return blocks[..., np.arange(s) // pattern.block_size]
  raise TypeError(f"sparse_attention: unknown pattern {pattern!r}")


def sparse_reference(q, k, v, *, pattern, causal=True, segment_ids=None, sm_scale=None,
                     alibi_slopes=None, softcap=None, sinks=None):
  """Dense softmax attention under the pattern's mask (materialises T x S)."""
  mask = pattern_mask(pattern, q, k, segment_ids=segment_ids)
  return dense_attention(q, k, v, causal=causal, segment_ids=segment_ids, sm_scale=sm_scale,
                         alibi_slopes=alibi_slopes, mask=mask, softcap=softcap, sinks=sinks)


# ---------------------------------------------------------------------------------------------
# Block lists: which key blocks each query block visits.


def block_lists(pattern, t: int, s: int, *, causal: bool = True, block_size: int | None = None):
  """For static patterns: (block_size, idx [nq, n_max] int32, valid [nq, n_max] bool) listing
  the key blocks each query block must visit (causality applied at block level)."""
  if isinstance(pattern, SlidingWindow):
    bs = block_size or DEFAULT_BLOCK
    nq, nk = cdiv(t, bs), cdiv(s, bs)
    i = np.arange(nq)[:, None]
    j = np.arange(nk)[None, :]
    # Key block j holds a key within the window of some query of block i.
    lo_q, hi_q = i * bs, np.minimum((i + 1) * bs, t) - 1
    lo_k, hi_k = j * bs, np.minimum((j + 1) * bs, s) - 1
    keep = (hi_k > lo_q - pattern.window) & ((lo_k < hi_q + pattern.window) | causal)
    if causal:
      keep &= lo_k <= hi_q
  elif isinstance(pattern, BlockMask):
    _check_block_mask(pattern, t, s)
    bs = pattern.block_size
    keep = pattern.array.copy()
    if causal:
      keep &= np.arange(keep.shape[1])[None, :] <= np.arange(keep.shape[0])[:, None]
  else:
    raise TypeError(f"block_lists: {pattern!r} has no static block lists")
  n_max = max(int(keep.sum(axis=1).max()), 1)
  idx = np.zeros((keep.shape[0], n_max), np.int32)
  valid = np.zeros((keep.shape[0], n_max), bool)
  for row in range(keep.shape[0]):
    cols = np.flatnonzero(keep[row])
    idx[row, :len(cols)] = cols
    valid[row, :len(cols)] = True
  return bs, idx, valid


def _blocks(x, bs: int):
  """[B, S, ...] -> [nb, B, bs, ...] zero padded."""
  b, s = x.shape[:2]
  nb = cdiv(s, bs)
  x = jnp.pad(x, ((0, 0), (0, nb * bs - s)) + ((0, 0),) * (x.ndim - 2))
  return jnp.moveaxis(x.reshape(b, nb, bs, *x.shape[2:]), 1, 0)


def sparse_blockwise(q, k, v, *, pattern, causal=True, segment_ids=None, sm_scale=None,
                     alibi_slopes=None, block_size=None, softcap=None, sinks=None):
  """Attention that only touches the key blocks the pattern keeps."""
  if isinstance(pattern, MoBA):
    if not causal:
      raise ValueError("sparse_attention: MoBA is causal only (causal=False given)")
    return _moba_gathered(q, k, v, pattern, segment_ids, sm_scale, alibi_slopes, softcap, sinks)
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  ct = compute_dtype(q.dtype)
  scale = d ** -0.5 if sm_scale is None else sm_scale
  bs, idx, valid = block_lists(pattern, t, s, causal=causal, block_size=block_size)
  nq, n_max = idx.shape
  qb = _blocks(group_queries(q, hkv), bs)  # [nq, B, bs, K, G, D]
  kb, vb = _blocks(k, bs), _blocks(v, bs)  # [nk, B, bs, K, D]
  k_sel = kb[idx]  # [nq, n_max, B, bs, K, D]
  v_sel = vb[idx]
  logits = jnp.einsum("nbtkgd,nmbskd->nbkgtms", qb, k_sel, preferred_element_type=ct) * scale
  logits = cap(logits, softcap)
  q_pos = (np.arange(nq)[:, None] * bs + np.arange(bs)[None, :])  # [nq, bs]
  k_pos = idx[:, :, None] * bs + np.arange(bs)[None, None, :]  # [nq, n_max, bs]
  keep = valid[:, None, :, None] & (k_pos[:, None] < s)  # [nq, 1 (queries), n_max, bs]
  if causal:
    keep = keep & (k_pos[:, None] <= q_pos[:, :, None, None])
  if isinstance(pattern, SlidingWindow):
    keep = keep & (np.abs(q_pos[:, :, None, None] - k_pos[:, None]) < pattern.window)
  keep = jnp.asarray(keep)[:, None, None, None]  # [nq, 1, 1, 1, bs, n_max, bs]
  if segment_ids is not None:
    seg_q = _blocks(segment_ids, bs)  # [nq, B, bs]
    seg_k = _blocks(segment_ids, bs)[idx]  # [nq, n_max, B, bs]
    same = seg_q[:, :, :, None, None] == jnp.moveaxis(seg_k, 2, 1)[:, :, None]  # [nq,B,bs,m,s]
    keep = keep & same[:, :, None, None]
  if alibi_slopes is not None:
    dist = (q_pos[:, :, None, None] - k_pos[:, None]).astype(ct)
    if not causal:
      dist = jnp.abs(dist)
    slopes = alibi_slopes.astype(ct).reshape(hkv, -1)
    logits = logits - slopes[None, None, :, :, None, None, None] * dist[:, None, None, None]
  shape = logits.shape  # softmax over every kept key of the query: the (m, s) axes together
  keep = jnp.broadcast_to(keep, shape).reshape(*shape[:-2], -1)
  sink = None if sinks is None else sinks.astype(ct).reshape(hkv, -1)[None, None, :, :, None]
  p = softmax_with_sinks(logits.reshape(*shape[:-2], -1), keep, sink).reshape(shape)
  o = jnp.einsum("nbkgtms,nmbskd->nbtkgd", p, v_sel.astype(ct))
  o = jnp.moveaxis(o, 0, 1).reshape(b, nq * bs, hkv, hq // hkv, d)[:, :t]
  return ungroup_queries(o).astype(q.dtype)


def _moba_gathered(q, k, v, pattern: MoBA, segment_ids, sm_scale, alibi_slopes, softcap=None,
                   sinks=None):
  """MoBA, one query block at a time (a lax.scan whose step is rematerialised in the backward):
  each block's queries score every key [B, Hq, bs, S] and keep their own block (causally) and
  their routed blocks. Memory is one query block's share of the dense path, never more; the
  work is the dense path's (the kernels do the routed work only)."""
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  ct = compute_dtype(q.dtype)
  scale = d ** -0.5 if sm_scale is None else sm_scale
  bs = pattern.block_size
  nq = cdiv(t, bs)
  routes = moba_routing(q, k, block_size=bs, top_k=pattern.top_k, segment_ids=segment_ids)
  seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  key_block = jnp.arange(s) // bs  # [S]
  k_pos = jnp.arange(s)

  def one_block(qb, rb, sb, pos):
    """qb [B, bs, Hq, D], rb [B, bs, Hq, P], sb [B, bs], pos [bs] -> [B, bs, Hq, D]."""
    logits = cap(jnp.einsum("btkgd,bskd->btkgs", group_queries(qb, hkv).astype(ct),
                            k.astype(ct)).reshape(b, bs, hq, s) * scale, softcap)
    own = (key_block[None, :] == (pos // bs)[:, None])[None, :, None, :]  # [1, bs, 1, S]
    routed = jnp.any(rb[..., None] == key_block, axis=-2)  # [B, bs, Hq, S]
    keep = (own | routed) & (k_pos[None, :] <= pos[:, None])[None, :, None, :]
    keep = keep & (sb[:, :, None, None] == seg[:, None, None, :])
    if alibi_slopes is not None:
      logits = logits - alibi_slopes.astype(ct)[None, None, :, None] * (
          pos[:, None] - k_pos[None, :]).astype(ct)[None, :, None, :]
    sink = None if sinks is None else sinks.astype(ct)[None, None, :]
    p = softmax_with_sinks(logits, keep, sink)
    o = jnp.einsum("bths,bshd->bthd", p, jnp.repeat(v.astype(ct), hq // hkv, axis=2))
    return o

  pad = nq * bs - t
  pad_t = lambda x, value=0: jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2),
                                     constant_values=value)
  blocks = lambda x: jnp.moveaxis(x.reshape(b, nq, bs, *x.shape[2:]), 1, 0)
  xs = (blocks(pad_t(q)), blocks(pad_t(routes, -1)), blocks(pad_t(seg, -1)),
        jnp.arange(nq * bs).reshape(nq, bs))
  step = jax.checkpoint(lambda carry, x: (carry, one_block(*x)))
  _, o = jax.lax.scan(step, None, xs)  # [nq, B, bs, Hq, D]
  o = jnp.moveaxis(o, 0, 1).reshape(b, nq * bs, hq, d)[:, :t]
  return o.astype(q.dtype)
