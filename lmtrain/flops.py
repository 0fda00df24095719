"""Training FLOPs per step, counted honestly by attention kind, and accelerator peaks for MFU.

Matmul FLOPs: 6 per parameter per token (forward 2, backward 4) for every weight matrix of the
model (projections, gates, convolutions, the output projection), embedding lookups excluded.
Token-mixing FLOPs are what each mixer declares (`Mixer.forward_flops`): only the work the kind
must do (the causal half for softmax, the kept query-key pairs for sparse kinds, the chunked
algorithm's products for linear kinds), times 3 for training (forward + backward). A kernel
that does more (e.g. computes full masked tiles) gets no credit for it.
"""
from __future__ import annotations

import math

from lmtrain.model.dims import ModelDims

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


def matmul_params(model_cfg) -> int:
  """Parameters that are multiplied with every token: every weight matrix (ndim >= 2) of the
  model, its mixers' gates and convolutions included, except the embedding table (a lookup;
  counted when tied, since it is then the output projection too)."""
  from flax import nnx
  from lmtrain.model import Transformer
  abstract = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))
  params = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
  total = 0
  for path, var in params:
    names = [str(p) for p in path]
    if names[0] == "embed" and not model_cfg.tie_embeddings:
      continue
    if var.value.ndim >= 2:
      total += math.prod(var.value.shape)
  return total


def attention_forward_flops(kind: str, model_cfg, dims: ModelDims, t: int) -> float:
  """Forward FLOPs of one layer's token mixing (beyond its parameter matmuls) for one sequence
  of length t, as the kind's mixer declares them."""
  from lmtrain.model import mixers
  from lmtrain.model.transformer import mixer_options
  return mixers.get(kind).forward_flops(mixer_options(model_cfg.attention, kind), dims, t)


def train_flops_per_step(model_cfg, batch_size: int, seq_len: int) -> float:
  """6 FLOPs per matmul parameter per token, plus 3x the mixers' forward token-mixing FLOPs."""
  dims = ModelDims.from_config(model_cfg)
  flops = 6.0 * matmul_params(model_cfg) * batch_size * seq_len
  for kind in dims.layer_kinds:
    flops += 3.0 * batch_size * attention_forward_flops(kind, model_cfg, dims, seq_len)
  return flops
