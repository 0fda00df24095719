"""Sparsity patterns for sparse_attention: small frozen (hashable, jit-static) dataclasses.

- SlidingWindow(window): query t sees key s iff t - window < s <= t.
- BlockMask(block_size, mask): a static boolean [ceil(T/bs), ceil(S/bs)] mask of key blocks per
  query block, and-ed with causality. Build masks with `block_mask(...)` (local + global/sink +
  strided) or pass any boolean array.
- MoBA(block_size, top_k): Mixture of Block Attention; the routing is in `routing.py`.
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class SlidingWindow:
  window: int

  def __post_init__(self):
    if not isinstance(self.window, int) or self.window <= 0:
      raise ValueError(f"SlidingWindow: window={self.window!r} must be a positive int")


@dataclasses.dataclass(frozen=True)
class BlockMask:
  block_size: int
  mask: tuple  # tuple of tuples of bools, [query blocks][key blocks]; hashable for jit

  def __post_init__(self):
    if not isinstance(self.block_size, int) or self.block_size <= 0:
      raise ValueError(f"BlockMask: block_size={self.block_size!r} must be a positive int")
    array = np.asarray(self.mask, dtype=bool)
    if array.ndim != 2 or 0 in array.shape:
      raise ValueError(f"BlockMask: mask must be a 2-D [q blocks, k blocks] array; got "
                       f"shape {array.shape}")
    object.__setattr__(self, "mask", tuple(map(tuple, array.tolist())))

  @property
  def array(self) -> np.ndarray:
    return np.asarray(self.mask, dtype=bool)


@dataclasses.dataclass(frozen=True)
class MoBA:
  block_size: int
  top_k: int

  def __post_init__(self):
    if not isinstance(self.block_size, int) or self.block_size <= 0:
      raise ValueError(f"MoBA: block_size={self.block_size!r} must be a positive int")
    if not isinstance(self.top_k, int) or self.top_k <= 0:
      raise ValueError(f"MoBA: top_k={self.top_k!r} must be a positive int (own block included)")


def block_mask(num_q_blocks: int, num_k_blocks: int | None = None, *, local: int = 1,
               global_blocks: int = 0, stride: int = 0) -> np.ndarray:
  """[q blocks, k blocks] boolean mask: the union of
  - local: the `local` key blocks ending at the query's own block (i - local < j <= i);
  - global/sink: the first `global_blocks` key blocks, seen by every query block, and the first
    `global_blocks` query blocks, which see every key block;
  - strided: key blocks j with (i - j) % stride == 0 (stride > 0), as in the Sparse Transformer.
  Causality is applied by sparse_attention, not here.
  """
  nk = num_q_blocks if num_k_blocks is None else num_k_blocks
  i = np.arange(num_q_blocks)[:, None]
  j = np.arange(nk)[None, :]
  mask = (j <= i) & (j > i - local)
  if global_blocks > 0:
    mask |= (j < global_blocks) | (i < global_blocks)
  if stride > 0:
    mask |= (i - j) % stride == 0
  return mask


def local_global_strided(block_size: int, num_blocks: int, *, local: int = 1,
                         global_blocks: int = 0, stride: int = 0) -> BlockMask:
  """A square BlockMask built with `block_mask`."""
  return BlockMask(block_size, block_mask(num_blocks, local=local, global_blocks=global_blocks,
                                          stride=stride))
