"""delta_rule and delta_rule_step: the entry points for every impl."""
from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels import _common
from pallas_kernels.delta.reference import delta_chunked, delta_step, init_state

_NAME = "delta_rule"
_IMPLS = ("auto", "reference", "xla", "pallas", "interpret", "interpret_gpu")
_KERNEL_IMPLS = ("pallas", "interpret", "interpret_gpu")
# impl -> backend -> kernel, as in linear/api.py. Empty: the delta family has no Pallas kernel
# yet, so kernel_for(...) is None (lmtrain's config validation asks it) and "auto" runs the
# chunked jnp form everywhere.
KERNELS: dict = {}


def kernel_for(impl: str, backend: str | None = None):
  return _common.kernel_for(KERNELS, impl, backend)


def resolve_impl(impl: str) -> str:
  return "xla" if impl == "auto" else impl


def _check(q, k, v, beta, log_gates, segment_ids, initial_state, chunk_size):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"{_NAME}: q, k, v must be [B, T, H, D]; got q{q.shape} k{k.shape} v{v.shape}")
  b, t, hq, dk = q.shape
  hkv, dv = k.shape[2], v.shape[3]
  if k.shape != (b, t, hkv, dk) or v.shape[:3] != k.shape[:3]:
    raise ValueError(f"{_NAME}: k{k.shape} must be [B, T, Hkv, Dk] and v{v.shape} [B, T, Hkv, Dv] "
                     f"for q{q.shape} (causal self-attention: S == T)")
  if t == 0:
    raise ValueError(f"{_NAME}: empty sequence: q{q.shape}")
  if hkv == 0 or hq % hkv:
    raise ValueError(f"{_NAME}: query heads {hq} are not a multiple of key/value heads {hkv}")
  if beta.shape != (b, t, hkv):
    raise ValueError(f"{_NAME}: beta{beta.shape} must be [B, T, Hkv] = {(b, t, hkv)}")
  if log_gates is not None and log_gates.shape != (b, t, hkv):
    raise ValueError(f"{_NAME}: log_gates{log_gates.shape} must be [B, T, Hkv] = {(b, t, hkv)}")
  if segment_ids is not None and segment_ids.shape != (b, t):
    raise ValueError(f"{_NAME}: segment_ids{segment_ids.shape} must be [B, T] = {(b, t)}")
  if initial_state is not None and initial_state.shape != (b, hkv, dk, dv):
    raise ValueError(f"{_NAME}: initial_state{initial_state.shape} must be [B, Hkv, Dk, Dv] = "
                     f"{(b, hkv, dk, dv)}")
  if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
    raise ValueError(f"{_NAME}: chunk_size={chunk_size!r} must be a positive int")


def delta_rule(q, k, v, beta, *, log_gates=None, segment_ids=None, chunk_size=64,
               initial_state=None, return_state=False, impl="auto"):
  """The delta rule (DeltaNet) and, with log_gates, the gated delta rule (Gated DeltaNet).

  Per key/value head, state S [Dk, Dv]:
    S_t = a_t S_{t-1} + b_t k_t (v_t - a_t S_{t-1}^T k_t)^T,   o_t = S_t^T q_t
  with a_t = exp(log_gates_t) (1 when log_gates is None) and b_t = beta_t in [0, 1].
  q [B, T, Hq, Dk], k [B, T, Hkv, Dk], v [B, T, Hkv, Dv], beta [B, T, Hkv], log_gates None or
  [B, T, Hkv] (values <= 0); query head h reads the state of key/value head h // (Hq // Hkv).
  No scale or normalisation is applied: the caller L2-normalises k (the rule expects ||k|| = 1
  for stability) and q, and scales q if it wants to.
  segment_ids [B, T] (contiguous runs): the state is reset wherever the id changes (packed
  documents never see each other); initial_state [B, Hkv, Dk, Dv] continues the row's first
  segment. Returns o [B, T, Hq, Dv] in q's dtype, or with return_state (o, final state
  [B, Hkv, Dk, Dv]), the state after the last token (compute dtype: fp32, or fp64).
  impl "auto", "reference" and "xla" run the chunked WY / UT form (reference.delta_chunked; XLA
  compiles it); there is no Pallas kernel yet.
  """
  _common.check_impl(impl, _IMPLS, name=_NAME)
  if impl in _KERNEL_IMPLS:
    raise ValueError(f"{_NAME}: impl={impl!r}: the delta family has no Pallas kernel yet "
                     "(impl='auto', 'xla' or 'reference' run the chunked jnp form)")
  _check(q, k, v, beta, log_gates, segment_ids, initial_state, chunk_size)
  return delta_chunked(q, k, v, beta, log_gates=log_gates, segment_ids=segment_ids,
                       chunk_size=chunk_size, initial_state=initial_state,
                       return_state=return_state)


def delta_rule_step(state, q_t, k_t, v_t, beta_t, log_gate_t=None):
  """One token of the (gated) delta rule, for decoding.

  state [B, Hkv, Dk, Dv] (from delta_rule_init_state, a previous step, or delta_rule's
  return_state), q_t [B, Hq, Dk], k_t [B, Hkv, Dk], v_t [B, Hkv, Dv], beta_t [B, Hkv],
  log_gate_t None or [B, Hkv]. Returns (state, o_t [B, Hq, Dv] in q_t's dtype).
  """
  name = "delta_rule_step"
  if state.ndim != 4 or q_t.ndim != 3 or k_t.ndim != 3 or v_t.ndim != 3:
    raise ValueError(f"{name}: state must be [B, Hkv, Dk, Dv] and q_t, k_t, v_t [B, H, D]; got "
                     f"state{state.shape} q_t{q_t.shape} k_t{k_t.shape} v_t{v_t.shape}")
  b, hkv, dk, dv = state.shape
  if k_t.shape != (b, hkv, dk) or v_t.shape != (b, hkv, dv):
    raise ValueError(f"{name}: k_t{k_t.shape} must be {(b, hkv, dk)} and v_t{v_t.shape} "
                     f"{(b, hkv, dv)} for state{state.shape}")
  if q_t.shape[0] != b or q_t.shape[2] != dk or q_t.shape[1] % hkv:
    raise ValueError(f"{name}: q_t{q_t.shape} must be [B, Hq, Dk] with Hq a multiple of "
                     f"Hkv = {hkv} for state{state.shape}")
  if beta_t.shape != (b, hkv):
    raise ValueError(f"{name}: beta_t{beta_t.shape} must be [B, Hkv] = {(b, hkv)}")
  if log_gate_t is not None and log_gate_t.shape != (b, hkv):
    raise ValueError(f"{name}: log_gate_t{log_gate_t.shape} must be [B, Hkv] = {(b, hkv)}")
  return delta_step(state, q_t, k_t, v_t, beta_t, log_gate_t)


def delta_rule_init_state(batch: int, kv_heads: int, dk: int, dv: int, dtype=jnp.float32):
  """The empty state [B, Hkv, Dk, Dv] (zeros) that delta_rule_step starts from; float32 is the
  compute dtype of fp32 and bf16 inputs (float64 for fp64)."""
  return init_state(batch, kv_heads, dk, dv, dtype)
