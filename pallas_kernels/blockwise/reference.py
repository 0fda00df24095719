"""Softmax attention in plain jnp: a dense oracle and the blockwise (online-softmax) reference.

`dense_attention` materialises the T x S logits; it is the "xla" path and the oracle of the tests.
`blockwise_reference` never does: per query tile, a lax.scan over key blocks with the online
softmax forward, and the FlashAttention-2 backward (recomputing probabilities from the saved
log-sum-exp), under a custom_vjp. It is the algorithm the Pallas kernels implement, written so
it can be read.

Shapes: q [B, T, Hq, D], k/v [B, S, Hkv, D]; inside, queries are grouped [B, T, Hkv, G, D] so a
key/value head is never repeated in memory.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels._common import cdiv, group_queries, tied_to, ungroup_queries

DEFAULT_BLOCK_Q = 512
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


def _query_blocks(x, block_q):
  """[B, T, ...] -> [nq, B, block_q, ...], zero padded (padded queries are dropped)."""
  t = x.shape[1]
  nq = cdiv(t, block_q)
  x = jnp.pad(x, ((0, 0), (0, nq * block_q - t)) + ((0, 0),) * (x.ndim - 2))
  return x.reshape(x.shape[0], nq, block_q, *x.shape[2:]).swapaxes(0, 1)


def _unblock_queries(x, t):
  """[nq, B, block_q, ...] -> [B, T, ...]."""
  x = x.swapaxes(0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :t]


def _block_logits(q5, i, k_blk, j, seg_q, seg_k_blocks, *, s_len, block_k, causal, scale,
                  slopes):
  """Logits [B, bq, K, G, bk] of query block i (q5 [B, bq, K, G, D], its segment ids seg_q
  [B, bq]) against key block j, and the keep mask."""
  bq = q5.shape[1]
  q_pos = i * bq + jnp.arange(bq)
  k_pos = j * block_k + jnp.arange(block_k)
  ct = compute_dtype(q5.dtype)
  logits = jnp.einsum("btkgd,bskd->btkgs", q5.astype(ct), k_blk.astype(ct)) * scale
  if slopes is not None:
    bias = alibi_bias(q_pos, k_pos, slopes, causal=causal)  # [K, G, bq, bk]
    logits = logits + jnp.transpose(bias, (2, 0, 1, 3))[None]
  seg_k = None if seg_q is None else seg_k_blocks[j]
  keep = keep_mask(q_pos, k_pos, seg_q, seg_k, causal=causal)
  keep = keep & (k_pos < s_len)  # the zero-padded tail of the last block
  keep = keep[:, :, None, None, :] if keep.ndim == 3 else keep[None, :, None, None, :]
  return logits, keep


def _blocks(q, k, v, segment_ids, block_q, block_k):
  """Query tiles [nq, B, bq, K, G, D] (and their segment ids [nq, B, bq]), key and value blocks
  [nb, B, bk, K, D] (and the keys' segment ids [nb, B, bk])."""
  hkv = k.shape[2]
  q_blocks = _query_blocks(group_queries(q, hkv), block_q)
  seg_q_blocks = seg_k_blocks = None
  if segment_ids is not None:
    seg_q_blocks = _query_blocks(segment_ids, block_q)
    seg_k_blocks = _key_blocks(segment_ids[:, :, None, None], block_k)[..., 0, 0]
  return q_blocks, seg_q_blocks, _key_blocks(k, block_k), _key_blocks(v, block_k), seg_k_blocks


def _forward(q, k, v, segment_ids, slopes, *, causal, scale, block_q, block_k):
  """Per query tile, the online softmax over every key block: (o [B, T, Hq, D], lse
  [B, T, K, G])."""
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  ct = compute_dtype(q.dtype)
  q_blocks, seg_q_blocks, k_blocks, v_blocks, seg_k_blocks = _blocks(q, k, v, segment_ids,
                                                                     block_q, block_k)
  bq, g = q_blocks.shape[2], hq // hkv

  def query_tile(inputs):
    i, q5, seg_q = inputs
    init = (jnp.full((b, bq, hkv, g), -jnp.inf, ct), jnp.zeros((b, bq, hkv, g), ct),
            jnp.zeros((b, bq, hkv, g, d), ct))

    def step(carry, j):
      m, l, acc = carry
      logits, keep = _block_logits(q5, i, k_blocks[j], j, seg_q, seg_k_blocks, s_len=s,
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
    return o.astype(q.dtype), lse

  o, lse = jax.lax.map(query_tile, (tied_to(jnp.arange(q_blocks.shape[0]), q_blocks), q_blocks,
                                    seg_q_blocks))
  return ungroup_queries(_unblock_queries(o, t)), _unblock_queries(lse, t)


def _backward(q, k, v, segment_ids, slopes, o, lse, do, *, causal, scale, block_q, block_k):
  """FlashAttention-2's backward: per key block, dk and dv summed over the query tiles, dq
  accumulated over the key blocks; probabilities recomputed from the saved log-sum-exp."""
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  ct = compute_dtype(q.dtype)
  q_blocks, seg_q_blocks, k_blocks, v_blocks, seg_k_blocks = _blocks(q, k, v, segment_ids,
                                                                     block_q, block_k)
  q_blocks = q_blocks.astype(ct)
  do5 = group_queries(do, hkv).astype(ct)
  delta = jnp.sum(do5 * group_queries(o, hkv).astype(ct), axis=-1)  # [B, T, K, G]
  do_blocks = _query_blocks(do5, block_q)
  lse_blocks, delta_blocks = _query_blocks(lse, block_q), _query_blocks(delta, block_q)
  nq, nb = q_blocks.shape[0], k_blocks.shape[0]

  def key_block(dq_blocks, j):
    k_j, v_j = k_blocks[j].astype(ct), v_blocks[j].astype(ct)

    def query_tile(carry, inputs):
      dk, dv = carry
      i, q5, seg_q, do_i, lse_i, delta_i = inputs
      logits, keep = _block_logits(q5, i, k_j, j, seg_q, seg_k_blocks, s_len=s,
                                   block_k=block_k, causal=causal, scale=scale, slopes=slopes)
      p = jnp.where(keep, jnp.exp(logits - lse_i[..., None]), 0.0)  # [B, bq, K, G, bk]
      dv = dv + jnp.einsum("btkgs,btkgd->bskd", p, do_i)
      dp = jnp.einsum("btkgd,bskd->btkgs", do_i, v_j)
      ds = p * (dp - delta_i[..., None])
      dk = dk + jnp.einsum("btkgs,btkgd->bskd", ds, q5) * scale
      return (dk, dv), jnp.einsum("btkgs,bskd->btkgd", ds, k_j) * scale

    zeros = jnp.zeros((b, block_k, hkv, d), ct)
    (dk, dv), dq_parts = jax.lax.scan(
        query_tile, (zeros, zeros),
        (tied_to(jnp.arange(nq), k_j), q_blocks, seg_q_blocks, do_blocks, lse_blocks,
         delta_blocks))
    return dq_blocks + dq_parts, (dk, dv)

  dq_blocks, (dk, dv) = jax.lax.scan(key_block, jnp.zeros_like(q_blocks),
                                     tied_to(jnp.arange(nb), q_blocks))
  unblock = lambda x: x.swapaxes(0, 1).reshape(b, -1, hkv, d)[:, :s]
  return (ungroup_queries(_unblock_queries(dq_blocks, t)).astype(q.dtype),
          unblock(dk).astype(k.dtype), unblock(dv).astype(v.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _blockwise(q, k, v, segment_ids, slopes, causal, scale, block_q, block_k):
  return _forward(q, k, v, segment_ids, slopes, causal=causal, scale=scale, block_q=block_q,
                  block_k=block_k)[0]


def _blockwise_fwd(q, k, v, segment_ids, slopes, causal, scale, block_q, block_k):
  o, lse = _forward(q, k, v, segment_ids, slopes, causal=causal, scale=scale, block_q=block_q,
                    block_k=block_k)
  return o, (q, k, v, segment_ids, slopes, o, lse)


def _blockwise_bwd(causal, scale, block_q, block_k, res, do):
  q, k, v, segment_ids, slopes, o, lse = res
  dq, dk, dv = _backward(q, k, v, segment_ids, slopes, o, lse, do, causal=causal, scale=scale,
                         block_q=block_q, block_k=block_k)
  return dq, dk, dv, None, None  # segment ids are integers; ALiBi slopes are fixed


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def blockwise_reference(q, k, v, *, causal=True, segment_ids=None, sm_scale=None,
                        alibi_slopes=None, block_q=DEFAULT_BLOCK_Q, block_k=DEFAULT_BLOCK_K):
  """Online-softmax attention of query tiles of `block_q` over key blocks of `block_k`: beyond
  q, k, v, the output and their gradients, memory O(block_q * block_k) per head, whatever T."""
  d, hkv = q.shape[-1], k.shape[2]
  scale = d ** -0.5 if sm_scale is None else float(sm_scale)
  slopes = None
  if alibi_slopes is not None:
    slopes = jax.lax.stop_gradient(alibi_slopes).reshape(hkv, -1).astype(compute_dtype(q.dtype))
  block_q, block_k = min(block_q, q.shape[1]), min(block_k, k.shape[1])
  return _blockwise(q, k, v, segment_ids, slopes, causal, scale, block_q, block_k)
