"""Softmax attention in plain jnp: a dense oracle and the blockwise (online-softmax) reference.

`dense_attention` materialises the T x S logits; it is the "xla" path and the oracle of the tests.
`blockwise_reference` never does: a lax.scan over key blocks with the online softmax forward and
the FlashAttention-2 backward (recomputing probabilities from the saved log-sum-exp), under a
custom_vjp. It is the algorithm the Pallas kernels implement, written so it can be read.

Both take the Forgetting Transformer's forget-gate bias (log_gates; ALiBi is its constant-gate
case) as the running sums c of the gates per segment: logit (i, j) gets c_q[i] - c_k[j]
(gate_terms). The reference's backward returns their gradients (dS's row and column sums).

Shapes: q [B, T, Hq, D], k/v [B, S, Hkv, D]; inside, queries are grouped [B, T, Hkv, G, D] so a
key/value head is never repeated in memory.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels._common import (alibi_log_gates, cdiv, gate_cumsum, group_queries,
                                    ungroup_queries)

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


def gate_terms(q, k, *, causal, segment_ids=None, alibi_slopes=None, log_gates=None):
  """The logit bias as (c_q [B, T, Hq], c_k [B, S, Hq]) in the compute dtype, or None: query i
  and key j get c_q[i] - c_k[j] when j <= i, and c_k[j] - c_q[i] above the diagonal (not
  causal). log_gates [B, T, Hq] (FoX) and ALiBi of causal self-attention (its constant gates,
  -slope) give c_q = c_k = the gates' running sum per segment (gate_cumsum). ALiBi otherwise
  (not causal, or T != S) is the same bias written with positions: c = -slope * position."""
  if log_gates is None and alibi_slopes is None:
    return None
  b, t, hq = q.shape[:3]
  s = k.shape[1]
  ct = compute_dtype(q.dtype)
  if log_gates is None and not (causal and t == s):
    slopes = alibi_slopes.astype(ct)
    at = lambda n: jnp.broadcast_to(-slopes * jnp.arange(n, dtype=ct)[:, None], (b, n, hq))
    return at(t), at(s)
  gates = jnp.zeros((b, t, hq), ct) if log_gates is None else log_gates.astype(ct)
  if alibi_slopes is not None:
    gates = gates + alibi_log_gates(alibi_slopes.astype(ct), b, t)
  c = gate_cumsum(gates, segment_ids)
  return c, c


def gate_bias(c_q, c_k, above):
  """c_q - c_k (broadcast: c_q [..., Tq, 1], c_k [..., 1, Sk]), negated where `above` (the key
  comes after the query; None when causal), so that ALiBi is -slope * |t - s| both ways."""
  d = c_q - c_k
  return d if above is None else jnp.where(above, -d, d)


def cap(logits, softcap):
  """Gemma 2's logit soft-capping, softcap * tanh(logits / softcap); identity when off (None/0)."""
  return logits if not softcap else softcap * jnp.tanh(logits / softcap)


def softmax_with_sinks(logits, keep, sinks=None):
  """Softmax over the last axis of the kept entries, with an optional sink logit per row (a key
  with no value: gpt-oss's learned attention sinks) in the denominator; rows with nothing kept
  (and no sink) give zeros. `sinks` broadcasts to logits.shape[:-1]."""
  logits = jnp.where(keep, logits, -jnp.inf)
  m = jnp.max(logits, axis=-1)
  if sinks is not None:
    m = jnp.maximum(m, sinks)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(logits - m[..., None])  # masked: exp(-inf) = 0
  l = jnp.sum(p, axis=-1)
  if sinks is not None:
    l = l + jnp.exp(sinks - m)
  return p / jnp.where(l == 0, 1.0, l)[..., None]


def dense_attention(q, k, v, *, causal=True, segment_ids=None, sm_scale=None,
                    alibi_slopes=None, log_gates=None, mask=None, softcap=None, sinks=None):
  """Materialised softmax attention, logits and softmax in fp32 (fp64 for fp64 inputs).

  log_gates / alibi_slopes: the gate bias of gate_terms (differentiable, by autodiff here).
  mask: optional extra boolean mask broadcastable to [B, Hq, T, S] (sparsity patterns), and-ed
  with causality and the segments. softcap: Gemma 2's cap on q.k * scale (before the bias);
  sinks [Hq]: a learned logit per head in every row's denominator (gpt-oss).
  """
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  ct = compute_dtype(q.dtype)
  scale = d ** -0.5 if sm_scale is None else sm_scale
  q5 = group_queries(q, hkv)
  logits = cap(jnp.einsum("btkgd,bskd->bkgts", q5, k, preferred_element_type=ct) * scale, softcap)
  q_pos, k_pos = jnp.arange(t), jnp.arange(s)
  terms = gate_terms(q, k, causal=causal, segment_ids=segment_ids, alibi_slopes=alibi_slopes,
                     log_gates=log_gates)
  if terms is not None:
    c_q, c_k = (jnp.moveaxis(c.reshape(b, -1, hkv, hq // hkv), 1, -1) for c in terms)  # [B,K,G,n]
    above = None if causal else k_pos[None, :] > q_pos[:, None]
    logits = logits + gate_bias(c_q[..., :, None], c_k[..., None, :], above)
  keep = keep_mask(q_pos, k_pos, segment_ids, segment_ids, causal=causal)
  keep = keep[:, None, None] if keep.ndim == 3 else keep[None, None, None]
  if mask is not None:
    mask = jnp.broadcast_to(mask, (mask.shape[0], hq, t, s)).reshape(mask.shape[0], hkv, -1, t, s)
    keep = keep & mask
  sink = None if sinks is None else sinks.astype(ct).reshape(hkv, -1)[None, :, :, None]
  p = softmax_with_sinks(logits, keep, sink)  # rows with no visible key give 0, not NaN
  o = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype) if ct != v.dtype else p, v,
                 preferred_element_type=ct)
  return ungroup_queries(o).astype(q.dtype)


# ---------------------------------------------------------------------------------------------
# Blockwise (online softmax) reference with a recomputing backward.


def _key_blocks(x_BSK_, block_k):
  """[B, S, K, X] -> [nb, B, block_k, K, X], zero padded."""
  b, s, kv, d = x_BSK_.shape
  nb = cdiv(s, block_k)
  x = jnp.pad(x_BSK_, ((0, 0), (0, nb * block_k - s), (0, 0), (0, 0)))
  return x.reshape(b, nb, block_k, kv, d).swapaxes(0, 1)


class _Blocks:
  """The per-call inputs of every key block j (shared by the forward and the backward): keys,
  values, their segment ids, and the gate terms (c_q [B, T, K, G] of the queries and c_k of the
  keys, grouped like the queries), or None."""

  def __init__(self, k, v, segment_ids, c_q, c_k, block_k):
    hkv = k.shape[2]
    self.k, self.v = _key_blocks(k, block_k), _key_blocks(v, block_k)
    self.seg = None
    if segment_ids is not None:
      self.seg = _key_blocks(segment_ids[:, :, None, None], block_k)[..., 0, 0]
    self.c_q = self.c_k = None
    if c_q is not None:
      self.c_q = group_queries(c_q[..., None], hkv)[..., 0]  # [B, T, K, G]
      self.c_k = _key_blocks(group_queries(c_k[..., None], hkv)[..., 0], block_k)  # [nb,B,bk,K,G]
    self.n = self.k.shape[0]


def _block_logits(q5, blocks, j, seg_q, *, s_len, block_k, causal, scale, softcap=None):
  """Logits [B, T, K, G, bk] of all queries against key block j, the keep mask, `above` (where
  the key comes after the query, for the gate bias's sign; None unless gates and not causal),
  and the derivative of the soft-cap (None without one)."""
  t = q5.shape[1]
  q_pos = jnp.arange(t)
  k_pos = j * block_k + jnp.arange(block_k)
  ct = compute_dtype(q5.dtype)
  logits = jnp.einsum("btkgd,bskd->btkgs", q5.astype(ct), blocks.k[j].astype(ct)) * scale
  dcap = None
  if softcap:
    logits = cap(logits, softcap)
    dcap = 1.0 - (logits / softcap) ** 2  # d cap(x) / dx = 1 - tanh(x / cap)^2
  above = None
  if blocks.c_q is not None:
    if not causal:
      above = (k_pos[None, :] > q_pos[:, None])[None, :, None, None, :]
    c_k = jnp.moveaxis(blocks.c_k[j], 1, -1)[:, None]  # [B, 1, K, G, bk]
    logits = logits + gate_bias(blocks.c_q[..., None], c_k, above)
  seg_k = None if seg_q is None else blocks.seg[j]
  keep = keep_mask(q_pos, k_pos, seg_q, seg_k, causal=causal)
  keep = keep & (k_pos < s_len)  # the zero-padded tail of the last block
  keep = keep[:, :, None, None, :] if keep.ndim == 3 else keep[None, :, None, None, :]
  return logits, keep, above, dcap


def _forward(q, k, v, segment_ids, c_q, c_k, sinks, *, causal, scale, block_k, softcap):
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  ct = compute_dtype(q.dtype)
  q5 = group_queries(q, hkv)
  blocks = _Blocks(k, v, segment_ids, c_q, c_k, block_k)
  g = hq // hkv
  init = (jnp.full((b, t, hkv, g), -jnp.inf, ct), jnp.zeros((b, t, hkv, g), ct),
          jnp.zeros((b, t, hkv, g, d), ct))
  if sinks is not None:  # a sink is a key with no value seen first: m = its logit, l = 1
    sink = jnp.broadcast_to(sinks.astype(ct).reshape(hkv, g), (b, t, hkv, g))
    init = (sink, jnp.ones((b, t, hkv, g), ct), init[2])

  def step(carry, j):
    m, l, acc = carry
    logits, keep, _, _ = _block_logits(q5, blocks, j, segment_ids, s_len=s, block_k=block_k,
                                       causal=causal, scale=scale, softcap=softcap)
    logits = jnp.where(keep, logits, -jnp.inf)
    # The running max stays -inf until a row sees a key; exponents use a finite stand-in, so
    # no exp(-inf - -inf) and no exp(+big): a block whose weights all underflow (strong decay,
    # ALiBi at long T) adds zeros, and rescaling an empty row gives exp(-inf) = 0.
    m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.exp(logits - m_safe[..., None])
    alpha = jnp.exp(m - m_safe)  # <= 1; 0 while m is -inf
    l = alpha * l + jnp.sum(p, axis=-1)
    acc = alpha[..., None] * acc + jnp.einsum("btkgs,bskd->btkgd", p, blocks.v[j].astype(ct))
    return (m_new, l, acc), None

  (m, l, acc), _ = jax.lax.scan(step, init, jnp.arange(blocks.n))
  o = acc / jnp.where(l == 0, 1.0, l)[..., None]
  lse = jnp.where(l == 0, jnp.inf, jnp.where(jnp.isfinite(m), m, 0.0) + jnp.log(l))
  return ungroup_queries(o).astype(q.dtype), lse


def _backward(q, k, v, segment_ids, c_q, c_k, sinks, o, lse, do, *, causal, scale, block_k,
              softcap):
  """dq, dk, dv and, with gates, dc_q [B, T, Hq] and dc_k [B, S, Hq]: a logit's bias is
  +-(c_q[i] - c_k[j]), so c_q's gradient is the (signed) row sums of dS and c_k's minus its
  column sums. Under a soft-cap, dq and dk see dS times the cap's derivative (the bias does
  not). A sink (no value) has dS = -p_sink * delta per row: d sink = its sum."""
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  ct = compute_dtype(q.dtype)
  q5 = group_queries(q, hkv).astype(ct)
  do5 = group_queries(do, hkv).astype(ct)
  delta = jnp.sum(do5 * group_queries(o, hkv).astype(ct), axis=-1)  # [B, T, K, G]
  blocks = _Blocks(k, v, segment_ids, c_q, c_k, block_k)
  gated = c_q is not None

  def step(carry, j):
    dq, dc_q = carry
    logits, keep, above, dcap = _block_logits(q5, blocks, j, segment_ids, s_len=s,
                                              block_k=block_k, causal=causal, scale=scale,
                                              softcap=softcap)
    p = jnp.exp(jnp.where(keep, logits, -jnp.inf) - lse[..., None])  # [B, T, K, G, bk]
    dv = jnp.einsum("btkgs,btkgd->bskd", p, do5)
    dp = jnp.einsum("btkgd,bskd->btkgs", do5, blocks.v[j].astype(ct))
    ds = p * (dp - delta[..., None])
    ds_qk = ds if dcap is None else ds * dcap
    dq = dq + jnp.einsum("btkgs,bskd->btkgd", ds_qk, blocks.k[j].astype(ct)) * scale
    dk = jnp.einsum("btkgs,btkgd->bskd", ds_qk, q5) * scale
    dc_k = None
    if gated:
      ds_c = ds if above is None else jnp.where(above, -ds, ds)  # d logit / d c_q
      dc_q = dc_q + jnp.sum(ds_c, axis=-1)
      dc_k = -jnp.moveaxis(jnp.sum(ds_c, axis=1), -1, 1)  # [B, bk, K, G]
    return (dq, dc_q), (dk, dv, dc_k)

  init = (jnp.zeros_like(q5), jnp.zeros(q5.shape[:-1], ct) if gated else None)
  (dq, dc_q), (dk, dv, dc_k) = jax.lax.scan(step, init, jnp.arange(blocks.n))
  unblock = lambda x: x.swapaxes(0, 1).reshape(b, -1, *x.shape[3:])[:, :s]
  grads = (ungroup_queries(dq).astype(q.dtype), unblock(dk).astype(k.dtype),
           unblock(dv).astype(v.dtype))
  dsinks = None
  if sinks is not None:
    p_sink = jnp.exp(sinks.astype(ct).reshape(hkv, -1) - lse)  # [B, T, K, G]
    dsinks = jnp.sum(-p_sink * delta, axis=(0, 1)).reshape(hq).astype(sinks.dtype)
  if not gated:
    return grads + (None, None, dsinks)
  return grads + (dc_q.reshape(b, t, hq).astype(c_q.dtype),
                  unblock(dc_k).reshape(b, s, hq).astype(c_k.dtype), dsinks)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _blockwise(q, k, v, segment_ids, c_q, c_k, sinks, causal, scale, block_k, softcap):
  return _forward(q, k, v, segment_ids, c_q, c_k, sinks, causal=causal, scale=scale,
                  block_k=block_k, softcap=softcap)[0]


def _blockwise_fwd(q, k, v, segment_ids, c_q, c_k, sinks, causal, scale, block_k, softcap):
  o, lse = _forward(q, k, v, segment_ids, c_q, c_k, sinks, causal=causal, scale=scale,
                    block_k=block_k, softcap=softcap)
  return o, (q, k, v, segment_ids, c_q, c_k, sinks, o, lse)


def _blockwise_bwd(causal, scale, block_k, softcap, res, do):
  q, k, v, segment_ids, c_q, c_k, sinks, o, lse = res
  dq, dk, dv, dc_q, dc_k, dsinks = _backward(q, k, v, segment_ids, c_q, c_k, sinks, o, lse, do,
                                             causal=causal, scale=scale, block_k=block_k,
                                             softcap=softcap)
  return dq, dk, dv, None, dc_q, dc_k, dsinks  # segment ids are integers


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def blockwise_reference(q, k, v, *, causal=True, segment_ids=None, sm_scale=None,
                        alibi_slopes=None, log_gates=None, softcap=None, sinks=None,
                        block_k=DEFAULT_BLOCK_K):
  """Online-softmax attention over key blocks of `block_k`; memory O(T * block_k) per head.
  log_gates / alibi_slopes: the gate bias of gate_terms; its gradient (for the gates, and for
  the slopes) flows through the running sums by autodiff, from the custom_vjp's dc_q, dc_k.
  softcap / sinks: as dense_attention's."""
  d = q.shape[-1]
  scale = d ** -0.5 if sm_scale is None else float(sm_scale)
  terms = gate_terms(q, k, causal=causal, segment_ids=segment_ids, alibi_slopes=alibi_slopes,
                     log_gates=log_gates)
  c_q, c_k = (None, None) if terms is None else terms
  block_k = min(block_k, k.shape[1])
  softcap = float(softcap) if softcap else None
  return _blockwise(q, k, v, segment_ids, c_q, c_k, sinks, causal, scale, block_k, softcap)
