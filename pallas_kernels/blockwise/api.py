"""blockwise_attention: softmax attention computed block by block, one entry for every impl."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import _common, capabilities
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
# Backends where "auto" picks the Pallas kernel. Not the GPU: on an H200 cuDNN is ahead of our
# kernel at every length (docs/benchmarks.md: forward+backward 0.61x cuDNN at 32k).
AUTO_PALLAS = ("tpu",)


def kernel_for(impl: str, backend: str | None = None):
  return _common.kernel_for(KERNELS, impl, backend)


def _cudnn(q, k, v, *, causal, segment_ids, sm_scale):
  if _common.backend() != "gpu":
    raise ValueError(f"{_NAME}: impl='cudnn' needs a CUDA GPU; this backend is {_common.backend()}")
  mask = None
  if segment_ids is not None:
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
  return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=sm_scale, is_causal=causal,
                                      implementation="cudnn")


def resolve_impl(impl: str, *, log_gates: bool = False, alibi: bool = False,
                 dtype: str = "bfloat16", head_dim: int = 128, segments: bool = False,
                 extras: bool = False) -> str:
  """"auto" -> the best implementation this backend has that takes the call (the predicates of
  pallas_kernels.capabilities). log_gates: a gate bias (FoX, or ALiBi of causal
  self-attention); alibi: ALiBi that is not causal self-attention (jnp paths only); segments:
  packed segment ids, which cuDNN would take only as a dense [B, 1, T, T] mask (2 GiB per
  sequence at 32k tokens), so auto does not give them to it. Where no kernel takes the call,
  the blockwise jnp path (memory linear in T), never the dense one."""
  if impl != "auto":
    return impl
  backend = _common.backend()
  call = dict(backend=backend, dtype=dtype, head_dim=head_dim, gated=log_gates or alibi,
              extras=extras)
  if (backend in AUTO_PALLAS and kernel_for("pallas", backend) is not None and not alibi
      and capabilities.blockwise("pallas", **call) is None):
    return "pallas"
  if backend == "gpu" and not segments and capabilities.blockwise("cudnn", **call) is None:
    return "cudnn"
  return "reference"


def blockwise_attention(q, k, v, *, causal=True, segment_ids=None, sm_scale=None,
                        alibi_slopes=None, log_gates=None, softcap=None, sinks=None,
                        impl="auto"):
  """Softmax attention, q [B, T, Hq, D], k/v [B, S, Hkv, D] -> [B, T, Hq, D] in q's dtype.

  impl: "reference" (jnp online softmax), "xla" (dense), "cudnn" (GPU), "pallas" (the Pallas
  kernel of this backend: Mosaic TPU, or Mosaic GPU on Hopper), "interpret" / "interpret_gpu"
  (the TPU / GPU kernel in its interpret mode, on any backend), "auto".

  causal: query t sees key s only if s <= t. segment_ids [B, T] int32: tokens attend only within
  their own segment (packed documents). sm_scale defaults to D**-0.5.

  log_gates [B, T, Hq] (any float dtype, used in fp32; finite, <= 0): the Forgetting
  Transformer's forget gates, log f_t per query head (Lin et al., ICLR 2025). With c the running
  sum of log_gates over time, restarting at each segment's first token, the logit of query i
  and key j <= i gets c_i - c_j = sum_{l=j+1..i} log f_l. Causal self-attention only (T == S).
  Differentiable in log_gates. alibi_slopes [Hq]: adds -slope * (t - s) to the logits, which is
  log_gates = -slope at every token, and runs as such (one mechanism; both may be given and
  add). Without causality, or with T != S, ALiBi is -slope * |t - s| on the jnp paths only.
  (Both are lmtrain extensions of the DESIGN.md signature.) cudnn takes neither.

  softcap (> 0): Gemma 2's logit soft-capping, softcap * tanh(q.k * scale / softcap), before any
  bias. sinks [Hq]: a learned logit per head added to every row's softmax denominator, a key
  without a value (gpt-oss's attention sinks); differentiable. Both run on the jnp paths
  (reference, xla; auto goes there); the kernels and cuDNN refuse them in one line.
  """
  _common.check_impl(impl, _common.IMPLS, name=_NAME)
  _common.check_qkv(q, k, v, name=_NAME)
  _common.check_segment_ids(segment_ids, q, k, name=_NAME)
  _common.check_gates(log_gates, alibi_slopes, q, k, causal=causal, name=_NAME)
  if impl == "cudnn" and (log_gates is not None or alibi_slopes is not None):
    what = "log_gates" if log_gates is not None else "alibi_slopes"
    raise ValueError(f"{_NAME}: impl='cudnn' does not take {what} (use impl='xla')")
  if alibi_slopes is not None and causal and q.shape[1] == k.shape[1]:
    alibi = _common.alibi_log_gates(alibi_slopes, q.shape[0], q.shape[1])
    log_gates = alibi if log_gates is None else log_gates + alibi
    alibi_slopes = None
  extras = bool(softcap) or sinks is not None
  if sinks is not None and sinks.shape != (q.shape[2],):
    raise ValueError(f"{_NAME}: sinks{sinks.shape} must be [Hq] = ({q.shape[2]},)")
  if softcap is not None and not softcap >= 0:
    raise ValueError(f"{_NAME}: softcap={softcap!r} must be > 0 (or 0/None: off)")
  impl = resolve_impl(impl, log_gates=log_gates is not None, alibi=alibi_slopes is not None,
                      dtype=jnp.dtype(q.dtype).name, head_dim=q.shape[-1],
                      segments=segment_ids is not None, extras=extras)
  kwargs = dict(causal=causal, segment_ids=segment_ids, sm_scale=sm_scale,
                alibi_slopes=alibi_slopes, log_gates=log_gates)
  if impl == "reference":
    return blockwise_reference(q, k, v, softcap=softcap, sinks=sinks, **kwargs)
  if impl == "xla":
    return dense_attention(q, k, v, softcap=softcap, sinks=sinks, **kwargs)
  if extras:
    raise ValueError(f"{_NAME}: impl={impl!r} takes no softcap or sinks (impl='xla' or "
                     "'reference' do)")
  if impl == "cudnn":
    return _cudnn(q, k, v, causal=causal, segment_ids=segment_ids, sm_scale=sm_scale)
  return _common.call_kernel(KERNELS, impl, _NAME, q, k, v, **kwargs)
