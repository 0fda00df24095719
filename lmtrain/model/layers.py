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


class ShortConv(nnx.Module):
  """Depthwise causal convolution over time, then SiLU: the short convolution of the linear-
  attention layers (Mamba, DeltaNet, GLA in flash-linear-attention). x [B, T, H, D] ->
  y_t = silu(sum_{j < K} w[K - 1 - j] * x_{t-j}); taps never reach across a packed document.
  No bias; weights uniform in +-1/sqrt(K), PyTorch's default for a depthwise Conv1d (Mamba's
  and fla's SimpleGLA layer's; fla's model classes re-initialise them to normal(0, 0.02), which
  at small widths leaves q, k, v near zero and the output norm dominated by its epsilon)."""

  def __init__(self, shape: tuple[int, ...], size: int, axes: tuple[str, ...], *, dtype,
               rngs: nnx.Rngs):
    self.size = size
    self.dtype = dtype
    bound = size ** -0.5
    init = nnx.with_partitioning(
        lambda key, shp, dt=jnp.float32: jax.random.uniform(key, shp, dt, -bound, bound),
        (None, *axes))
    self.kernel = nnx.Param(init(rngs.params(), (size, *shape)))

  def __call__(self, x_BTHD, segment_ids_BT=None):
    w = self.kernel[...].astype(self.dtype)
    t = x_BTHD.shape[1]
    out = x_BTHD * w[self.size - 1]
    for j in range(1, self.size):
      shifted = jnp.pad(x_BTHD, ((0, 0), (j, 0), (0, 0), (0, 0)))[:, :t]
      if segment_ids_BT is not None:
        same = jnp.pad(segment_ids_BT, ((0, 0), (j, 0)), constant_values=-1)[:, :t] == segment_ids_BT
        shifted = shifted * same[:, :, None, None].astype(shifted.dtype)
      out = out + shifted * w[self.size - 1 - j]
    return jax.nn.silu(out)

  def step(self, x_BHD, tail_BKHD):
    """One token: tail holds the K - 1 previous inputs (oldest first). Returns (y, tail)."""
    window = jnp.concatenate([tail_BKHD, x_BHD[:, None].astype(tail_BKHD.dtype)], axis=1)
    y = jnp.einsum("bkhd,khd->bhd", window.astype(self.dtype), self.kernel[...].astype(self.dtype))
    return jax.nn.silu(y), window[:, 1:]


class HeadRMSNorm(nnx.Module):
  """RMSNorm over the last axis of [..., H, D] with one learned scale [D] shared by the heads
  (the per-head output norm of GLA / DeltaNet layers), computed in fp32; eps 1e-5."""

  def __init__(self, dim: int, *, dtype, eps: float = 1e-5, rngs: nnx.Rngs):
    del rngs
    self.scale = nnx.Param(ones_init(("head_dim",))(None, (dim,), jnp.float32))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x):
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...]).astype(self.dtype)
