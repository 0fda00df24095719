"""Training FLOPs per step, counted honestly by attention kind, and accelerator peaks for MFU.

Matmul FLOPs: 6 per parameter per token (forward 2, backward 4) for every dense projection,
the output projection included, embedding lookups excluded. Attention FLOPs count only the
work the kind must do: the causal half for softmax, the kept query-key pairs for sparse kinds,
the chunked algorithm's products for linear attention; times 3 for training (forward +
backward). A kernel that does more (e.g. computes full masked tiles) gets no credit for it.
"""
from __future__ import annotations

import math

from lmtrain.config import attention_option
from lmtrain.model.transformer import ModelDims

# Dense bf16 peak FLOP/s per chip (vendor datasheets), matched against jax's device_kind.
PEAK_BF16 = (
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("A10", 125e12),
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v4", 275e12), ("TPU v3", 123e12),
)


def peak_flops(device_kind: str, dtype: str) -> float | None:
  """The chip's dense peak for bf16/fp16 compute; None when unknown (CPU) or fp32 compute."""
  if dtype not in ("bfloat16", "float16"):
    return None
  for name, peak in PEAK_BF16:
    if name.lower() in device_kind.lower():
      return peak
  return None


def attention_pairs(kind: str, attn_cfg, t: int) -> float:
  """Query-key pairs a causal sequence of length t needs for this kind (softmax family)."""
  opt = lambda f: attention_option(attn_cfg, f)
  if kind == "softmax":
    return t * (t + 1) / 2
  if kind == "sliding_window":
    w = min(opt("window"), t)
    return w * (w + 1) / 2 + (t - w) * w
  if kind == "moba":
    bs, k = opt("block_size"), opt("top_k")
    pairs = 0.0
    for blk in range(math.ceil(t / bs)):
      n = min(bs, t - blk * bs)
      pairs += n * (n + 1) / 2 + n * min(k - 1, blk) * bs
    return pairs
  if kind == "block_sparse":
    from pallas_kernels.sparse import block_mask
    bs = opt("block_size")
    nb = math.ceil(t / bs)
    mask = block_mask(nb, local=opt("local_blocks"), global_blocks=opt("global_blocks"),
                      stride=opt("stride"))
    pairs = 0.0
    for i in range(nb):
      for j in range(i + 1):
        if mask[i, j]:
          pairs += bs * (bs + 1) / 2 if i == j else bs * bs
    return pairs
  raise ValueError(f"no pair count for attention kind {kind!r}")


def attention_forward_flops(kind: str, attn_cfg, dims: ModelDims, t: int) -> float:
  """Forward FLOPs of one layer's token mixing for one sequence of length t."""
  h, d = dims.num_heads, dims.head_dim
  if kind == "linear":
    c = attention_option(attn_cfg, "chunk_size")
    # per token: intra-chunk q.k and scores.v (causal half of a C x C tile), state read and
    # state update (D x Dv each)
    return t * h * (2 * (c + 1) / 2 * 2 * d + 4 * d * d)
  return 4.0 * h * d * attention_pairs(kind, attn_cfg, t)


def train_flops_per_step(model_cfg, batch_size: int, seq_len: int) -> float:
  dims = ModelDims.from_config(model_cfg)
  d, h, hkv, dh = dims.d_model, dims.num_heads, dims.num_kv_heads, dims.head_dim
  per_layer = d * h * dh * 2 + d * hkv * dh * 2 + 3 * d * dims.mlp_dim  # q,o + k,v + mlp
  matmul_params = dims.num_layers * per_layer + d * dims.vocab_size
  flops = 6.0 * matmul_params * batch_size * seq_len
  for kind in dims.layer_kinds:
    flops += 3.0 * batch_size * attention_forward_flops(kind, model_cfg.attention, dims, seq_len)
  return flops
