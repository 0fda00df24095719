"""The Mosaic GPU linear-attention kernels on the CPU: forward and the gradients of q, k, v and
the gates in Mosaic GPU interpret mode against the parallel jnp form (on the same bf16-rounded
inputs, bf16 tolerance; memory never written is NaN), and lowering for CUDA with jax.export (the
whole Pallas -> Mosaic GPU lowering, no GPU needed)."""
import re

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


def check_against_reference(q, k, v, decay, seg, cot, chunk_size=64, **kw):
  """Asserts out and d(q, k, v, decay) of the kernels (at chunk_size) equal the parallel
  form's."""
  q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
  interp = plgpu.InterpretGPUParams(uninitialized_memory="nan")
  decay = jnp.zeros(q.shape[:3]) if decay is None else decay

  def loss(fn, **extra):
    def f(q, k, v, g):
      out = fn(q, k, v, decay=g, segment_ids=seg, **kw, **extra)
      return jnp.sum(f32(out) * cot), out
    return f

  argnums = (0, 1, 2, 3)
  (_, o1), g1 = jax.value_and_grad(loss(linear_attention_gpu, interpret=interp,
                                        chunk_size=chunk_size), argnums,
                                   has_aux=True)(q, k, v, decay)
  (_, o2), g2 = jax.value_and_grad(loss(linear_parallel), argnums, has_aux=True)(
      f32(q), f32(k), f32(v), decay)
  assert o1.dtype == jnp.bfloat16
  for name, got, want in zip(("out", "dq", "dk", "dv", "ddecay"), (o1, *g1), (o2, *g2)):
    got = np.asarray(f32(got))
    assert np.all(np.isfinite(got)), f"{name}: unwritten (NaN-poisoned) or non-finite values"
    scale = max(float(jnp.max(jnp.abs(want))), 1.0)
    np.testing.assert_allclose(got, want, atol=2e-2 * scale, rtol=2e-2, err_msg=name)


@settings(max_examples=2, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(t=st.integers(40, 200), ratio=st.sampled_from([1, 2]),
       decay_kind=st.sampled_from(["none", "constant", "gates", "strong_gates"]),
       fmap_norm=st.sampled_from([("elu1", True), ("identity", False)]),
       segments=st.booleans(), seed=st.integers(0, 99))
def test_kernels_match_reference_on_random_shapes(t, ratio, decay_kind, fmap_norm, segments,
                                                  seed):
  fmap, normalize = fmap_norm
  q, k, v, decay, seg, cot = inputs(seed, 1, t, ratio, 1, 64, decay_kind=decay_kind,
                                    segments=segments)
  if decay is not None and decay.ndim == 1:
    decay = jnp.broadcast_to(decay, q.shape[:3])
  check_against_reference(q, k, v, decay, seg, cot, feature_map=fmap, normalize=normalize)


def test_head_dim_128_gqa_with_two_kv_heads():
  """Head dim 128, and GQA with more than one key/value head (4 query heads on 2), so a head
  grouped in the wrong order fails (with one key/value head every order agrees)."""
  q, k, v, decay, seg, cot = inputs(3, 1, 150, 4, 2, 128, decay_kind="gates", segments=True)
  check_against_reference(q, k, v, decay, seg, cot)


@pytest.mark.parametrize("decay_kind,segments", [("none", False)])  # every carry reaches the end
def test_scan_segments_join_to_the_sequential_scan(monkeypatch, decay_kind, segments):
  """The state scans restart every SCAN_SEGMENT_CHUNKS chunks, the carries entering each
  segment are joined in jnp and the consuming kernels add them; with 2 chunks per segment (4
  segments, the last ragged; no decay, so every segment's carry reaches the end; or gates with
  document resets) forward and every gradient match the reference."""
  from pallas_kernels.linear import pallas_gpu
  monkeypatch.setattr(pallas_gpu, "SCAN_SEGMENT_CHUNKS", 2)
  q, k, v, decay, seg, cot = inputs(11, 1, 64 * 6 + 17, 2, 1, 64, decay_kind=decay_kind,
                                    segments=segments)
  check_against_reference(q, k, v, decay, seg, cot)


def test_chunk_128_head_dim_128_gqa():
  """Chunk 128: three chunks, the last ragged, segments and gates crossing chunk boundaries."""
  q, k, v, decay, seg, cot = inputs(3, 1, 300, 2, 1, 128, decay_kind="gates", segments=True)
  check_against_reference(q, k, v, decay, seg, cot, chunk_size=128)


@pytest.mark.parametrize("d,normalize,ratio,chunk", [(64, True, 1, 64), (128, False, 2, 64),
                                                     (128, True, 1, 64), (128, True, 2, 128)])
def test_lowers_for_cuda_forward_and_backward(d, normalize, ratio, chunk):
  """At head dim 128 and chunk 128 this is also the shared-memory budget check (Hopper's 227
  KiB per block), which the lowering enforces. T = 4200 spans more than one scan segment at
  either chunk, so the consumers' carry tiles and products are in it."""
  from pallas_kernels.linear.pallas_gpu import SCAN_SEGMENT_CHUNKS
  t = 4200
  assert t > SCAN_SEGMENT_CHUNKS * chunk
  q, k, v, decay, seg, _ = inputs(0, 2, t, 2 * ratio, 2, d, decay_kind="gates", segments=True)
  q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))

  def loss(q, k, v, g):
    return jnp.sum(f32(linear_attention_gpu(q, k, v, decay=g, segment_ids=seg,
                                            normalize=normalize, chunk_size=chunk)))

  grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
  text = export.export(grads, platforms=("cuda",))(q, k, v, decay).mlir_module()
  # forward: states, outputs; backward: states again, state gradients, dq, dk/dv
  assert len(re.findall(r"stablehlo.custom_call @mosaic_gpu", text)) == 6


@pytest.mark.parametrize("kwargs,match", [(dict(chunk_size=32), "chunk_size 64 or 128; got 32"),
                                          (dict(d=32), "head dims 64 or 128; got 32")])
def test_bad_inputs_get_one_line_errors(kwargs, match):
  q = jnp.zeros((1, 64, 1, kwargs.pop("d", 64)), jnp.bfloat16)
  with pytest.raises(ValueError, match=match):
    linear_attention_gpu(q, q, q, **kwargs)


def test_api_interpret_gpu_and_auto_picks_the_kernel_on_gpu_where_it_takes_the_call(
    monkeypatch):
  q, k, v, decay, _, _ = inputs(5, 1, 64, 2, 2, 64, decay_kind="constant", segments=False)
  got = linear_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16),
                         decay=decay, impl="interpret_gpu")
  np.testing.assert_allclose(f32(got), linear_parallel(q, k, v, decay=decay), atol=5e-2)
  monkeypatch.setattr(linear_api._common, "backend", lambda: "gpu")
  # measured ahead of the XLA chunked form on an H200 (docs/benchmarks.md) ...
  assert linear_api.resolve_impl("auto", decay, head_dim=128, chunk_size=64) == "pallas"
  assert linear_api.resolve_impl("auto", None, head_dim=64, chunk_size=128) == "pallas"
  # ... but never where it would refuse the call: fp32, other head dims or chunks, GLA's gates
  assert linear_api.resolve_impl("auto", decay, dtype="float32") == "xla"
  assert linear_api.resolve_impl("auto", decay, head_dim=32) == "xla"
  assert linear_api.resolve_impl("auto", decay, chunk_size=16) == "xla"
  per_dim = jnp.zeros((1, 64, 2, 64))
  assert linear_api.resolve_impl("auto", per_dim) == "xla"
