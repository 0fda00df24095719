"""Sparse attention on the block-list TPU flash kernel (pallas_kernels/blockwise/pallas_tpu.py):
a sliding window becomes the band of key blocks plus the in-tile window mask, a BlockMask its
static block lists. Only listed key blocks are loaded and computed.

MoBA (per-token routing) has its own kernels in moba_tpu.py: the own block on this kernel,
the routed blocks over gathered (token, block) pairs.
"""
from __future__ import annotations

from pallas_kernels._common import cdiv
from pallas_kernels.blockwise.pallas_tpu import (DEFAULT_BLOCK, _block_size, block_keep_for,
                                                 flash_attention_tpu)
from pallas_kernels.sparse.moba_tpu import moba_gathered_tpu, moba_tile
from pallas_kernels.sparse.patterns import BlockMask, MoBA, SlidingWindow


def _blocks_for(pattern, t: int, block: int) -> int:
  if isinstance(pattern, BlockMask):
    if pattern.block_size % 8:
      raise ValueError(f"sparse_attention: the TPU kernel needs BlockMask block_size divisible "
                       f"by 8; got {pattern.block_size}")
    return pattern.block_size
  return block


def sparse_flash_tpu(q, k, v, *, pattern, causal=True, segment_ids=None, sm_scale=None,
                     alibi_slopes=None, interpret=None, block=DEFAULT_BLOCK):
  if isinstance(pattern, MoBA):
    if alibi_slopes is not None:
      raise ValueError("the Pallas TPU MoBA kernels do not take alibi_slopes yet "
                       "(use impl='reference' or 'xla')")
    return moba_gathered_tpu(q, k, v, pattern=pattern, segment_ids=segment_ids,
                             sm_scale=sm_scale, interpret=interpret,
                             tile=moba_tile(pattern.block_size, q.shape[1], block),
                             bq=_block_size(q.shape[1], block))
  bs = _blocks_for(pattern, q.shape[1], block)
  kw = dict(causal=causal, segment_ids=segment_ids, sm_scale=sm_scale, alibi_slopes=alibi_slopes,
            interpret=interpret, block_q=bs, block_k=bs)
  if isinstance(pattern, SlidingWindow):
    return flash_attention_tpu(q, k, v, window=pattern.window, **kw)
  return flash_attention_tpu(q, k, v, block_keep=pattern.array, **kw)


def visited_blocks(pattern, t: int, *, causal=True, block=DEFAULT_BLOCK) -> int:
  """How many (query block, key block) tiles the kernel computes for a SlidingWindow or
  BlockMask and this length (MoBA's work depends on the routing: moba_tpu.moba_work_tiles)."""
  bs = _block_size(t, _blocks_for(pattern, t, block))
  n = cdiv(t, bs)
  if isinstance(pattern, SlidingWindow):
    return int(block_keep_for(n, n, bs, bs, causal=causal, window=pattern.window).sum())
  return int((block_keep_for(n, n, bs, bs, causal=causal) & pattern.array).sum())
