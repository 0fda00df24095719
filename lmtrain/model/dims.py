"""The resolved numbers of the `model` config subtree that every layer reads."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def layer_kinds(model_cfg) -> tuple[str, ...]:
  """The token-mixer kind of each layer: attention.layer_pattern repeated over the depth."""
  pattern = model_cfg.attention.layer_pattern
  if not pattern:
    return (model_cfg.attention.kind,) * model_cfg.num_layers
  kinds = [p.strip() for p in pattern.split(",")]
  return tuple(kinds[i % len(kinds)] for i in range(model_cfg.num_layers))


@dataclasses.dataclass(frozen=True)
class ModelDims:
  """Sizes shared by every block (head_dim derived, dtype resolved)."""
  vocab_size: int
  num_layers: int
  d_model: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  tie_embeddings: bool
  compute_dtype: jnp.dtype
  dropout_rate: float
  layer_kinds: tuple[str, ...]

  @classmethod
  def from_config(cls, cfg) -> "ModelDims":
    head_dim = cfg.head_dim or cfg.d_model // cfg.num_heads
    return cls(vocab_size=cfg.vocab_size, num_layers=cfg.num_layers, d_model=cfg.d_model,
               num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=head_dim,
               mlp_dim=cfg.mlp_dim, tie_embeddings=cfg.tie_embeddings,
               compute_dtype=DTYPES[cfg.dtype], dropout_rate=cfg.dropout_rate,
               layer_kinds=layer_kinds(cfg))
