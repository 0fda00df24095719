"""Checks that need a GPU (marked gpu: skipped elsewhere; scripts/gpu_check.sh runs them)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import blockwise_attention, linear_attention, sparse_attention, SlidingWindow
from pallas_kernels.blockwise import dense_attention
from tests.conftest import small_config

pytestmark = pytest.mark.gpu


def _qkv(b=2, t=1000, hq=8, hkv=2, d=128, dtype=jnp.bfloat16):
  keys = jax.random.split(jax.random.key(0), 3)
  return (jax.random.normal(keys[0], (b, t, hq, d), dtype),
          jax.random.normal(keys[1], (b, t, hkv, d), dtype),
          jax.random.normal(keys[2], (b, t, hkv, d), dtype))


@pytest.mark.parametrize("impl", ["cudnn", "reference", "auto", "pallas"])
def test_softmax_impls_match_the_fp32_reference_on_gpu(impl):
  q, k, v = _qkv()
  seg = jnp.asarray(np.repeat([[1] * 600 + [2] * 400], 2, axis=0), jnp.int32)
  want = dense_attention(*(x.astype(jnp.float32) for x in (q, k, v)), segment_ids=seg)
  got = blockwise_attention(q, k, v, segment_ids=seg, impl=impl)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(got.astype(jnp.float32), want, atol=3e-2)


@pytest.mark.parametrize("causal,d,schedule,backward", [
    (True, 64, "ws", "split"), (True, 128, "ws", "split"), (False, 128, "ws", "split"),
    (True, 256, "ws", "split"), (True, 128, "one_warpgroup", "split"),
    (False, 64, "one_warpgroup", "split"), (True, 128, "ws", "fused"),
    (False, 64, "ws", "fused"), (True, 128, "one_warpgroup", "fused")])
def test_mosaic_gpu_kernel_gradients_match_the_fp32_reference(causal, d, schedule, backward):
  """The Mosaic GPU kernels on the device (register wgmma operands, the path the CPU tests can
  only lower; the fused backward's TMA reduce-add, which interpret mode replaces), both
  schedules, both backwards: the three gradients, bf16 tolerance."""
  from pallas_kernels.blockwise.pallas_gpu import flash_attention_gpu
  q, k, v = _qkv(t=700, d=d)
  seg = jnp.asarray(np.repeat([[1] * 400 + [2] * 300], 2, axis=0), jnp.int32)
  cot = jax.random.normal(jax.random.key(1), q.shape, jnp.float32)

  def loss(attn):
    def f(q, k, v):
      return jnp.sum(attn(q, k, v).astype(jnp.float32) * cot)
    return jax.jit(jax.grad(f, argnums=(0, 1, 2)))

  ours = lambda q, k, v: flash_attention_gpu(q, k, v, causal=causal, segment_ids=seg,
                                             schedule=schedule, backward=backward)
  f32 = lambda x: x.astype(jnp.float32)
  xla = lambda q, k, v: blockwise_attention(f32(q), f32(k), f32(v), causal=causal,
                                            segment_ids=seg, impl="xla")
  for got, want in zip(loss(ours)(q, k, v), loss(xla)(q, k, v)):
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(got.astype(jnp.float32), want, atol=2e-2 * scale)


@pytest.mark.parametrize("schedule,backward", [("ws", "split"), ("ws", "fused"),
                                              ("one_warpgroup", "split"),
                                              ("one_warpgroup", "fused")])
def test_mosaic_gpu_forget_gates_match_the_fp32_reference(schedule, backward):
  """FoX's gate bias on the device, both schedules and backwards: the output and the gradients
  of q, k, v and the gates (strong enough decay that whole key tiles underflow) against the
  dense fp32 path."""
  from pallas_kernels.blockwise.pallas_gpu import flash_attention_gpu
  q, k, v = _qkv(t=700, d=128)
  seg = jnp.asarray(np.repeat([[1] * 400 + [2] * 300], 2, axis=0), jnp.int32)
  gates = -jax.random.uniform(jax.random.key(2), (2, 700, 8), jnp.float32, 0.0, 2.0)
  cot = jax.random.normal(jax.random.key(1), q.shape, jnp.float32)
  f32 = lambda x: x.astype(jnp.float32)

  def value_and_grads(attn):
    def f(q, k, v, g):
      out = f32(attn(q, k, v, g))
      return jnp.sum(out * cot), out
    (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))(
        q, k, v, gates)
    return out, grads

  ours = lambda q, k, v, g: flash_attention_gpu(q, k, v, segment_ids=seg, log_gates=g,
                                                schedule=schedule, backward=backward)
  xla = lambda q, k, v, g: blockwise_attention(f32(q), f32(k), f32(v), segment_ids=seg,
                                               log_gates=g, impl="xla")
  (got, got_grads), (want, want_grads) = value_and_grads(ours), value_and_grads(xla)
  for a, b in zip((got, *got_grads), (want, *want_grads)):
    assert np.all(np.isfinite(np.asarray(f32(a))))
    np.testing.assert_allclose(f32(a), b, atol=2e-2 * max(float(jnp.max(jnp.abs(b))), 1.0))


@pytest.mark.parametrize("schedule", ["ws", "one_warpgroup"])
@pytest.mark.parametrize("causal,ratio", [(True, 4), (False, 1)])
def test_mosaic_gpu_forward_schedules_match_the_reference(schedule, causal, ratio):
  """The warp-specialised forward (three warpgroups, TMA producer) and the plain one, on a
  ragged length with segments, against the fp32 reference."""
  from pallas_kernels.blockwise.pallas_gpu import flash_attention_gpu
  q, k, v = _qkv(t=1900, hq=2 * ratio, hkv=2)
  seg = jnp.asarray(np.repeat([[1] * 1000 + [2] * 900], 2, axis=0), jnp.int32)
  got = jax.jit(lambda q, k, v: flash_attention_gpu(q, k, v, causal=causal, segment_ids=seg,
                                                    schedule=schedule))(q, k, v)
  want = dense_attention(*(x.astype(jnp.float32) for x in (q, k, v)), causal=causal,
                         segment_ids=seg)
  np.testing.assert_allclose(got.astype(jnp.float32), want, atol=3e-2)


@pytest.mark.parametrize("window", [100, 1024])
def test_mosaic_gpu_sliding_window_matches_the_reference(window):
  q, k, v = _qkv(t=1500)
  got = sparse_attention(q, k, v, pattern=SlidingWindow(window), impl="pallas")
  want = sparse_attention(*(x.astype(jnp.float32) for x in (q, k, v)),
                          pattern=SlidingWindow(window), impl="reference")
  np.testing.assert_allclose(got.astype(jnp.float32), want, atol=3e-2)


@pytest.mark.parametrize("normalize,chunk", [(True, 64), (False, 64), (True, 128)])
def test_mosaic_gpu_linear_kernels_match_the_reference(normalize, chunk):
  """Forward and the gradients of q, k, v and the gates, on the device."""
  q, k, v = _qkv(t=1000)
  gates = -jax.nn.softplus(jax.random.normal(jax.random.key(2), q.shape[:3]))
  seg = jnp.asarray(np.repeat([[1] * 600 + [2] * 400], 2, axis=0), jnp.int32)
  cot = jax.random.normal(jax.random.key(3), q.shape, jnp.float32)
  kw = dict(segment_ids=seg, normalize=normalize, feature_map="elu1" if normalize else "identity",
            chunk_size=chunk)

  def run(impl, cast):
    def f(q, k, v, g):
      out = linear_attention(cast(q), cast(k), cast(v), decay=g, impl=impl, **kw)
      return jnp.sum(out.astype(jnp.float32) * cot), out
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, gates)

  (_, got), got_grads = run("pallas", lambda x: x)
  (_, want), want_grads = run("xla", lambda x: x.astype(jnp.float32))
  for a, b in zip((got, *got_grads), (want, *want_grads)):
    scale = float(jnp.max(jnp.abs(b)))
    np.testing.assert_allclose(a.astype(jnp.float32), b, atol=3e-2 * scale)


def test_mosaic_gpu_moba_matches_the_reference():
  from pallas_kernels import MoBA
  q, k, v = _qkv(t=1500)
  got = sparse_attention(q, k, v, pattern=MoBA(256, 3), impl="pallas")
  want = sparse_attention(*(x.astype(jnp.float32) for x in (q, k, v)), pattern=MoBA(256, 3),
                          impl="reference")
  np.testing.assert_allclose(got.astype(jnp.float32), want, atol=3e-2)


def test_mosaic_gpu_block_mask_matches_the_reference():
  from pallas_kernels import BlockMask, block_mask
  q, k, v = _qkv(t=1024)
  pattern = BlockMask(128, block_mask(8, local=2, global_blocks=1, stride=3))
  got = sparse_attention(q, k, v, pattern=pattern, impl="pallas")
  want = sparse_attention(*(x.astype(jnp.float32) for x in (q, k, v)), pattern=pattern,
                          impl="reference")
  np.testing.assert_allclose(got.astype(jnp.float32), want, atol=3e-2)


def test_linear_and_sparse_jnp_paths_run_on_gpu():
  q, k, v = _qkv(t=512)
  out = linear_attention(q, k, v, decay=-jnp.ones((8,)) * 0.05)
  assert out.shape == q.shape and bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
  got = sparse_attention(q, k, v, pattern=SlidingWindow(128))
  want = sparse_attention(q, k, v, pattern=SlidingWindow(128), impl="reference")
  np.testing.assert_allclose(got.astype(jnp.float32), want.astype(jnp.float32), atol=3e-2)


def test_bf16_training_on_gpu_lowers_the_loss(tmp_path):
  from lmtrain.train import train
  from tests.conftest import read_scalars
  cfg = small_config(**{"model.dtype": "bfloat16", "train.steps": 30, "train.eval_every": 30,
                        "train.checkpoint_every": 30})
  train(cfg, str(tmp_path))
  losses = read_scalars(str(tmp_path))["train/loss"]
  assert np.mean([losses[s] for s in range(26, 31)]) < losses[1] - 1.0
