"""What each implementation takes, in one place: `auto` picks the first implementation of its
backend's preference list that takes the call, and callers (lmtrain's config validation) ask
the same predicates before compiling, so an impossible explicit choice is one line, not a
traceback from inside a trace.

Every function returns None when `impl` takes the call, else the reason it does not (a phrase).
The jnp implementations ("reference", "xla") take everything.
"""
from __future__ import annotations

JNP = ("reference", "xla")
PALLAS = ("pallas", "interpret", "interpret_gpu")
LOW_PRECISION = ("bfloat16", "float16")
# GPU kernels (Mosaic GPU, Hopper): the head dims and dtypes their tiles are built for.
GPU_ATTENTION_HEAD_DIMS = (64, 128, 192, 256)
GPU_LINEAR_HEAD_DIMS = (64, 128)


def _kernel_backend(impl: str, backend: str) -> str:
  """Which kernel an impl runs: the TPU one, the GPU one, or none."""
  if impl == "interpret":
    return "tpu"
  if impl == "interpret_gpu":
    return "gpu"
  return backend if backend in ("tpu", "gpu") else "none"


def blockwise(impl: str, *, backend: str, dtype: str, head_dim: int, gated: bool = False,
              segments: bool = False, extras: bool = False) -> str | None:
  """blockwise_attention. gated: a forget-gate bias (FoX) or ALiBi; segments: packed segment
  ids (cuDNN would need a dense [B, 1, T, T] mask for them); extras: logit soft-capping or
  attention sinks (the jnp paths only, so far)."""
  if impl in JNP:
    return None
  if extras:
    return "logit soft-capping and attention sinks run on the jnp paths only (impl xla/reference)"
  if impl == "cudnn":
    if backend != "gpu":
      return f"cuDNN needs a CUDA GPU (this backend is {backend})"
    if dtype not in LOW_PRECISION:
      return f"cuDNN attention takes bfloat16/float16, not {dtype}"
    if gated:
      return "cuDNN attention takes no ALiBi or forget-gate bias"
    return None
  kernel = _kernel_backend(impl, backend)
  if kernel == "none":
    return f"there is no Pallas attention kernel for backend {backend}"
  if dtype == "float64":
    return "the Pallas kernels take no float64"
  if kernel == "gpu":
    if dtype not in LOW_PRECISION:
      return f"the Mosaic GPU attention kernel takes bfloat16/float16, not {dtype}"
    if head_dim not in GPU_ATTENTION_HEAD_DIMS:
      return (f"the Mosaic GPU attention kernel takes head dims "
              f"{', '.join(map(str, GPU_ATTENTION_HEAD_DIMS))}, not {head_dim}")
  return None


def sparse(impl: str, *, backend: str, dtype: str, head_dim: int, pattern: str,
           block_size: int | None = None, alibi: bool = False, extras: bool = False) -> str | None:
  """sparse_attention; pattern is "window", "blocks" or "moba"."""
  if impl in JNP:
    return None
  if impl == "cudnn":
    return "sparse_attention has no cuDNN path"
  why = blockwise(impl, backend=backend, dtype=dtype, head_dim=head_dim, extras=extras)
  if why:
    return why
  kernel = _kernel_backend(impl, backend)
  if alibi and pattern == "moba":
    return "the Pallas MoBA kernels take no ALiBi"
  if alibi and pattern == "blocks" and kernel == "gpu":
    return "the Mosaic GPU block-mask kernels take no ALiBi"
  if block_size is not None and pattern in ("blocks", "moba"):
    multiple = 8 if kernel == "tpu" else 64
    if block_size % multiple:
      return (f"the {'TPU' if kernel == 'tpu' else 'Mosaic GPU'} kernel needs block_size a "
              f"multiple of {multiple}, not {block_size}")
  return None


def linear(impl: str, *, backend: str, dtype: str, head_dim: int, chunk_size: int,
           per_dim_gates: bool = False) -> str | None:
  """linear_attention; per_dim_gates: gates per key dimension (GLA)."""
  if impl in JNP:
    return None
  if impl == "cudnn":
    return "linear_attention has no cuDNN path"
  kernel = _kernel_backend(impl, backend)
  if kernel == "none":
    return f"there is no Pallas linear-attention kernel for backend {backend}"
  if per_dim_gates:
    return "the Pallas linear-attention kernels take scalar decay only, not per-key gates"
  if dtype == "float64":
    return "the Pallas kernels take no float64"
  if kernel == "gpu":
    if head_dim not in GPU_LINEAR_HEAD_DIMS:
      return f"the Mosaic GPU linear kernel takes head dims 64 or 128, not {head_dim}"
    if chunk_size not in (64, 128):
      return f"the Mosaic GPU linear kernel takes chunk_size 64 or 128, not {chunk_size}"
  return None


def delta(impl: str, **_) -> str | None:
  """delta_rule: the jnp forms only, so far."""
  if impl in JNP:
    return None
  return "the delta rule has no Pallas kernel yet"
