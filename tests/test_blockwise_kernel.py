"""The Pallas TPU flash-attention kernel, run in TPU interpret mode on the CPU: forward and the
three gradients against the jnp reference on random shapes. Interpret mode fills memory the
kernel never writes with NaN (uninitialized_memory="nan"), so a block the kernel forgets to
write poisons the output and fails the comparison."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import blockwise_attention
from pallas_kernels.blockwise import dense_attention
from pallas_kernels.blockwise.pallas_tpu import flash_attention_tpu


def inputs(seed, b, t, hq, hkv, d, segments, dtype=np.float32):
  r = np.random.default_rng(seed)
  mk = lambda *shape: jnp.asarray(r.normal(size=shape).astype(dtype))
  seg = None
  if segments:
    seg = jnp.asarray(np.sort(r.integers(1, 4, size=(b, t)), axis=1).astype(np.int32))
  return mk(b, t, hq, d), mk(b, t, hkv, d), mk(b, t, hkv, d), seg, mk(b, t, hq, d)


def check_against_reference(q, k, v, seg, cot, *, causal, block, interpret=None, rtol=1e-4,
                            gates=None, slopes=None):
  """Asserts out, dq, dk, dv (and d gates, with gates [B, T, Hq]) of the kernel equal the dense
  reference's; slopes [Hq]: ALiBi."""
  interpret = interpret or pltpu.InterpretParams(uninitialized_memory="nan")
  bias = dict(alibi_slopes=slopes)

  def kernel(q, k, v, *g):
    out = flash_attention_tpu(q, k, v, causal=causal, segment_ids=seg, interpret=interpret,
                              block_q=block, block_k=block, log_gates=g[0] if g else None,
                              **bias)
    return jnp.sum(out * cot), out

  def reference(q, k, v, *g):
    out = dense_attention(q, k, v, causal=causal, segment_ids=seg,
                          log_gates=g[0] if g else None, **bias)
    return jnp.sum(out * cot), out

  args = (q, k, v) + (() if gates is None else (gates,))
  argnums = tuple(range(len(args)))
  (_, o1), g1 = jax.value_and_grad(kernel, argnums=argnums, has_aux=True)(*args)
  (_, o2), g2 = jax.value_and_grad(reference, argnums=argnums, has_aux=True)(*args)
  for name, got, want in zip(("out", "dq", "dk", "dv", "dgates"), (o1, *g1), (o2, *g2)):
    assert np.all(np.isfinite(got)), f"{name}: unwritten (NaN-poisoned) or non-finite values"
    scale = max(float(jnp.max(jnp.abs(want))), 1.0)
    np.testing.assert_allclose(got, want, atol=rtol * scale, rtol=rtol, err_msg=name)


@settings(max_examples=3, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(t=st.integers(9, 70), ratio=st.sampled_from([1, 2, 4]), causal=st.booleans(),
       segments=st.booleans(), block=st.sampled_from([8, 16, 32]), seed=st.integers(0, 99))
def test_kernel_matches_reference_on_random_shapes(t, ratio, causal, segments, block, seed):
  hkv = 2 if ratio < 4 else 1
  q, k, v, seg, cot = inputs(seed, 2, t, hkv * ratio, hkv, 64, segments)
  check_against_reference(q, k, v, seg, cot, causal=causal, block=block)


@pytest.mark.parametrize("d", [128, 256])  # 64: the tests above
def test_head_dims(d):
  q, k, v, seg, cot = inputs(1, 1, 24, 2, 1, d, True)
  check_against_reference(q, k, v, seg, cot, causal=True, block=16)


def test_no_races_with_race_detection_on():
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc
  q, k, v, seg, cot = inputs(3, 1, 33, 4, 2, 64, True)
  check_against_reference(q, k, v, seg, cot, causal=True, block=16,
                          interpret=pltpu.InterpretParams(detect_races=True))
  assert ipc.races is not None and not ipc.races.races_found


def test_bf16_inputs_keep_their_dtype_and_agree():
  q, k, v, seg, _ = inputs(4, 1, 40, 2, 2, 64, False)
  qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
  out = blockwise_attention(qb, kb, vb, impl="interpret")
  assert out.dtype == jnp.bfloat16
  want = dense_attention(qb, kb, vb)
  np.testing.assert_allclose(out.astype(np.float32), want.astype(np.float32), atol=2e-2)


def test_impl_interpret_through_the_api_and_the_model():
  from lmtrain import config as config_lib
  from lmtrain.trainer import build_model
  from tests.conftest import small_config
  cfg = small_config(**{"model.attention.impl": "interpret", "model.num_heads": 1})  # head dim 64
  config_lib.validate(cfg)
  fns, init = build_model(cfg.model)
  params = init(jax.random.key(0))
  tok = jnp.asarray(np.random.default_rng(0).integers(0, 256, size=(1, 21)), jnp.int32)
  seg = jnp.asarray([[1] * 10 + [2] * 11], jnp.int32)
  got = fns.apply(params, tok, seg)
  cfg.model.attention.impl = "xla"
  fns_ref, _ = build_model(cfg.model)
  np.testing.assert_allclose(got, fns_ref.apply(params, tok, seg), atol=1e-4)


def log_gates(seed, b, t, hq, high=1.0):
  r = np.random.default_rng(seed)
  return jnp.asarray(-r.uniform(0.0, high, size=(b, t, hq)).astype(np.float32))


@pytest.mark.parametrize("t,hq,hkv,segments,block,high", [
    (37, 4, 2, True, 8, 1.0),  # GQA, T not a multiple of the block, packed documents
    (45, 4, 1, True, 16, 40.0),  # strong decay: whole key blocks underflow to exact zeros
])
def test_forget_gates_match_reference(t, hq, hkv, segments, block, high):
  """FoX's gate bias in the TPU kernel: out and the gradients of q, k, v and the gates (the
  keys' share from the dk/dv kernel's column sums of dS) against the dense reference."""
  q, k, v, seg, cot = inputs(11, 1, t, hq, hkv, 64, segments)
  check_against_reference(q, k, v, seg, cot, causal=True, block=block,
                          gates=log_gates(t, 1, t, hq, high))


def test_alibi_runs_as_constant_gates_in_the_kernel():
  q, k, v, seg, cot = inputs(12, 1, 70, 4, 2, 64, True)
  slopes = jnp.asarray([0.5, 1 / 16, 1 / 64, 1 / 256], jnp.float32)
  check_against_reference(q, k, v, seg, cot, causal=True, block=16, slopes=slopes)
  got = blockwise_attention(q, k, v, segment_ids=seg, alibi_slopes=slopes, impl="interpret")
  want = blockwise_attention(q, k, v, segment_ids=seg, alibi_slopes=slopes, impl="xla")
  np.testing.assert_allclose(got, want, atol=1e-5)
  with pytest.raises(ValueError, match="takes alibi_slopes only for causal self-attention"):
    blockwise_attention(q, k, v, causal=False, alibi_slopes=slopes, impl="interpret")


@pytest.mark.parametrize("impl", ["reference", "interpret", "interpret_gpu"])
def test_the_first_gate_of_a_document_gets_no_gradient_under_bf16_rounding(impl):
  """A document's first gate is in every c_i - c_j of that document, so it moves nothing and
  its exact gradient is 0. A backward that takes the queries' share of the gates' gradient to
  be dlse (softmax's rows sum to one) is exact only for the unrounded output: from the stored
  bf16 output it misses by sum_i dO_i . (O_i - round(O_i)) over the document, which the
  cotangent here lines up with (the sign of each rounding error), as a real gradient can. It
  was 0.6 against gradients of 17 on an H200 at T = 700; every impl sums dS's rows instead."""
  r = np.random.default_rng(5)
  t, starts = 96, (0, 60)
  mk = lambda *shape: jnp.asarray(r.normal(size=shape), jnp.bfloat16)
  q, k, v = mk(1, t, 2, 64), mk(1, t, 1, 64), mk(1, t, 1, 64)
  seg = jnp.asarray((np.arange(t) >= starts[1]).astype(np.int32)[None] + 1)
  gates = log_gates(3, 1, t, 2, high=0.3)
  f32 = lambda x: x.astype(jnp.float32)
  attn = lambda g: blockwise_attention(q, k, v, segment_ids=seg, log_gates=g, impl=impl)
  exact = dense_attention(f32(q), f32(k), f32(v), segment_ids=seg, log_gates=gates)
  cot = jnp.sign(f32(attn(gates)) - exact)
  assert float(jnp.mean(jnp.abs(cot))) > 0.5  # the output really is rounded
  dg = jax.grad(lambda g: jnp.sum(f32(attn(g)) * cot))(gates)
  want = jax.grad(lambda g: jnp.sum(dense_attention(f32(q), f32(k), f32(v), segment_ids=seg,
                                                    log_gates=g) * cot))(gates)
  scale = float(jnp.max(jnp.abs(want)))
  np.testing.assert_array_less(np.abs(np.asarray(dg)[0, list(starts)]), 1e-3 * scale)
  np.testing.assert_allclose(dg, want, atol=2e-2 * scale)
