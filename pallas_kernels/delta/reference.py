"""The delta rule in plain jnp: recurrent (a scan over tokens) and chunked (WY / UT) forms.

DeltaNet (Yang et al., NeurIPS 2024, "Parallelizing Linear Transformers with the Delta Rule over
Sequence Length") and Gated DeltaNet (Yang et al., ICLR 2025, "Gated Delta Networks: Improving
Mamba2 with Delta Rule"). Per key/value head, with the state S [Dk, Dv]:

  S_t = a_t S_{t-1} + b_t k_t (v_t - a_t S_{t-1}^T k_t)^T
      = (I - b_t k_t k_t^T) a_t S_{t-1} + b_t k_t v_t^T
  o_t = S_t^T q_t                                   (read after the update)

a_t = exp(g_t) with log-gates g_t <= 0 (a_t = 1 for DeltaNet: log_gates None); b_t = beta_t in
[0, 1]. The state is a fast-weight memory written by one step of online regression: the value
stored under k_t moves a fraction b_t of the way towards v_t. Nothing is scaled or normalised
here: the caller L2-normalises (and scales) q and k. The rule expects ||k_t|| = 1: then
I - b_t k_t k_t^T has eigenvalues in [1 - b_t, 1] and the state stays bounded; with longer keys
it can grow without bound.

A token with b_t = 0 and g_t = 0 changes nothing (the state passes through it); decoders rely on
this to right-pad prompts.

Shapes: q [B, T, Hq, Dk], k [B, T, Hkv, Dk], v [B, T, Hkv, Dv], beta and log_gates [B, T, Hkv];
the state belongs to the key/value head ([B, Hkv, Dk, Dv]) and query head h reads the state of
key/value head h // (Hq // Hkv). segment_ids [B, T] (contiguous runs): the state is reset to zero
wherever the id changes, so packed documents never see each other; an initial state continues
the row's first segment. Everything is computed in fp32 (fp64 for fp64 inputs); outputs come back
in q's dtype and states in the compute dtype.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels._common import cdiv


def compute_dtype(dtype):
  return jnp.promote_types(dtype, jnp.float32)


def init_state(batch: int, kv_heads: int, dk: int, dv: int, dtype=jnp.float32):
  """The recurrent state S [B, Hkv, Dk, Dv], all zeros (no token seen)."""
  return jnp.zeros((batch, kv_heads, dk, dv), dtype)


def _prepare(q, k, v, beta, log_gates, initial_state):
  """Casts to the compute dtype; q grouped by key/value head [B, T, Hkv, G, Dk]; gates [B, T, Hkv]
  (zeros for DeltaNet); the initial state [B, Hkv, Dk, Dv] (zeros when None)."""
  ct = compute_dtype(q.dtype)
  b, t, hq, dk = q.shape
  hkv, dv = k.shape[2], v.shape[-1]
  qg = q.astype(ct).reshape(b, t, hkv, hq // hkv, dk)
  g = jnp.zeros((b, t, hkv), ct) if log_gates is None else log_gates.astype(ct)
  s0 = init_state(b, hkv, dk, dv, ct) if initial_state is None else initial_state.astype(ct)
  return qg, k.astype(ct), v.astype(ct), beta.astype(ct), g, s0


def _runs(segment_ids, b: int, t: int):
  """Run index of each token [B, T] int32: 0 for the row's first segment, +1 at every change of
  id (so a reused id that is not contiguous still starts a new document)."""
  if segment_ids is None:
    return jnp.zeros((b, t), jnp.int32)
  change = (segment_ids[:, 1:] != segment_ids[:, :-1]).astype(jnp.int32)
  return jnp.concatenate([jnp.zeros((b, 1), jnp.int32), jnp.cumsum(change, axis=1)], axis=1)


def _ungroup(o_BTKGE, dtype):
  b, t, hkv, grp, dv = o_BTKGE.shape
  return o_BTKGE.reshape(b, t, hkv * grp, dv).astype(dtype)


def _token_update(state, q_t, k_t, v_t, b_t, g_t):
  """One token. state [B, Hkv, Dk, Dv], q_t [B, Hkv, G, Dk], k_t [B, Hkv, Dk], v_t [B, Hkv, Dv],
  b_t and g_t [B, Hkv]. Returns (new state, o_t [B, Hkv, G, Dv])."""
  s = jnp.exp(g_t)[..., None, None] * state
  # The delta: what the (decayed) memory returns for k_t, corrected towards v_t by beta.
  u = b_t[..., None] * (v_t - jnp.einsum("bhde,bhd->bhe", s, k_t))
  s = s + k_t[..., :, None] * u[..., None, :]
  return s, jnp.einsum("bhgd,bhde->bhge", q_t, s)


def _recurrent_step(state, inputs):
  q_t, k_t, v_t, b_t, g_t, reset_t = inputs
  state = jnp.where(reset_t[:, None, None, None], 0.0, state)  # a new document starts empty
  return _token_update(state, q_t, k_t, v_t, b_t, g_t)


def delta_recurrent(q, k, v, beta, *, log_gates=None, segment_ids=None, initial_state=None,
                    return_state=False):
  """The recurrent form: a lax.scan over tokens, the rule exactly as written in the module doc.

  q [B, T, Hq, Dk], k [B, T, Hkv, Dk], v [B, T, Hkv, Dv], beta [B, T, Hkv], log_gates None or
  [B, T, Hkv], segment_ids None or [B, T], initial_state None or [B, Hkv, Dk, Dv].
  Returns o [B, T, Hq, Dv] (q's dtype), or (o, final state [B, Hkv, Dk, Dv]) with return_state.
  """
  return _recurrent(q, k, v, beta, log_gates, segment_ids, initial_state, return_state)


# Both forms run under jit (a nested jit is inlined under an outer one): called eagerly (tests,
# notebooks) they compile once per shape instead of once per operation. Positional arguments keep
# the jit cache key the same whichever keywords the caller spelled out.
@functools.partial(jax.jit, static_argnums=(7,))
def _recurrent(q, k, v, beta, log_gates, segment_ids, initial_state, return_state):
  qg, k, v, beta, g, s0 = _prepare(q, k, v, beta, log_gates, initial_state)
  b, t = q.shape[:2]
  runs = _runs(segment_ids, b, t)
  reset = jnp.concatenate([jnp.zeros((b, 1), bool), runs[:, 1:] != runs[:, :-1]], axis=1)

  xs = tuple(jnp.moveaxis(x, 1, 0) for x in (qg, k, v, beta, g, reset))
  state, o = jax.lax.scan(_recurrent_step, s0, xs)
  o = _ungroup(jnp.moveaxis(o, 0, 1), q.dtype)
  return (o, state) if return_state else o


def _chunk_step(state, inputs):
  """One chunk of the scan in delta_chunked: the delta values against the carried state, the
  outputs, and the state after the chunk."""
  w, u_local, qk, q_in, k_out, a_chunk = inputs
  u = u_local - jnp.einsum("bihd,bhde->bihe", w, state)
  o = jnp.einsum("bihgd,bhde->bihge", q_in, state) + jnp.einsum("bijhg,bjhe->bihge", qk, u)
  state = a_chunk[..., None, None] * state + jnp.einsum("bjhd,bjhe->bhde", k_out, u)
  return state, o


def delta_chunked(q, k, v, beta, *, log_gates=None, segment_ids=None, chunk_size=64,
                  initial_state=None, return_state=False):
  """The chunked WY / UT-transform form of the DeltaNet and Gated DeltaNet papers.

  Inside a chunk of C tokens with the state S entering it, let c_i = sum_{r<=i} g_r (cumulative
  log-gates from the chunk start) and D_ij = exp(c_i - c_j) for j <= i (0 above the diagonal).
  Unrolling the rule, the delta values u_i = b_i (v_i - a_i S_{i-1}^T k_i) satisfy
    (I + A) U = diag(b) V - diag(b) diag(exp(c)) K S,   A = strictly_lower(diag(b) K K^T * D),
  so with the UT transform T = (I + A)^{-1} diag(b) (a unit-lower triangular solve),
    W = T diag(exp(c)) K,   U = T V - W S,
    O = diag(exp(c)) Q S + (Q K^T * D) U,
    S' = exp(c_last) S + (K * exp(c_last - c))^T U.
  T, W and T V depend on the chunk only and are built for all chunks at once; the lax.scan over
  chunks then carries S through three matmuls per chunk. Every exponent is <= 0 (pairwise
  differences, never exp(c_i) / exp(c_j)), so nothing overflows.

  Any T: the tail is padded with beta 0 and gates 0, tokens that pass the state through.
  segment_ids: A and D are masked to pairs of the same document; only tokens of the document that
  continues from the previous chunk read the carried S; S' keeps the carried S only if the whole
  chunk continues that document, and sums the last document's tokens only. This is exact.

  Shapes as delta_recurrent. Returns o [B, T, Hq, Dv], or (o, final state) with return_state.
  """
  return _chunked(q, k, v, beta, log_gates, segment_ids, initial_state, chunk_size, return_state)


@functools.partial(jax.jit, static_argnums=(7, 8))
def _chunked(q, k, v, beta, log_gates, segment_ids, initial_state, chunk_size, return_state):
  qg, k, v, beta, g, s0 = _prepare(q, k, v, beta, log_gates, initial_state)
  b, t, hkv, grp, dk = qg.shape
  dv = v.shape[-1]
  c = chunk_size
  n = cdiv(t, c)
  pad = n * c - t

  def chunks(x, mode="constant"):  # [B, T, ...] -> [B, N, C, ...]
    x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2), mode=mode)
    return x.reshape(b, n, c, *x.shape[2:])

  cq, ck, cv, cb, cg = (chunks(x) for x in (qg, k, v, beta, g))
  runs = chunks(_runs(segment_ids, b, t), mode="edge")  # padding continues the last document
  # The document carried into chunk n is that of chunk n-1's last token (chunk 0: the first).
  prev = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), runs[:, :-1, -1]], axis=1)  # [B, N]
  sees = (runs == prev[:, :, None]).astype(cq.dtype)  # [B, N, C]: reads the carried state
  in_last = (runs == runs[:, :, -1:]).astype(cq.dtype)  # [B, N, C]: writes the outgoing state
  carried = (runs[:, :, -1] == prev).astype(cq.dtype)  # [B, N]: one document spans the chunk

  cum = jnp.cumsum(cg, axis=2)  # [B, N, C, Hkv]
  ids = jnp.arange(c)
  same = runs[:, :, :, None] == runs[:, :, None, :]  # [B, N, Ci, Cj]
  incl = (ids[:, None] >= ids[None, :]) & same
  strict = (ids[:, None] > ids[None, :]) & same
  diff = cum[:, :, :, None] - cum[:, :, None, :]  # [B, N, Ci, Cj, Hkv]
  # Masked before exp: exp of the (positive) upper-triangle differences could overflow, and
  # inf * 0 would poison the gradients.
  decay = jnp.where(incl[..., None], jnp.exp(jnp.where(incl[..., None], diff, 0.0)), 0.0)

  a_mat = jnp.einsum("bnih,bnihd,bnjhd,bnijh->bnhij", cb, ck, ck,
                     decay * strict[..., None].astype(decay.dtype))
  eye = jnp.eye(c, dtype=a_mat.dtype)
  ut = jax.lax.linalg.triangular_solve(  # T = (I + A)^{-1} diag(b): [B, N, Hkv, C, C]
      eye + a_mat, eye * jnp.moveaxis(cb, 2, -1)[..., None, :], left_side=True, lower=True,
      unit_diagonal=True)
  gate_in = jnp.exp(cum) * sees[..., None]  # [B, N, C, Hkv]: decay from the chunk start
  w = jnp.einsum("bnhij,bnjhd->bnihd", ut, ck * gate_in[..., None])
  u_local = jnp.einsum("bnhij,bnjhe->bnihe", ut, cv)
  qk = jnp.einsum("bnihgd,bnjhd,bnijh->bnijhg", cq, ck, decay)
  q_in = cq * gate_in[..., None, None]
  k_out = ck * (jnp.exp(cum[:, :, -1:] - cum) * in_last[..., None])[..., None]
  a_chunk = jnp.exp(cum[:, :, -1]) * carried[..., None]  # [B, N, Hkv]

  xs = tuple(jnp.moveaxis(x, 1, 0) for x in (w, u_local, qk, q_in, k_out, a_chunk))
  state, o = jax.lax.scan(_chunk_step, s0, xs)  # o [N, B, C, Hkv, G, Dv]
  o = jnp.moveaxis(o, 0, 1).reshape(b, n * c, hkv, grp, dv)[:, :t]
  o = _ungroup(o, q.dtype)
  return (o, state) if return_state else o


def delta_step(state, q_t, k_t, v_t, beta_t, log_gate_t=None):
  """One decoding step. state [B, Hkv, Dk, Dv], q_t [B, Hq, Dk], k_t [B, Hkv, Dk], v_t
  [B, Hkv, Dv], beta_t [B, Hkv], log_gate_t None or [B, Hkv].
  Returns (state [B, Hkv, Dk, Dv] in the compute dtype, o_t [B, Hq, Dv] in q_t's dtype)."""
  ct = compute_dtype(q_t.dtype)
  b, hq, dk = q_t.shape
  hkv = k_t.shape[1]
  g = jnp.zeros((b, hkv), ct) if log_gate_t is None else log_gate_t.astype(ct)
  state, o = _token_update(state.astype(ct), q_t.astype(ct).reshape(b, hkv, hq // hkv, dk),
                           k_t.astype(ct), v_t.astype(ct), beta_t.astype(ct), g)
  return state, o.reshape(b, hq, -1).astype(q_t.dtype)
