"""Causal linear attention in plain jnp: parallel (masked), chunked, and recurrent forms.

With phi the feature map and G(t, s) = exp(sum_{r=s+1..t} g_r) the decay between positions
(g: log-gates <= 0; constant decay is g_r = g for every r):
  num_t = sum_{s<=t} G(t, s) (phi(q_t) . phi(k_s)) v_s
  den_t = sum_{s<=t} G(t, s)  phi(q_t) . phi(k_s)
  out_t = num_t / (den_t + 1e-6) if normalize else num_t

Gates are scalar per head (G(t, s) a number) or per key dimension (GLA, Yang et al., 2024:
log-gates [B, T, Hq, D], G(t, s) a diagonal, so phi(q_t) . G(t, s) phi(k_s)). Shapes: q
[B, T, Hq, D], k [B, T, Hkv, D], v [B, T, Hkv, Dv]; inside, log-gates are [B, T, Hq, Dg] with
Dg = 1 (scalar, broadcast over D) or D. Query head h reads key/value head h // (Hq // Hkv).
Everything is computed in fp32 (fp64 for fp64 inputs) and returned in q's dtype.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels._common import cdiv, segment_start_mask

FEATURE_MAPS = ("elu1", "relu", "identity")
EPS = 1e-6


def apply_feature_map(x, name: str):
  if name == "elu1":
    return jax.nn.elu(x) + 1.0
  if name == "relu":
    return jax.nn.relu(x)
  if name == "identity":
    return x
  raise ValueError(f"linear_attention: feature_map={name!r} is not one of {', '.join(FEATURE_MAPS)}")


def compute_dtype(dtype):
  return jnp.promote_types(dtype, jnp.float32)


def log_gates(decay, q):
  """decay None | [Hq] | [B, T, Hq] -> log-gates [B, T, Hq] in the compute dtype (the scalar
  gates the Pallas kernels take)."""
  b, t, hq, _ = q.shape
  ct = compute_dtype(q.dtype)
  if decay is None:
    return jnp.zeros((b, t, hq), ct)
  decay = decay.astype(ct)
  if decay.ndim == 1:
    return jnp.broadcast_to(decay[None, None, :], (b, t, hq))
  return decay


def gates(decay, q):
  """decay None | [Hq] | [B, T, Hq] | [B, T, Hq, D] -> log-gates [B, T, Hq, Dg], Dg in {1, D}."""
  if decay is not None and decay.ndim == 4:
    return decay.astype(compute_dtype(q.dtype))
  return log_gates(decay, q)[..., None]


def _expand_heads(x_BTKD, num_heads: int):
  """[B, T, Hkv, D] -> [B, T, Hq, D]: each query head gets its key/value head (the jnp forms
  are references; the kernels never materialise this)."""
  return jnp.repeat(x_BTKD, num_heads // x_BTKD.shape[2], axis=2)


def _prepare(q, k, v, decay, fmap):
  ct = compute_dtype(q.dtype)
  hq = q.shape[2]
  fq = apply_feature_map(q.astype(ct), fmap)
  fk = _expand_heads(apply_feature_map(k.astype(ct), fmap), hq)
  vv = _expand_heads(v.astype(ct), hq)
  return fq, fk, vv, gates(decay, q)


def _finish(num, den, normalize, dtype):
  out = num / (den[..., None] + EPS) if normalize else num
  return out.astype(dtype)


def linear_parallel(q, k, v, *, feature_map="elu1", decay=None, normalize=True,
                    segment_ids=None):
  """The quadratic masked form: materialises the [T, T] decay-weighted score matrix."""
  fq, fk, vv, g = _prepare(q, k, v, decay, feature_map)
  t = q.shape[1]
  c = jnp.cumsum(g, axis=1)  # [B, T, H, Dg]
  diff = c[:, :, None] - c[:, None, :]  # [B, Tq, Ts, H, Dg]: sum of g over (s, t]
  causal = jnp.tril(jnp.ones((t, t), bool))[None, :, :, None, None]
  if segment_ids is not None:
    causal = causal & (segment_ids[:, :, None] == segment_ids[:, None, :])[..., None, None]
  weight = jnp.where(causal, jnp.exp(jnp.where(causal, diff, 0.0)), 0.0)
  scores = jnp.einsum("bthd,bshd,btshd->btsh", fq, fk,
                      jnp.broadcast_to(weight, weight.shape[:4] + (fq.shape[-1],)))
  num = jnp.einsum("btsh,bshd->bthd", scores, vv)
  return _finish(num, jnp.sum(scores, axis=2), normalize, q.dtype)


def linear_recurrent(q, k, v, *, feature_map="elu1", decay=None, normalize=True,
                     segment_ids=None):
  """The recurrent form: a scan over time with state S [B, H, D, Dv] and z [B, H, D]; the state
  is emptied where a new segment starts."""
  fq, fk, vv, g = _prepare(q, k, v, decay, feature_map)
  b, t, h, d = fq.shape
  state = init_state(b, h, d, vv.shape[-1], fq.dtype)
  starts = jnp.zeros((b, t), bool) if segment_ids is None else segment_start_mask(segment_ids)

  def step(state, inputs):
    q_t, k_t, v_t, g_t, start_t = inputs
    keep = (~start_t).astype(q_t.dtype)[:, None]
    state = {"S": state["S"] * keep[..., None, None], "z": state["z"] * keep[..., None]}
    state, num, den = _recurrent_update(state, q_t, k_t, v_t, g_t)
    return state, (num, den)

  xs = tuple(jnp.moveaxis(x, 1, 0) for x in (fq, fk, vv, g, starts))
  _, (num, den) = jax.lax.scan(step, state, xs)
  return _finish(jnp.moveaxis(num, 0, 1), jnp.moveaxis(den, 0, 1), normalize, q.dtype)


def init_state(batch: int, heads: int, dk: int, dv: int, dtype=jnp.float32) -> dict:
  """The recurrent state: S [B, H, Dk, Dv] = sum G phi(k) v^T and z [B, H, Dk] = sum G phi(k)."""
  return {"S": jnp.zeros((batch, heads, dk, dv), dtype), "z": jnp.zeros((batch, heads, dk), dtype)}


def _recurrent_update(state, fq_t, fk_t, v_t, g_t):
  """One token: decay the state by exp(g_t) (g_t [B, H, Dg]: per head or per key dimension),
  add phi(k_t) v_t^T, read it with phi(q_t)."""
  a = jnp.exp(g_t)  # [B, H, Dg]
  s = a[..., None] * state["S"] + fk_t[..., :, None] * v_t[..., None, :]
  z = a * state["z"] + fk_t
  num = jnp.einsum("bhd,bhde->bhe", fq_t, s)
  den = jnp.einsum("bhd,bhd->bh", fq_t, z)
  return {"S": s, "z": z}, num, den


def linear_chunked(q, k, v, *, feature_map="elu1", decay=None, normalize=True, chunk_size=64,
                   segment_ids=None):
  """The chunked form: exact masked products inside each chunk, a state passed between chunks.

  Inside chunk c with local cumulative log-gates b_i (b_i = sum of g over the chunk up to i):
    intra_i = sum_{j<=i in chunk} (phi(q_i) . exp(b_i - b_j) phi(k_j)) v_j
    inter_i = (exp(b_i) phi(q_i)) S_c,   S_{c+1} = exp(b_last) S_c + sum_j (exp(b_last - b_j) phi(k_j)) v_j^T
  Every exponent is <= 0 (per-key-dimension gates too: the intra-chunk decays are taken pairwise,
  [C, C, D] per chunk, never as exp(b_i) / exp(b_j)), so nothing overflows.
  Any T: the tail is zero-padded (padded keys lie after every real query, so causality hides them).
  segment_ids [B, T] (contiguous runs): nothing crosses a segment boundary; inside a chunk pairs
  of different segments are masked, and the state only carries the segment that continues.
  """
  fq, fk, vv, g = _prepare(q, k, v, decay, feature_map)
  b, t, h, d = fq.shape
  dv = vv.shape[-1]
  n = cdiv(t, chunk_size)
  pad = n * chunk_size - t

  def chunks(x):  # [B, T, H, ...] -> [n, B, C, H, ...]
    x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(b, n, chunk_size, *x.shape[2:]), 1, 0)

  seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  cq, ck, cv, cg, cs = chunks(fq), chunks(fk), chunks(vv), chunks(g), chunks(seg)
  causal = jnp.tril(jnp.ones((chunk_size, chunk_size), bool))[None, :, :, None]

  def step(carry, inputs):
    state, prev_seg = carry  # prev_seg [B]: segment of the token before this chunk
    q_c, k_c, v_c, g_c, s_c = inputs  # [B, C, H, D], ..., [B, C, H, Dg], [B, C]
    bcum = jnp.cumsum(g_c, axis=1)  # [B, C, H, Dg]
    mask = causal & (s_c[:, :, None] == s_c[:, None, :])[..., None]  # [B, Ci, Cj, H]
    if g_c.shape[-1] == 1:
      diff = bcum[:, :, None, :, 0] - bcum[:, None, :, :, 0]
      w = jnp.where(mask, jnp.exp(jnp.where(mask, diff, 0.0)), 0.0)  # [B, Ci, Cj, H]
      scores = jnp.einsum("bihd,bjhd->bijh", q_c, k_c) * w
    else:  # per key dimension: the decay sits inside the dot product
      diff = bcum[:, :, None] - bcum[:, None, :]  # [B, Ci, Cj, H, D]
      w = jnp.where(mask[..., None], jnp.exp(jnp.where(mask[..., None], diff, 0.0)), 0.0)
      scores = jnp.einsum("bihd,bjhd,bijhd->bijh", q_c, k_c, w)
    sees_state = (s_c == prev_seg[:, None]).astype(q_c.dtype)[:, :, None, None]  # [B, C, 1, 1]
    q_dec = q_c * jnp.exp(bcum) * sees_state
    num = jnp.einsum("bijh,bjhe->bihe", scores, v_c) + jnp.einsum("bihd,bhde->bihe", q_dec,
                                                                    state["S"])
    den = jnp.sum(scores, axis=2) + jnp.einsum("bihd,bhd->bih", q_dec, state["z"])
    last_seg = s_c[:, -1]
    last = bcum[:, -1:]  # [B, 1, H, Dg]
    in_last = (s_c == last_seg[:, None]).astype(k_c.dtype)[:, :, None, None]
    k_dec = k_c * jnp.exp(last - bcum) * in_last
    carried = (last_seg == prev_seg) & jnp.all(s_c == last_seg[:, None], axis=1)
    a = jnp.exp(last[:, 0]) * carried.astype(k_c.dtype)[:, None, None]  # [B, H, Dg]
    new = {"S": a[..., None] * state["S"] + jnp.einsum("bjhd,bjhe->bhde", k_dec, v_c),
           "z": a * state["z"] + jnp.sum(k_dec, axis=1)}
    return (new, last_seg), (num, den)

  init = (init_state(b, h, d, dv, fq.dtype), seg[:, 0])
  _, (num, den) = jax.lax.scan(step, init, (cq, ck, cv, cg, cs))
  unchunk = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, n * chunk_size, *x.shape[3:])[:, :t]
  return _finish(unchunk(num), unchunk(den), normalize, q.dtype)


def linear_step(state, q_t, k_t, v_t, *, feature_map="elu1", decay_t=None, normalize=True):
  """One decoding step. q_t [B, Hq, D], k_t/v_t [B, Hkv, D]; decay_t None | [Hq] | [B, Hq] |
  [B, Hq, D] (per key dimension). Returns (state, o_t [B, Hq, Dv])."""
  ct = compute_dtype(q_t.dtype)
  b, hq, _ = q_t.shape
  rep = hq // k_t.shape[1]
  fq = apply_feature_map(q_t.astype(ct), feature_map)
  fk = jnp.repeat(apply_feature_map(k_t.astype(ct), feature_map), rep, axis=1)
  vv = jnp.repeat(v_t.astype(ct), rep, axis=1)
  if decay_t is None:
    g = jnp.zeros((b, hq, 1), ct)
  elif decay_t.ndim == 3:
    g = decay_t.astype(ct)
  else:
    g = jnp.broadcast_to(decay_t.astype(ct), (b, hq))[..., None]
  state, num, den = _recurrent_update(state, fq, fk, vv, g)
  return state, _finish(num, den, normalize, q_t.dtype)



def final_state(k, v, *, num_heads: int, feature_map="elu1", decay=None, lengths=None):
  """The recurrent state after each row's first `lengths` tokens (all T when None), in closed
  form: S = sum_{s < len} exp(c_{len-1} - c_s) phi(k_s) v_s^T, z likewise (c the cumulative
  log-gates; every exponent <= 0). What `linear_step` continues from after a prefill.
  k [B, T, Hkv, D], v [B, T, Hkv, Dv]; decay as linear_chunked's. -> {"S": [B, Hq, D, Dv],
  "z": [B, Hq, D]} in the compute dtype."""
  b, t, _, d = k.shape
  ct = compute_dtype(k.dtype)
  fk = _expand_heads(apply_feature_map(k.astype(ct), feature_map), num_heads)
  vv = _expand_heads(v.astype(ct), num_heads)
  g = gates(decay, jnp.zeros((b, t, num_heads, d), ct))  # [B, T, Hq, Dg]
  lengths = jnp.full((b,), t, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
  c = jnp.cumsum(g, axis=1)
  last = jnp.take_along_axis(c, jnp.maximum(lengths - 1, 0)[:, None, None, None], axis=1)
  valid = (jnp.arange(t)[None, :] < lengths[:, None])[:, :, None, None]
  w = jnp.where(valid, jnp.exp(jnp.where(valid, last - c, 0.0)), 0.0)  # [B, T, Hq, Dg]
  kw = fk * w
  return {"S": jnp.einsum("bthd,bthe->bhde", kw, vv), "z": jnp.sum(kw, axis=1)}
