"""Sparse attention on the Mosaic GPU flash kernels (pallas_kernels/blockwise/pallas_gpu.py): a
sliding window is the kernel's key-block range [first block of the window, diagonal] plus the
in-tile window mask, so only the band is loaded and computed; MoBA is in moba_gpu.py. BlockMask
has no GPU kernel yet (impl="xla" runs its block-skipping jnp path)."""
from __future__ import annotations

from pallas_kernels.blockwise.pallas_gpu import flash_attention_gpu
from pallas_kernels.sparse.moba_gpu import moba_gpu
from pallas_kernels.sparse.patterns import MoBA, SlidingWindow


def sparse_flash_gpu(q, k, v, *, pattern, causal=True, segment_ids=None, sm_scale=None,
                     alibi_slopes=None, interpret=None):
  if isinstance(pattern, MoBA):
    return moba_gpu(q, k, v, pattern=pattern, segment_ids=segment_ids, sm_scale=sm_scale,
                    alibi_slopes=alibi_slopes, interpret=interpret)
  if not isinstance(pattern, SlidingWindow):
    raise ValueError(f"sparse_attention: impl='pallas' on a GPU runs SlidingWindow and MoBA so "
                     f"far; got {type(pattern).__name__} (use impl='xla')")
  return flash_attention_gpu(q, k, v, causal=causal, segment_ids=segment_ids, sm_scale=sm_scale,
                             alibi_slopes=alibi_slopes, interpret=interpret,
                             window=pattern.window)
