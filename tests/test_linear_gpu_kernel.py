"""The Mosaic GPU linear-attention forward kernels on the CPU: values in Mosaic GPU interpret
mode against the parallel jnp form (on the same bf16-rounded inputs, bf16 tolerance), and
lowering for CUDA with jax.export (the whole Pallas -> Mosaic GPU lowering, no GPU needed)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax import export
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import linear_attention
from pallas_kernels.linear import api as linear_api
from pallas_kernels.linear import linear_parallel
from pallas_kernels.linear.pallas_gpu import linear_attention_gpu
from tests.test_linear_kernel import inputs

f32 = lambda x: x.astype(jnp.float32)


def check_forward(q, k, v, decay, seg, *, chunk=64, **kw):
  q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
  got = linear_attention_gpu(q, k, v, decay=decay, segment_ids=seg, chunk_size=chunk,
                             interpret=plgpu.InterpretGPUParams(uninitialized_memory="nan"), **kw)
  assert got.dtype == jnp.bfloat16
  want = linear_parallel(f32(q), f32(k), f32(v), decay=decay, segment_ids=seg, **kw)
  got = np.asarray(f32(got))
  assert np.all(np.isfinite(got)), "unwritten (NaN-poisoned) or non-finite values"
  scale = max(float(jnp.max(jnp.abs(want))), 1.0)
  np.testing.assert_allclose(got, want, atol=2e-2 * scale, rtol=2e-2)


@settings(max_examples=4, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(t=st.integers(40, 200), ratio=st.sampled_from([1, 2]),
       decay_kind=st.sampled_from(["none", "constant", "gates", "strong_gates"]),
       fmap_norm=st.sampled_from([("elu1", True), ("identity", False)]),
       segments=st.booleans(), seed=st.integers(0, 99))
def test_forward_matches_reference_on_random_shapes(t, ratio, decay_kind, fmap_norm, segments,
                                                    seed):
  fmap, normalize = fmap_norm
  q, k, v, decay, seg, _ = inputs(seed, 1, t, ratio, 1, 64, decay_kind=decay_kind,
                                  segments=segments)
  check_forward(q, k, v, decay, seg, feature_map=fmap, normalize=normalize)


def test_head_dim_128_and_chunk_128():
  q, k, v, decay, seg, _ = inputs(3, 1, 150, 2, 2, 128, decay_kind="gates", segments=True)
  check_forward(q, k, v, decay, seg, chunk=128)


def test_gradients_flow_through_the_jnp_backward():
  q, k, v, decay, _, cot = inputs(4, 1, 70, 2, 1, 64, decay_kind="gates", segments=False)
  q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))

  def loss(fn, **kw):
    return lambda q, k, v, g: jnp.sum(f32(fn(q, k, v, decay=g, **kw)) * cot)

  got = jax.grad(loss(linear_attention_gpu, interpret=plgpu.InterpretGPUParams()),
                 argnums=(0, 1, 2, 3))(q, k, v, decay)
  want = jax.grad(loss(linear_parallel), argnums=(0, 1, 2, 3))(q, k, v, decay)
  for a, b in zip(got, want):
    np.testing.assert_allclose(f32(a), f32(b), atol=3e-2 * float(jnp.max(jnp.abs(f32(b)))))


@pytest.mark.parametrize("d,chunk,normalize,ratio", [(64, 64, True, 1), (128, 64, False, 2),
                                                     (128, 128, True, 1)])
def test_lowers_for_cuda(d, chunk, normalize, ratio):
  q, k, v, decay, seg, _ = inputs(0, 2, 1000, 2 * ratio, 2, d, decay_kind="gates", segments=True)
  q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
  fn = lambda q, k, v: linear_attention_gpu(q, k, v, decay=decay, segment_ids=seg,
                                            chunk_size=chunk, normalize=normalize)
  text = export.export(jax.jit(fn), platforms=("cuda",))(q, k, v).mlir_module()
  assert text.count("mosaic_gpu") >= 2, "expected the states and outputs kernels"


@pytest.mark.parametrize("kwargs,match", [(dict(chunk_size=32), "chunk_size 64 or 128"),
                                          (dict(d=32), "multiples of 64")])
def test_bad_inputs_get_one_line_errors(kwargs, match):
  q = jnp.zeros((1, 64, 1, kwargs.pop("d", 64)), jnp.bfloat16)
  with pytest.raises(ValueError, match=match):
    linear_attention_gpu(q, q, q, **kwargs)


def test_api_interpret_gpu_and_auto_keeps_xla_on_gpu(monkeypatch):
  q, k, v, decay, _, _ = inputs(5, 1, 64, 2, 2, 64, decay_kind="constant", segments=False)
  got = linear_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16),
                         decay=decay, impl="interpret_gpu")
  np.testing.assert_allclose(f32(got), linear_parallel(q, k, v, decay=decay), atol=5e-2)
  monkeypatch.setattr(linear_api._common, "backend", lambda: "gpu")
  assert linear_api.resolve_impl("auto") == "xla"
