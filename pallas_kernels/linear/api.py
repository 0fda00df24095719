"""linear_attention and linear_attention_step: the entry points for every impl."""
from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels import _common, capabilities
from pallas_kernels.linear.pallas_gpu import linear_attention_gpu
from pallas_kernels.linear.pallas_tpu import linear_attention_tpu
from pallas_kernels.linear.reference import (FEATURE_MAPS, final_state, init_state,
                                             linear_chunked, linear_step)

_NAME = "linear_attention"
_IMPLS = ("auto", "reference", "xla", "pallas", "interpret", "interpret_gpu")
# impl -> backend -> kernel ("any": every backend), as in blockwise/api.py.
KERNELS: dict = {
    "pallas": {"tpu": linear_attention_tpu, "gpu": linear_attention_gpu},
    "interpret": {"any": _common.tpu_interpret(linear_attention_tpu)},
    "interpret_gpu": {"any": _common.gpu_interpret(linear_attention_gpu)},
}
# Backends where "auto" picks the Pallas kernel. GPU: measured on an H200 (docs/benchmarks.md,
# bf16, 32k tokens, constant decay): forward+backward 2.3 ms at T = 8k and 2.6 ms at 32k against
# 15.3 and 37.2 ms for the XLA chunked form, so the kernel wherever it takes the call (bf16 /
# fp16, head dims 64 / 128, chunks 64 / 128); the XLA chunked form elsewhere.
AUTO_PALLAS = ("tpu", "gpu")


def kernel_for(impl: str, backend: str | None = None):
  return _common.kernel_for(KERNELS, impl, backend)


def _check(q, k, v, decay, feature_map, chunk_size):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"{_NAME}: q, k, v must be [B, T, H, D]; got q{q.shape} k{k.shape} v{v.shape}")
  b, t, hq, d = q.shape
  if k.shape[:2] != (b, t) or v.shape[:3] != k.shape[:3] or k.shape[3] != d:
    raise ValueError(f"{_NAME}: k{k.shape} must be [B, T, Hkv, D] and v{v.shape} [B, T, Hkv, Dv] "
                     f"for q{q.shape} (causal self-attention: S == T)")
  if hq % k.shape[2]:
    raise ValueError(f"{_NAME}: query heads {hq} are not a multiple of key/value heads {k.shape[2]}")
  if feature_map not in FEATURE_MAPS:
    raise ValueError(f"{_NAME}: feature_map={feature_map!r} is not one of {', '.join(FEATURE_MAPS)}")
  if decay is not None and decay.shape not in ((hq,), (b, t, hq), (b, t, hq, d)):
    raise ValueError(f"{_NAME}: decay{decay.shape} must be [Hq] = ({hq},), [B, T, Hq] = "
                     f"{(b, t, hq)} or [B, T, Hq, D] = {(b, t, hq, d)}")
  if not isinstance(chunk_size, int) or chunk_size <= 0:
    raise ValueError(f"{_NAME}: chunk_size={chunk_size!r} must be a positive int")


def kernel_takes(decay) -> bool:
  """The Pallas kernels take scalar decay (none, per head, per token and head); per-key-dimension
  gates (GLA) run on the chunked jnp form only, for now."""
  return decay is None or decay.ndim < 4


def resolve_impl(impl: str, decay=None, *, head_dim: int = 128, chunk_size: int = 64,
                 dtype: str = "bfloat16") -> str:
  """"auto" -> the Pallas kernel of this backend where it is measured ahead (AUTO_PALLAS) and
  takes the call (scalar decay, pallas_kernels.capabilities.linear; on a GPU bf16 / fp16, as
  measured), else the XLA chunked form."""
  if impl != "auto":
    return impl
  backend = _common.backend()
  if (backend not in AUTO_PALLAS or not kernel_for("pallas", backend) or not kernel_takes(decay)
      or capabilities.linear("pallas", backend=backend, dtype=dtype, head_dim=head_dim,
                             chunk_size=chunk_size) is not None
      or (backend == "gpu" and dtype not in capabilities.LOW_PRECISION)):
    return "xla"
  return "pallas"


def linear_attention(q, k, v, *, feature_map="elu1", decay=None, normalize=True, chunk_size=64,
                     segment_ids=None, impl="auto"):
  """Causal linear attention, q [B, T, Hq, D], k [B, T, Hkv, D], v [B, T, Hkv, Dv].

  decay: None; per-head log-decay [Hq] (constant, RetNet style); per-token log-gates [B, T, Hq]
  (data-dependent, Mamba-2 / simple GLA style); or per-token, per-key-dimension log-gates
  [B, T, Hq, D] (GLA, Yang et al., 2024: jnp impls only so far); values <= 0. See reference.py
  for the formula.
  segment_ids [B, T] (contiguous runs, an lmtrain extension): no state crosses a segment
  boundary, so packed documents are independent.
  impl "reference" and "xla" both run the chunked jnp form (XLA compiles it); the parallel and
  recurrent forms are in reference.py for tests and decoding.
  """
  _common.check_impl(impl, _IMPLS, name=_NAME)
  _check(q, k, v, decay, feature_map, chunk_size)
  if segment_ids is not None and segment_ids.shape != q.shape[:2]:
    raise ValueError(f"{_NAME}: segment_ids{segment_ids.shape} must be [B, T] = {q.shape[:2]}")
  impl = resolve_impl(impl, decay, head_dim=q.shape[-1], chunk_size=chunk_size,
                      dtype=jnp.dtype(q.dtype).name)
  kwargs = dict(feature_map=feature_map, decay=decay, normalize=normalize, chunk_size=chunk_size,
                segment_ids=segment_ids)
  if impl in ("reference", "xla"):
    return linear_chunked(q, k, v, **kwargs)
  if not kernel_takes(decay):
    raise ValueError(f"{_NAME}: impl={impl!r}: the Pallas kernels take scalar decay only; "
                     "per-key-dimension gates [B, T, Hq, D] run on impl='xla' (or 'auto')")
  return _common.call_kernel(KERNELS, impl, _NAME, q, k, v, **kwargs)


def linear_attention_step(state, q_t, k_t, v_t, *, feature_map="elu1", decay=None,
                          normalize=True):
  """The recurrent form for decoding one token.

  state: from `linear_attention_init_state(B, Hq, D, Dv)` (or a previous step); q_t [B, Hq, D],
  k_t [B, Hkv, D], v_t [B, Hkv, Dv]; decay None | [Hq] | [B, Hq] | [B, Hq, D] (this token's
  log-gates).
  Returns (state, o_t [B, Hq, Dv]).
  """
  if feature_map not in FEATURE_MAPS:
    raise ValueError(f"linear_attention_step: feature_map={feature_map!r} is not one of "
                     f"{', '.join(FEATURE_MAPS)}")
  return linear_step(state, q_t, k_t, v_t, feature_map=feature_map, decay_t=decay,
                     normalize=normalize)


linear_attention_init_state = init_state
linear_attention_state = final_state
