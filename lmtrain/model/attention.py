"""The attention layer: projections, positions, and the attention function picked by config.

Every kind shares the q/k/v/o projections and positions, so swapping `attention.kind` changes
only the function that mixes tokens (and, for data-dependent linear attention, adds the gate
projection that produces its per-token log-gates).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import pallas_kernels
from lmtrain.config import attention_option
from lmtrain.model import positions as pos
from lmtrain.model.layers import normal_init
from lmtrain.ring_attention import SEQUENCE_AXIS, ring_attention

# GLA's normaliser: log-gates are log_sigmoid(.) / 16, so a fresh layer keeps most of its state.
GATE_LOGIT_NORMALIZER = 16.0


def retnet_log_decays(num_heads: int) -> np.ndarray:
  """RetNet's fixed per-head decays gamma_h = 1 - 2^(-5 - h), as log-decays [H] (< 0)."""
  return np.log1p(-(2.0 ** (-5.0 - np.arange(num_heads)))).astype(np.float32)


class Attention(nnx.Module):
  """x [B, T, D] -> [B, T, D]; q [B, T, Hq, Dh], k/v [B, T, Hkv, Dh] in between."""

  def __init__(self, dims, attn_cfg, kind: str, *, out_std: float, rngs: nnx.Rngs):
    self.kind = kind
    self.position = dims.position
    self.rope_theta = dims.rope_theta
    self.impl = attn_cfg.impl
    # Static, hashable options of this kind (jit-friendly; the ConfigDict is not kept).
    self.options = tuple((f, attention_option(attn_cfg, f)) for f in _KIND_OPTIONS[kind])
    h, hkv, dh, d = dims.num_heads, dims.num_kv_heads, dims.head_dim, dims.d_model
    proj = lambda out, axes: nnx.LinearGeneral(d, out, use_bias=False, dtype=dims.compute_dtype,
                                               kernel_init=normal_init(axes), rngs=rngs)
    self.q_proj = proj((h, dh), ("embed", "heads", "head_dim"))
    self.k_proj = proj((hkv, dh), ("embed", "kv_heads", "head_dim"))
    self.v_proj = proj((hkv, dh), ("embed", "kv_heads", "head_dim"))
    self.o_proj = nnx.LinearGeneral((h, dh), d, axis=(-2, -1), use_bias=False,
                                    dtype=dims.compute_dtype,
                                    kernel_init=normal_init(("heads", "head_dim", "embed"), out_std),
                                    rngs=rngs)
    if kind == "linear" and self.opt("decay") == "data_dependent":
      self.gate_proj = nnx.Linear(d, h, use_bias=True, dtype=dims.compute_dtype,
                                  kernel_init=normal_init(("embed", "heads")),
                                  bias_init=nnx.with_partitioning(
                                      nnx.initializers.constant(math.log(15.0)), ("heads",)),
                                  rngs=rngs)
    self.alibi = tuple(pos.alibi_slopes(h).tolist()) if dims.position == "alibi" else None
    self.num_heads = h

  def opt(self, field: str):
    return dict(self.options)[field]

  def __call__(self, x_BTD, positions_BT, segment_ids_BT):
    q = self.q_proj(x_BTD)
    k = self.k_proj(x_BTD)
    v = self.v_proj(x_BTD)
    if self.position == "rope":
      q = pos.apply_rope(q, positions_BT, theta=self.rope_theta)
      k = pos.apply_rope(k, positions_BT, theta=self.rope_theta)
    if self.kind == "linear":
      out = self._linear(x_BTD, q, k, v, segment_ids_BT)
    else:
      out = self._softmax_family(q, k, v, segment_ids_BT)
    return self.o_proj(out)

  def _softmax_family(self, q, k, v, segment_ids):
    slopes = None if self.alibi is None else jnp.asarray(self.alibi, jnp.float32)
    common = dict(causal=True, segment_ids=segment_ids, alibi_slopes=slopes, impl=self.impl)
    if self.kind == "softmax":
      mesh = jax.sharding.get_abstract_mesh()
      if not mesh.empty and mesh.shape.get(SEQUENCE_AXIS, 1) > 1:
        # context parallelism: the trainer laid the sequence out zigzag over the sequence axis
        return ring_attention(q, k, v, segment_ids, mesh=mesh)
      return pallas_kernels.blockwise_attention(q, k, v, **common)
    return pallas_kernels.sparse_attention(q, k, v, pattern=self._pattern(q.shape[1]), **common)

  def _pattern(self, t: int):
    if self.kind == "sliding_window":
      return pallas_kernels.SlidingWindow(self.opt("window"))
    if self.kind == "moba":
      return pallas_kernels.MoBA(self.opt("block_size"), self.opt("top_k"))
    if self.kind == "block_sparse":
      bs = self.opt("block_size")
      nb = -(-t // bs)
      return pallas_kernels.BlockMask(bs, pallas_kernels.block_mask(
          nb, local=self.opt("local_blocks"), global_blocks=self.opt("global_blocks"),
          stride=self.opt("stride")))
    raise ValueError(f"model.attention.kind={self.kind!r} has no sparsity pattern")

  def _linear(self, x_BTD, q, k, v, segment_ids):
    decay = self.opt("decay")
    if decay == "constant":
      log_decay = jnp.asarray(retnet_log_decays(self.num_heads))
    elif decay == "data_dependent":
      gate_logits = self.gate_proj(x_BTD).astype(jnp.float32)  # [B, T, Hq]
      log_decay = jax.nn.log_sigmoid(gate_logits) / GATE_LOGIT_NORMALIZER
    else:
      log_decay = None
    # segment_ids: the recurrent state never carries across a packed document boundary.
    return pallas_kernels.linear_attention(q, k, v, feature_map=self.opt("feature_map"),
                                           decay=log_decay, normalize=self.opt("normalize"),
                                           chunk_size=self.opt("chunk_size"),
                                           segment_ids=segment_ids, impl=self.impl)


_KIND_OPTIONS = {
    "softmax": (),
    "sliding_window": ("window",),
    "block_sparse": ("block_size", "local_blocks", "global_blocks", "stride"),
    "moba": ("block_size", "top_k"),
    "linear": ("feature_map", "decay", "normalize", "chunk_size"),
}
