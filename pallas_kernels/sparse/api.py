"""sparse_attention: softmax attention restricted to a sparsity pattern, for every impl."""
from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels import _common, capabilities
from pallas_kernels.sparse.pallas_gpu import sparse_flash_gpu
from pallas_kernels.sparse.pallas_tpu import sparse_flash_tpu
from pallas_kernels.sparse.patterns import BlockMask, MoBA, SlidingWindow
from pallas_kernels.sparse.reference import sparse_blockwise, sparse_reference

_NAME = "sparse_attention"
_IMPLS = ("auto", "reference", "xla", "pallas", "interpret", "interpret_gpu")
# impl -> backend -> kernel ("any": every backend), as in blockwise/api.py.
KERNELS: dict = {
    "pallas": {"tpu": sparse_flash_tpu, "gpu": sparse_flash_gpu},
    "interpret": {"any": _common.tpu_interpret(sparse_flash_tpu)},
    "interpret_gpu": {"any": _common.gpu_interpret(sparse_flash_gpu)},
}
# Backends where "auto" picks the Pallas kernel. Not the GPU: on an H200 cuDNN's sliding window
# is 1.4x ours (docs/benchmarks.md) and MoBA's kernel runs at a fifth of the window kernel's rate;
# "auto" runs the block-skipping jnp path there until a kernel is measured ahead of it.
AUTO_PALLAS = ("tpu",)


def kernel_for(impl: str, backend: str | None = None):
  return _common.kernel_for(KERNELS, impl, backend)


def resolve_impl(impl: str, *, jnp_only: bool = False, **call) -> str:
  """"auto": the kernel on a TPU (when it takes the call: pallas_kernels.capabilities.sparse
  with `call`'s dtype, head_dim, pattern, block_size, alibi), the block-skipping path on a GPU
  (until its kernels are measured there); on the CPU the dense masked reference, which at the
  lengths CPU runs use is the fastest (the gathers of the block-skipping path cost more there
  than the work they skip). jnp_only: the call has ALiBi the kernels do not take (MoBA's, or
  not causal self-attention), so not the kernel."""
  if impl != "auto":
    return impl
  backend = _common.backend()
  takes = not call or capabilities.sparse("pallas", backend=backend, **call) is None
  if backend in AUTO_PALLAS and kernel_for("pallas", backend) and not jnp_only and takes:
    return "pallas"
  if backend in ("gpu", "tpu"):
    return "xla"
  return "reference"


def sparse_attention(q, k, v, *, pattern, causal=True, segment_ids=None, sm_scale=None,
                     alibi_slopes=None, softcap=None, sinks=None, impl="auto"):
  """Softmax attention under `pattern` (SlidingWindow, BlockMask or MoBA).

  q [B, T, Hq, D], k/v [B, S, Hkv, D] -> [B, T, Hq, D] in q's dtype. segment_ids [B, T]
  (contiguous runs, as packing makes them) and alibi_slopes [Hq] are lmtrain extensions of the
  DESIGN.md signature. impl "reference": dense masked (the oracle); "xla": the block-skipping
  jnp path, whose work is proportional to the kept blocks. The kernels take ALiBi for a
  SlidingWindow (TPU, GPU) and a BlockMask (TPU) in causal self-attention, as the constant
  forget gates of blockwise_attention; MoBA's kernels do not. softcap and sinks as in
  blockwise_attention: the jnp paths only.
  """
  _common.check_impl(impl, _IMPLS, name=_NAME)
  _common.check_qkv(q, k, v, name=_NAME)
  _common.check_segment_ids(segment_ids, q, k, name=_NAME)
  if not isinstance(pattern, (SlidingWindow, BlockMask, MoBA)):
    raise ValueError(f"{_NAME}: pattern={pattern!r} is not a SlidingWindow, BlockMask or MoBA")
  if isinstance(pattern, MoBA) and not causal:
    raise ValueError(f"{_NAME}: MoBA is causal only (causal=False given)")
  if isinstance(pattern, MoBA) and q.shape[1] != k.shape[1]:
    raise ValueError(f"{_NAME}: MoBA needs T == S; got T={q.shape[1]} S={k.shape[1]}")
  if alibi_slopes is not None and alibi_slopes.shape != (q.shape[2],):
    raise ValueError(f"{_NAME}: alibi_slopes{alibi_slopes.shape} must be [Hq] = ({q.shape[2]},)")
  kernel_alibi = causal and q.shape[1] == k.shape[1] and not isinstance(pattern, MoBA)
  name = {SlidingWindow: "window", BlockMask: "blocks", MoBA: "moba"}[type(pattern)]
  extras = bool(softcap) or sinks is not None
  impl = resolve_impl(impl, jnp_only=(alibi_slopes is not None and not kernel_alibi) or extras,
                      dtype=jnp.dtype(q.dtype).name, head_dim=q.shape[-1], pattern=name,
                      block_size=getattr(pattern, "block_size", None),
                      alibi=alibi_slopes is not None)
  kwargs = dict(pattern=pattern, causal=causal, segment_ids=segment_ids, sm_scale=sm_scale,
                alibi_slopes=alibi_slopes)
  if impl == "reference":
    return sparse_reference(q, k, v, softcap=softcap, sinks=sinks, **kwargs)
  if impl == "xla":
    return sparse_blockwise(q, k, v, softcap=softcap, sinks=sinks, **kwargs)
  if extras:
    raise ValueError(f"{_NAME}: impl={impl!r} takes no softcap or sinks (impl='xla' or "
                     "'reference' do)")
  return _common.call_kernel(KERNELS, impl, _NAME, q, k, v, **kwargs)
