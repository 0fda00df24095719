"""Small building blocks: initialisers with logical axis names, the SwiGLU MLP, dropout."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

# Variables carry logical axis names (see lmtrain.parallel.LOGICAL_AXIS_RULES); shardings are
# applied by the trainer from that one table, not eagerly by flax.
nnx.use_eager_sharding(False)

INIT_STD = 0.02


def normal_init(axes: tuple[str, ...], std: float = INIT_STD):
  return nnx.with_partitioning(nnx.initializers.normal(std), axes)


def ones_init(axes: tuple[str, ...]):
  return nnx.with_partitioning(nnx.initializers.ones_init(), axes)


def rms_norm(dim: int, dims, rngs: nnx.Rngs) -> nnx.RMSNorm:
  return nnx.RMSNorm(dim, epsilon=1e-6, dtype=dims.compute_dtype, param_dtype=jnp.float32,
                     scale_init=ones_init(("embed",)), rngs=rngs)


class SwiGLU(nnx.Module):
  """down(silu(gate(x)) * up(x)): x [B, T, D] -> [B, T, D]."""

  def __init__(self, dims, *, out_std: float, rngs: nnx.Rngs):
    d, f = dims.d_model, dims.mlp_dim
    dense = lambda i, o, axes, std: nnx.Linear(i, o, use_bias=False, dtype=dims.compute_dtype,
                                               kernel_init=normal_init(axes, std), rngs=rngs)
    self.gate = dense(d, f, ("embed", "mlp"), INIT_STD)
    self.up = dense(d, f, ("embed", "mlp"), INIT_STD)
    self.down = dense(f, d, ("mlp", "embed"), out_std)

  def __call__(self, x_BTD):
    return self.down(jax.nn.silu(self.gate(x_BTD)) * self.up(x_BTD))


def dropout(x, rate: float, rng):
  """Inverted dropout; identity when rate == 0 or no rng is given (evaluation)."""
  if rate == 0.0 or rng is None:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
