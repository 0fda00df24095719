"""`block_sparse`: softmax attention under a static block mask, the union of local blocks,
global/sink blocks and strided blocks (Child et al., 2019, "Generating Long Sequences with
Sparse Transformers"; global blocks as in Zaheer et al., 2020, "Big Bird").
"""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

import pallas_kernels
from lmtrain.model.mixers import register
from lmtrain.model.mixers.softmax import SoftmaxFamily, SoftmaxOptions


@dataclasses.dataclass(frozen=True)
class BlockSparseOptions(SoftmaxOptions):
  block_size: int | None = None  # None: data.seq_len // 8
  local_blocks: int = 2  # the query's own block and the one before
  global_blocks: int = 1  # the first block sees and is seen by all (a sink)
  stride: int = 4  # key blocks j with (i - j) % stride == 0; 0 = none

  def resolve(self, seq_len):
    if self.block_size is not None:
      return self
    return dataclasses.replace(self, block_size=max(seq_len // 8, 1))

  def validate(self, ctx):
    super().validate(ctx)
    ctx.positive(self, "block_size", "local_blocks")
    ctx.positive(self, "global_blocks", "stride", allow_zero=True)

  def mask(self, t: int):
    nb = math.ceil(t / self.block_size)
    return pallas_kernels.block_mask(nb, local=self.local_blocks,
                                     global_blocks=self.global_blocks, stride=self.stride)


@register
class BlockSparse(SoftmaxFamily):
  kind = "block_sparse"
  Options = BlockSparseOptions
  paper = "Child et al., 2019 (Sparse Transformers); Zaheer et al., 2020 (Big Bird)"

  def attend(self, q, k, v, segment_ids):
    pattern = pallas_kernels.BlockMask(self.options.block_size, self.options.mask(q.shape[1]))
    return pallas_kernels.sparse_attention(q, k, v, pattern=pattern, causal=True,
                                           segment_ids=segment_ids,
                                           alibi_slopes=self.alibi_slopes(), impl=self.impl,
                                           **self.options.attention_kwargs(self))

  def decode_mask(self, q_BHD, k_BSKD, key_pos_BS, position_B):
    bs = self.options.block_size
    mask = jnp.asarray(self.options.mask(k_BSKD.shape[1]))  # [nb, nb] over the cache length
    blocks = mask[(position_B // bs)[:, None], jnp.maximum(key_pos_BS, 0) // bs]  # [B, S]
    return super().decode_mask(q_BHD, k_BSKD, key_pos_BS, position_B) & blocks[:, None]

  @classmethod
  def sparse_pattern(cls, options):
    return "blocks", options.block_size

  @classmethod
  def pairs(cls, options, t):
    bs = options.block_size
    mask = options.mask(t)
    pairs = 0.0
    for i in range(mask.shape[0]):
      for j in range(i + 1):
        if mask[i, j]:
          rows = min(bs, t - i * bs)
          pairs += rows * (rows + 1) / 2 if i == j else rows * bs
    return pairs
