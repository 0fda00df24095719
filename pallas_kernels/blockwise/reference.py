"""Softmax attention in plain jnp: a dense oracle and the blockwise (online-softmax) reference.

`dense_attention` materialises the T x S logits; it is the "xla" path and the oracle of the tests.
`blockwise_reference` never does: per query tile, a lax.scan over key blocks with the online
softmax forward, and the FlashAttention-2 backward (recomputing probabilities from the saved
log-sum-exp), under a custom_vjp. It is the algorithm the Pallas kernels implement, written so
it can be read.

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

from pallas_kernels._common import (alibi_log_gates, cdiv, gate_cumsum, group_queries, tied_to,
                                    ungroup_queries)

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


def _query_blocks(x, block_q):
  """[B, T, ...] -> [nq, B, block_q, ...], zero padded (padded queries are masked and dropped)."""
  t = x.shape[1]
  nq = cdiv(t, block_q)
  x = jnp.pad(x, ((0, 0), (0, nq * block_q - t)) + ((0, 0),) * (x.ndim - 2))
  return x.reshape(x.shape[0], nq, block_q, *x.shape[2:]).swapaxes(0, 1)


def _unblock_queries(x, t):
  """[nq, B, block_q, ...] -> [B, T, ...]."""
  x = x.swapaxes(0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :t]


def _query_tiles(q, segment_ids, c_q_BTKG, hkv, block_q):
  """Query tiles [nq, B, bq, K, G, D], their segment ids [nq, B, bq] and gate terms
  [nq, B, bq, K, G] (None where absent)."""
  tile = lambda x: None if x is None else _query_blocks(x, block_q)
  return tile(group_queries(q, hkv)), tile(segment_ids), tile(c_q_BTKG)


def _block_logits(q5, i, c_q, blocks, j, seg_q, *, t_len, s_len, block_k, causal, scale,
                  softcap=None):
  """Logits [B, bq, K, G, bk] of query tile i (q5 [B, bq, K, G, D], its gate terms c_q
  [B, bq, K, G] and segment ids seg_q [B, bq], or None) against key block j, the keep mask,
  `above` (where the key comes after the query, for the gate bias's sign; None unless gates and
  not causal), and the derivative of the soft-cap (None without one)."""
  bq = q5.shape[1]
  q_pos = i * bq + jnp.arange(bq)
  k_pos = j * block_k + jnp.arange(block_k)
  ct = compute_dtype(q5.dtype)
  logits = jnp.einsum("btkgd,bskd->btkgs", q5.astype(ct), blocks.k[j].astype(ct)) * scale
  dcap = None
  if softcap:
    logits = cap(logits, softcap)
    dcap = 1.0 - (logits / softcap) ** 2  # d cap(x) / dx = 1 - tanh(x / cap)^2
  above = None
  if c_q is not None:
    if not causal:
      above = (k_pos[None, :] > q_pos[:, None])[None, :, None, None, :]
    c_k = jnp.moveaxis(blocks.c_k[j], 1, -1)[:, None]  # [B, 1, K, G, bk]
    logits = logits + gate_bias(c_q[..., None], c_k, above)
  seg_k = None if seg_q is None else blocks.seg[j]
  keep = keep_mask(q_pos, k_pos, seg_q, seg_k, causal=causal)
  # the zero-padded tails of the last key block and the last query tile (a padded query's
  # gate bias may be large: masked, it never reaches an exp)
  keep = keep & (k_pos < s_len) & (q_pos < t_len)[:, None]
  keep = keep[:, :, None, None, :] if keep.ndim == 3 else keep[None, :, None, None, :]
  return logits, keep, above, dcap


def _forward(q, k, v, segment_ids, c_q, c_k, sinks, *, causal, scale, block_q, block_k, softcap):
  """Per query tile, the online softmax over every key block: (o [B, T, Hq, D], lse
  [B, T, K, G])."""
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  ct = compute_dtype(q.dtype)
  blocks = _Blocks(k, v, segment_ids, c_q, c_k, block_k)
  q_tiles, seg_tiles, c_tiles = _query_tiles(q, segment_ids, blocks.c_q, hkv, block_q)
  bq, g = q_tiles.shape[2], hq // hkv

  def query_tile(inputs):
    i, q5, seg_q, c_q = inputs
    init = (jnp.full((b, bq, hkv, g), -jnp.inf, ct), jnp.zeros((b, bq, hkv, g), ct),
            jnp.zeros((b, bq, hkv, g, d), ct))
    if sinks is not None:  # a sink is a key with no value seen first: m = its logit, l = 1
      sink = jnp.broadcast_to(sinks.astype(ct).reshape(hkv, g), (b, bq, hkv, g))
      init = (sink, jnp.ones((b, bq, hkv, g), ct), init[2])

    def step(carry, j):
      m, l, acc = carry
      logits, keep, _, _ = _block_logits(q5, i, c_q, blocks, j, seg_q, t_len=t, s_len=s,
                                         block_k=block_k, causal=causal, scale=scale,
                                         softcap=softcap)
      logits = jnp.where(keep, logits, -jnp.inf)
      # The running max stays -inf until a row sees a key; exponents use a finite stand-in, so
      # no exp(-inf - -inf) and no exp(+big): a block whose weights all underflow (strong
      # decay, ALiBi at long T) adds zeros, and rescaling an empty row gives exp(-inf) = 0.
      m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
      m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
      p = jnp.exp(logits - m_safe[..., None])
      alpha = jnp.exp(m - m_safe)  # <= 1; 0 while m is -inf
      l = alpha * l + jnp.sum(p, axis=-1)
      acc = alpha[..., None] * acc + jnp.einsum("btkgs,bskd->btkgd", p, blocks.v[j].astype(ct))
      return (m_new, l, acc), None

    # tied to the data: under a differentiated scan over layers, masks computed from the block
    # index alone would be hoisted out of it for every block at once (pallas_kernels._common)
    (m, l, acc), _ = jax.lax.scan(step, init, tied_to(jnp.arange(blocks.n), q5))
    o = acc / jnp.where(l == 0, 1.0, l)[..., None]
    lse = jnp.where(l == 0, jnp.inf, jnp.where(jnp.isfinite(m), m, 0.0) + jnp.log(l))
    return o.astype(q.dtype), lse

  o, lse = jax.lax.map(query_tile, (tied_to(jnp.arange(q_tiles.shape[0]), q_tiles), q_tiles,
                                    seg_tiles, c_tiles))
  return ungroup_queries(_unblock_queries(o, t)), _unblock_queries(lse, t)


def _backward(q, k, v, segment_ids, c_q, c_k, sinks, o, lse, do, *, causal, scale, block_q,
              block_k, softcap):
  """FlashAttention-2's backward: per key block, dk and dv summed over the query tiles, dq
  accumulated over the key blocks; probabilities recomputed from the saved log-sum-exp.
  With gates also dc_q [B, T, Hq] and dc_k [B, S, Hq]: a logit's bias is +-(c_q[i] - c_k[j]),
  so c_q's gradient is the (signed) row sums of dS and c_k's minus its column sums. Under a
  soft-cap, dq and dk see dS times the cap's derivative (the bias does not). A sink (no value)
  has dS = -p_sink * delta per row: d sink = its sum."""
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  g = hq // hkv
  ct = compute_dtype(q.dtype)
  do5 = group_queries(do, hkv).astype(ct)
  delta = jnp.sum(do5 * group_queries(o, hkv).astype(ct), axis=-1)  # [B, T, K, G]
  blocks = _Blocks(k, v, segment_ids, c_q, c_k, block_k)
  gated = c_q is not None
  q_tiles, seg_tiles, c_tiles = _query_tiles(q, segment_ids, blocks.c_q, hkv, block_q)
  q_tiles = q_tiles.astype(ct)
  do_tiles = _query_blocks(do5, block_q)
  lse_tiles, delta_tiles = _query_blocks(lse, block_q), _query_blocks(delta, block_q)
  nq = q_tiles.shape[0]

  def key_block(carry, j):
    dq_tiles, dc_q_tiles = carry
    k_j, v_j = blocks.k[j].astype(ct), blocks.v[j].astype(ct)

    def query_tile(carry, inputs):
      dk, dv, dc_k = carry
      i, q5, seg_q, c_q, do_i, lse_i, delta_i = inputs
      logits, keep, above, dcap = _block_logits(q5, i, c_q, blocks, j, seg_q, t_len=t, s_len=s,
                                                block_k=block_k, causal=causal, scale=scale,
                                                softcap=softcap)
      p = jnp.exp(jnp.where(keep, logits, -jnp.inf) - lse_i[..., None])  # [B, bq, K, G, bk]
      dv = dv + jnp.einsum("btkgs,btkgd->bskd", p, do_i)
      dp = jnp.einsum("btkgd,bskd->btkgs", do_i, v_j)
      ds = p * (dp - delta_i[..., None])
      ds_qk = ds if dcap is None else ds * dcap
      dq_i = jnp.einsum("btkgs,bskd->btkgd", ds_qk, k_j) * scale
      dk = dk + jnp.einsum("btkgs,btkgd->bskd", ds_qk, q5) * scale
      dc_q_i = None
      if gated:
        ds_c = ds if above is None else jnp.where(above, -ds, ds)  # d logit / d c_q
        dc_q_i = jnp.sum(ds_c, axis=-1)
        dc_k = dc_k - jnp.moveaxis(jnp.sum(ds_c, axis=1), -1, 1)  # [B, bk, K, G]
      return (dk, dv, dc_k), (dq_i, dc_q_i)

    zeros = jnp.zeros((b, block_k, hkv, d), ct)
    init = (zeros, zeros, jnp.zeros((b, block_k, hkv, g), ct) if gated else None)
    (dk, dv, dc_k), (dq_parts, dc_q_parts) = jax.lax.scan(
        query_tile, init, (tied_to(jnp.arange(nq), k_j), q_tiles, seg_tiles, c_tiles, do_tiles,
                           lse_tiles, delta_tiles))
    dc_q_tiles = None if not gated else dc_q_tiles + dc_q_parts
    return (dq_tiles + dq_parts, dc_q_tiles), (dk, dv, dc_k)

  init = (jnp.zeros_like(q_tiles), jnp.zeros(q_tiles.shape[:-1], ct) if gated else None)
  (dq_tiles, dc_q_tiles), (dk, dv, dc_k) = jax.lax.scan(
      key_block, init, tied_to(jnp.arange(blocks.n), q_tiles))
  unblock = lambda x: x.swapaxes(0, 1).reshape(b, -1, *x.shape[3:])[:, :s]
  grads = (ungroup_queries(_unblock_queries(dq_tiles, t)).astype(q.dtype),
           unblock(dk).astype(k.dtype), unblock(dv).astype(v.dtype))
  dsinks = None
  if sinks is not None:
    p_sink = jnp.exp(sinks.astype(ct).reshape(hkv, -1) - lse)  # [B, T, K, G]
    dsinks = jnp.sum(-p_sink * delta, axis=(0, 1)).reshape(hq).astype(sinks.dtype)
  if not gated:
    return grads + (None, None, dsinks)
  dc_q = _unblock_queries(dc_q_tiles, t)
  return grads + (dc_q.reshape(b, t, hq).astype(c_q.dtype),
                  unblock(dc_k).reshape(b, s, hq).astype(c_k.dtype), dsinks)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10, 11))
def _blockwise(q, k, v, segment_ids, c_q, c_k, sinks, causal, scale, block_q, block_k, softcap):
  return _forward(q, k, v, segment_ids, c_q, c_k, sinks, causal=causal, scale=scale,
                  block_q=block_q, block_k=block_k, softcap=softcap)[0]


def _blockwise_fwd(q, k, v, segment_ids, c_q, c_k, sinks, causal, scale, block_q, block_k,
                   softcap):
  o, lse = _forward(q, k, v, segment_ids, c_q, c_k, sinks, causal=causal, scale=scale,
                    block_q=block_q, block_k=block_k, softcap=softcap)
  return o, (q, k, v, segment_ids, c_q, c_k, sinks, o, lse)


def _blockwise_bwd(causal, scale, block_q, block_k, softcap, res, do):
  q, k, v, segment_ids, c_q, c_k, sinks, o, lse = res
  dq, dk, dv, dc_q, dc_k, dsinks = _backward(q, k, v, segment_ids, c_q, c_k, sinks, o, lse, do,
                                             causal=causal, scale=scale, block_q=block_q,
                                             block_k=block_k, softcap=softcap)
  return dq, dk, dv, None, dc_q, dc_k, dsinks  # segment ids are integers


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def blockwise_reference(q, k, v, *, causal=True, segment_ids=None, sm_scale=None,
                        alibi_slopes=None, log_gates=None, softcap=None, sinks=None,
                        block_q=DEFAULT_BLOCK_Q, block_k=DEFAULT_BLOCK_K):
  """Online-softmax attention of query tiles of `block_q` over key blocks of `block_k`: beyond
  q, k, v, the output and their gradients, memory O(block_q * block_k) per head, whatever T.
  log_gates / alibi_slopes: the gate bias of gate_terms; its gradient (for the gates, and for
  the slopes) flows through the running sums by autodiff, from the custom_vjp's dc_q, dc_k.
  softcap / sinks: as dense_attention's."""
  d = q.shape[-1]
  scale = d ** -0.5 if sm_scale is None else float(sm_scale)
  terms = gate_terms(q, k, causal=causal, segment_ids=segment_ids, alibi_slopes=alibi_slopes,
                     log_gates=log_gates)
  c_q, c_k = (None, None) if terms is None else terms
  block_q, block_k = min(block_q, q.shape[1]), min(block_k, k.shape[1])
  softcap = float(softcap) if softcap else None
  return _blockwise(q, k, v, segment_ids, c_q, c_k, sinks, causal, scale, block_q, block_k,
                    softcap)
