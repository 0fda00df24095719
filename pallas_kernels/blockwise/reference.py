"""Softmax attention in plain jnp: a dense oracle and the blockwise (online-softmax) reference.

`dense_attention` materialises the T x S logits; it is the "xla" path and the oracle of the tests.
`blockwise_reference` never does: a lax.scan over key blocks with the online softmax forward and
the FlashAttention-2 backward (recomputing probabilities from the saved log-sum-exp), under a
custom_vjp. It is the algorithm the Pallas kernels implement, written so it can be read.

Shapes: q [B, T, Hq, D], k/v [B, S, Hkv, D]; inside, queries are grouped [B, T, Hkv, G, D] so a
key/value head is never repeated in memory.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels._common import cdiv, group_queries, tied_to, ungroup_queries

DEFAULT_BLOCK_K = 128


def compute_dtype(dtype):
  """fp32 for bf16/fp16/fp32 inputs, fp64 when the caller asked for fp64 (tests)."""
  return jnp.promote_types(dtype, jnp.float32)


def keep_mask(q_pos, k_pos, q_seg, k_seg, *, causal: bool):
  """Which (query, key) pairs attend: [..., Tq, Sk] booleans.

  q_pos [Tq], k_pos [Sk] absolute positions; q_seg [B, Tq], k_seg [B, Sk] or None.
  """
  keep = jnp.ones((q_pos.shape[0], k_pos.shape[0]), bool)
  if causal:
    keep = k_pos[None, :] <= q_pos[:, None]
  if q_seg is not None:
    keep = keep[None] & (q_seg[:, :, None] == k_seg[:, None, :])
  return keep


def alibi_bias(q_pos, k_pos, slopes_K_G, *, causal: bool):
  """ALiBi bias [K, G, Tq, Sk]: -slope * distance (|t - s| when not causal)."""
  dist = q_pos[:, None] - k_pos[None, :]
  if not causal:
    dist = jnp.abs(dist)
  return -slopes_K_G[:, :, None, None] * dist.astype(slopes_K_G.dtype)


def dense_attention(q, k, v, *, causal=True, segment_ids=None, sm_scale=None,
                    alibi_slopes=None, mask=None):
  """Materialised softmax attention, logits and softmax in fp32 (fp64 for fp64 inputs).

  mask: optional extra boolean mask broadcastable to [B, Hq, T, S] (sparsity patterns), and-ed
  with causality and the segments.
  """
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  ct = compute_dtype(q.dtype)
  scale = d ** -0.5 if sm_scale is None else sm_scale
  q5 = group_queries(q, hkv)
  logits = jnp.einsum("btkgd,bskd->bkgts", q5, k, preferred_element_type=ct) * scale
  q_pos, k_pos = jnp.arange(t), jnp.arange(s)
  if alibi_slopes is not None:
    logits = logits + alibi_bias(q_pos, k_pos, alibi_slopes.reshape(hkv, -1).astype(ct),
                                 causal=causal)[None]
  keep = keep_mask(q_pos, k_pos, segment_ids, segment_ids, causal=causal)
  keep = keep[:, None, None] if keep.ndim == 3 else keep[None, None, None]
  if mask is not None:
    mask = jnp.broadcast_to(mask, (mask.shape[0], hq, t, s)).reshape(mask.shape[0], hkv, -1, t, s)
    keep = keep & mask
  logits = jnp.where(keep, logits, -jnp.inf)
  m = jnp.max(logits, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(keep, jnp.exp(logits - m), 0.0)
  l = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(l == 0, 1.0, l)  # rows with no visible key give 0, not NaN
  o = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype) if ct != v.dtype else p, v,
                 preferred_element_type=ct)
  return ungroup_queries(o).astype(q.dtype)


# ---------------------------------------------------------------------------------------------
# Blockwise (online softmax) reference with a recomputing backward.


def _key_blocks(x_BSKD, block_k):
  """[B, S, K, D] -> [nb, B, block_k, K, D], zero padded."""
  b, s, kv, d = x_BSKD.shape
  nb = cdiv(s, block_k)
  x = jnp.pad(x_BSKD, ((0, 0), (0, nb * block_k - s), (0, 0), (0, 0)))
  return x.reshape(b, nb, block_k, kv, d).swapaxes(0, 1)


def _block_logits(q5, k_blk, j, seg_q, seg_k_blocks, *, s_len, block_k, causal, scale, slopes):
  """Logits [B, T, K, G, bk] of all queries against key block j, and the keep mask."""
  t = q5.shape[1]
  q_pos = jnp.arange(t)
  k_pos = j * block_k + jnp.arange(block_k)
  ct = compute_dtype(q5.dtype)
  logits = jnp.einsum("btkgd,bskd->btkgs", q5.astype(ct), k_blk.astype(ct)) * scale
  if slopes is not None:
    bias = alibi_bias(q_pos, k_pos, slopes, causal=causal)  # [K, G, T, bk]
    logits = logits + jnp.transpose(bias, (2, 0, 1, 3))[None]
  seg_k = None if seg_q is None else seg_k_blocks[j]
  keep = keep_mask(q_pos, k_pos, seg_q, seg_k, causal=causal)
  keep = keep & (k_pos < s_len)  # the zero-padded tail of the last block
  keep = keep[:, :, None, None, :] if keep.ndim == 3 else keep[None, :, None, None, :]
  return logits, keep


def _forward(q, k, v, segment_ids, slopes, *, causal, scale, block_k):
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  ct = compute_dtype(q.dtype)
  q5 = group_queries(q, hkv)
  k_blocks, v_blocks = _key_blocks(k, block_k), _key_blocks(v, block_k)
  seg_k_blocks = None
  if segment_ids is not None:
    seg_k_blocks = _key_blocks(segment_ids[:, :, None, None], block_k)[..., 0, 0]
  g = hq // hkv
  init = (jnp.full((b, t, hkv, g), -jnp.inf, ct), jnp.zeros((b, t, hkv, g), ct),
          jnp.zeros((b, t, hkv, g, d), ct))

  def step(carry, j):
    m, l, acc = carry
    logits, keep = _block_logits(q5, k_blocks[j], j, segment_ids, seg_k_blocks, s_len=s,
                                 block_k=block_k, causal=causal, scale=scale, slopes=slopes)
    m_new = jnp.maximum(m, jnp.max(jnp.where(keep, logits, -jnp.inf), axis=-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.where(keep, jnp.exp(logits - m_safe[..., None]), 0.0)
    alpha = jnp.exp(jnp.where(jnp.isfinite(m), m, 0.0) - m_safe)
    l = alpha * l + jnp.sum(p, axis=-1)
    acc = alpha[..., None] * acc + jnp.einsum("btkgs,bskd->btkgd", p, v_blocks[j].astype(ct))
    return (m_new, l, acc), None

  (m, l, acc), _ = jax.lax.scan(step, init, tied_to(jnp.arange(k_blocks.shape[0]), q5))
  o = acc / jnp.where(l == 0, 1.0, l)[..., None]
  lse = jnp.where(l == 0, jnp.inf, jnp.where(jnp.isfinite(m), m, 0.0) + jnp.log(l))
  return ungroup_queries(o).astype(q.dtype), lse


def _backward(q, k, v, segment_ids, slopes, o, lse, do, *, causal, scale, block_k):
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  ct = compute_dtype(q.dtype)
  q5 = group_queries(q, hkv).astype(ct)
  do5 = group_queries(do, hkv).astype(ct)
  delta = jnp.sum(do5 * group_queries(o, hkv).astype(ct), axis=-1)  # [B, T, K, G]
  k_blocks, v_blocks = _key_blocks(k, block_k), _key_blocks(v, block_k)
  seg_k_blocks = None
  if segment_ids is not None:
    seg_k_blocks = _key_blocks(segment_ids[:, :, None, None], block_k)[..., 0, 0]

  def step(dq, j):
    logits, keep = _block_logits(q5, k_blocks[j], j, segment_ids, seg_k_blocks, s_len=s,
                                 block_k=block_k, causal=causal, scale=scale, slopes=slopes)
    p = jnp.where(keep, jnp.exp(logits - lse[..., None]), 0.0)  # [B, T, K, G, bk]
    dv = jnp.einsum("btkgs,btkgd->bskd", p, do5)
    dp = jnp.einsum("btkgd,bskd->btkgs", do5, v_blocks[j].astype(ct))
    ds = p * (dp - delta[..., None])
    dq = dq + jnp.einsum("btkgs,bskd->btkgd", ds, k_blocks[j].astype(ct)) * scale
    dk = jnp.einsum("btkgs,btkgd->bskd", ds, q5) * scale
    return dq, (dk, dv)

  dq, (dk, dv) = jax.lax.scan(step, jnp.zeros_like(q5), jnp.arange(k_blocks.shape[0]))
  unblock = lambda x: x.swapaxes(0, 1).reshape(b, -1, hkv, d)[:, :s]
  return (ungroup_queries(dq).astype(q.dtype), unblock(dk).astype(k.dtype),
          unblock(dv).astype(v.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _blockwise(q, k, v, segment_ids, slopes, causal, scale, block_k):
  return _forward(q, k, v, segment_ids, slopes, causal=causal, scale=scale, block_k=block_k)[0]


def _blockwise_fwd(q, k, v, segment_ids, slopes, causal, scale, block_k):
  o, lse = _forward(q, k, v, segment_ids, slopes, causal=causal, scale=scale, block_k=block_k)
  return o, (q, k, v, segment_ids, slopes, o, lse)


def _blockwise_bwd(causal, scale, block_k, res, do):
  q, k, v, segment_ids, slopes, o, lse = res
  dq, dk, dv = _backward(q, k, v, segment_ids, slopes, o, lse, do, causal=causal, scale=scale,
                         block_k=block_k)
  return dq, dk, dv, None, None  # segment ids are integers; ALiBi slopes are fixed


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def blockwise_reference(q, k, v, *, causal=True, segment_ids=None, sm_scale=None,
                        alibi_slopes=None, block_k=DEFAULT_BLOCK_K):
  """Online-softmax attention over key blocks of `block_k`; memory O(T * block_k) per head."""
  d, hkv = q.shape[-1], k.shape[2]
  scale = d ** -0.5 if sm_scale is None else float(sm_scale)
  slopes = None
  if alibi_slopes is not None:
    slopes = jax.lax.stop_gradient(alibi_slopes).reshape(hkv, -1).astype(compute_dtype(q.dtype))
  block_k = min(block_k, k.shape[1])
  return _blockwise(q, k, v, segment_ids, slopes, causal, scale, block_k)
