"""blockwise_attention: softmax attention computed block by block, one entry for every impl."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import _common
from pallas_kernels.blockwise.pallas_gpu import flash_attention_gpu
from pallas_kernels.blockwise.pallas_tpu import flash_attention_tpu
from pallas_kernels.blockwise.reference import blockwise_reference, dense_attention

_NAME = "blockwise_attention"


# impl -> backend -> kernel ("any": every backend, e.g. interpret mode on the CPU).
KERNELS: dict = {
    "pallas": {"tpu": flash_attention_tpu, "gpu": flash_attention_gpu},
    "interpret": {"any": _common.tpu_interpret(flash_attention_tpu)},
    "interpret_gpu": {"any": _common.gpu_interpret(flash_attention_gpu)},
}
# Backends where "auto" picks the Pallas kernel: the GPU kernel is not measured yet, and cuDNN
# is (docs/benchmarks.md); it joins this set when the benchmark shows it ahead.
AUTO_PALLAS = ("tpu",)


def kernel_for(impl: str, backend: str | None = None):
  return _common.kernel_for(KERNELS, impl, backend)


def _cudnn(q, k, v, *, causal, segment_ids, sm_scale, alibi_slopes):
  if _common.backend() != "gpu":
    raise ValueError(f"{_NAME}: impl='cudnn' needs a CUDA GPU; this backend is {_common.backend()}")
  if alibi_slopes is not None:
    raise ValueError(f"{_NAME}: impl='cudnn' does not take alibi_slopes")
  mask = None
  if segment_ids is not None:
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
  return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=sm_scale, is_causal=causal,
                                      implementation="cudnn")


def resolve_impl(impl: str) -> str:
  """"auto" -> the best implementation this backend has."""
  if impl != "auto":
    return impl
  backend = _common.backend()
  if backend in AUTO_PALLAS and kernel_for("pallas", backend) is not None:
    return "pallas"
  if backend == "gpu":
    return "cudnn"
  if backend == "tpu":
    return "xla"
  return "reference"


def blockwise_attention(q, k, v, *, causal=True, segment_ids=None, sm_scale=None,
                        alibi_slopes=None, impl="auto"):
  """Softmax attention, q [B, T, Hq, D], k/v [B, S, Hkv, D] -> [B, T, Hq, D] in q's dtype.

  impl: "reference" (jnp online softmax), "xla" (dense), "cudnn" (GPU), "pallas" (the Pallas
  kernel of this backend: Mosaic TPU, or Mosaic GPU on Hopper), "interpret" / "interpret_gpu"
  (the TPU / GPU kernel in its interpret mode, on any backend), "auto".

  causal: query t sees key s only if s <= t. segment_ids [B, T] int32: tokens attend only within
  their own segment (packed documents). sm_scale defaults to D**-0.5. alibi_slopes [Hq]: adds
  -slope * (t - s) to the logits (an lmtrain extension of the DESIGN.md signature).
  """
  _common.check_impl(impl, _common.IMPLS, name=_NAME)
  _common.check_qkv(q, k, v, name=_NAME)
  _common.check_segment_ids(segment_ids, q, k, name=_NAME)
  if alibi_slopes is not None and alibi_slopes.shape != (q.shape[2],):
    raise ValueError(f"{_NAME}: alibi_slopes{alibi_slopes.shape} must be [Hq] = ({q.shape[2]},)")
  impl = resolve_impl(impl)
  kwargs = dict(causal=causal, segment_ids=segment_ids, sm_scale=sm_scale,
                alibi_slopes=alibi_slopes)
  if impl == "reference":
    return blockwise_reference(q, k, v, **kwargs)
  if impl == "xla":
    return dense_attention(q, k, v, **kwargs)
  if impl == "cudnn":
    return _cudnn(q, k, v, **kwargs)
  return _common.call_kernel(KERNELS, impl, _NAME, q, k, v, **kwargs)
