"""The Pallas TPU chunked linear-attention kernels, run in TPU interpret mode on the CPU: forward
and the gradients of q, k, v and the gates against the quadratic (parallel) jnp form, which
tests/test_attention_functions.py checks against float64 loops. Memory the kernels never write
is NaN (uninitialized_memory="nan"), so a forgotten block fails the comparison."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import linear_attention, linear_attention_init_state, linear_attention_step
from pallas_kernels.linear import linear_parallel
from pallas_kernels.linear.pallas_tpu import linear_attention_tpu

POISON = dict(uninitialized_memory="nan")


def inputs(seed, b, t, hq, hkv, d, *, decay_kind, segments, dtype=np.float32):
  r = np.random.default_rng(seed)
  mk = lambda *shape: jnp.asarray(r.normal(size=shape).astype(dtype))
  decay = {
      "none": None,
      "constant": jnp.asarray(-r.uniform(0.01, 1.0, size=(hq,)).astype(np.float32)),
      "gates": jnp.asarray(-r.uniform(0.0, 1.0, size=(b, t, hq)).astype(np.float32)),
      # strongly negative: the state decays to ~0 within a chunk (exp(-5 * 8) ~ 4e-18)
      "strong_gates": jnp.asarray(-r.uniform(5.0, 30.0, size=(b, t, hq)).astype(np.float32)),
  }[decay_kind]
  seg = None
  if segments:
    seg = jnp.asarray(np.sort(r.integers(1, 4, size=(b, t)), axis=1).astype(np.int32))
  return mk(b, t, hq, d), mk(b, t, hkv, d), mk(b, t, hkv, d), decay, seg, mk(b, t, hq, d)


def check_against_reference(q, k, v, decay, seg, cot, *, chunk, interpret=None, rtol=1e-4,
                            **kw):
  """Asserts out, dq, dk, dv (and d decay) of the kernel equal the parallel form's."""
  interpret = interpret or pltpu.InterpretParams(**POISON)
  args = (q, k, v) if decay is None else (q, k, v, decay)

  def kernel(q, k, v, decay=None):
    out = linear_attention_tpu(q, k, v, decay=decay, segment_ids=seg, chunk_size=chunk,
                               interpret=interpret, **kw)
    return jnp.sum(out * cot), out

  def reference(q, k, v, decay=None):
    out = linear_parallel(q, k, v, decay=decay, segment_ids=seg, **kw)
    return jnp.sum(out * cot), out

  argnums = tuple(range(len(args)))
  (_, o1), g1 = jax.value_and_grad(kernel, argnums=argnums, has_aux=True)(*args)
  (_, o2), g2 = jax.value_and_grad(reference, argnums=argnums, has_aux=True)(*args)
  for name, got, want in zip(("out", "dq", "dk", "dv", "ddecay"), (o1, *g1), (o2, *g2)):
    assert np.all(np.isfinite(got)), f"{name}: unwritten (NaN-poisoned) or non-finite values"
    scale = max(float(jnp.max(jnp.abs(want))), 1.0)
    np.testing.assert_allclose(got, want, atol=rtol * scale, rtol=rtol, err_msg=name)


@settings(max_examples=4, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(t=st.integers(5, 50), ratio=st.sampled_from([1, 2, 4]),
       decay_kind=st.sampled_from(["none", "constant", "gates", "strong_gates"]),
       fmap_norm=st.sampled_from([("elu1", True), ("relu", True), ("identity", False),
                                  ("elu1", False)]),
       segments=st.booleans(), chunk=st.sampled_from([8, 16]), seed=st.integers(0, 99))
def test_kernel_matches_reference_on_random_shapes(t, ratio, decay_kind, fmap_norm, segments,
                                                   chunk, seed):
  hkv = 2 if ratio < 4 else 1
  fmap, normalize = fmap_norm
  q, k, v, decay, seg, cot = inputs(seed, 2, t, hkv * ratio, hkv, 16, decay_kind=decay_kind,
                                    segments=segments)
  check_against_reference(q, k, v, decay, seg, cot, chunk=chunk, feature_map=fmap,
                          normalize=normalize)


@pytest.mark.parametrize("decay_kind", ["strong_gates"])  # plain gates: the random shapes
def test_strongly_negative_gates_and_a_ragged_tail(decay_kind):
  q, k, v, decay, seg, cot = inputs(7, 1, 29, 2, 2, 16, decay_kind=decay_kind, segments=True)
  check_against_reference(q, k, v, decay, seg, cot, chunk=8)


@pytest.mark.parametrize("d,chunk", [(64, 64), (128, 128)])
def test_head_dims_and_chunk_sizes_of_the_issue(d, chunk):
  t = chunk + 3  # two chunks, the second ragged
  q, k, v, decay, seg, cot = inputs(2, 1, t, 2, 1, d, decay_kind="gates", segments=True)
  check_against_reference(q, k, v, decay, seg, cot, chunk=chunk)


def test_no_races_with_race_detection_on():
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc
  q, k, v, decay, seg, cot = inputs(3, 1, 20, 2, 1, 16, decay_kind="gates", segments=True)
  check_against_reference(q, k, v, decay, seg, cot, chunk=8,
                          interpret=pltpu.InterpretParams(detect_races=True))
  assert ipc.races is not None and not ipc.races.races_found


def test_recurrent_decoding_step_agrees_with_the_kernel():
  b, t, hq, hkv, d = 1, 19, 4, 2, 16
  q, k, v, decay, _, _ = inputs(5, b, t, hq, hkv, d, decay_kind="gates", segments=False)
  got = linear_attention(q, k, v, decay=decay, chunk_size=8, impl="interpret")
  state = linear_attention_init_state(b, hq, d, d)
  outs = []
  for i in range(t):
    state, o = linear_attention_step(state, q[:, i], k[:, i], v[:, i], decay=decay[:, i])
    outs.append(o)
  np.testing.assert_allclose(jnp.stack(outs, 1), got, atol=1e-4, rtol=1e-4)


def test_bf16_inputs_keep_their_dtype_and_agree():
  q, k, v, decay, _, _ = inputs(4, 1, 40, 2, 2, 64, decay_kind="constant", segments=False)
  qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
  out = linear_attention(qb, kb, vb, decay=decay, chunk_size=16, impl="interpret")
  assert out.dtype == jnp.bfloat16
  want = linear_parallel(q, k, v, decay=decay)
  np.testing.assert_allclose(out.astype(np.float32), want, atol=3e-2, rtol=3e-2)


def test_float64_inputs_get_a_one_line_error():
  q = np.zeros((1, 8, 1, 8), np.float64)  # Mosaic has no float64; the jnp forms do
  with pytest.raises(ValueError, match="float64"):
    linear_attention_tpu(q, q, q, interpret=pltpu.InterpretParams())


@pytest.mark.parametrize("variant", ["simple_gla"])  # the data-dependent gates and their grads
def test_the_model_runs_the_kernel_with_impl_interpret(variant):
  """The model's attention.impl reaches the kernel: logits and parameter gradients equal the
  XLA chunked form's (simple_gla: data-dependent gates from a learned projection)."""
  from lmtrain import config as config_lib
  from lmtrain.trainer import build_model
  from tests.conftest import small_config
  cfg = small_config(f"attention={variant}", **{"model.attention.impl": "interpret",
                                                f"model.attention.{variant}.chunk_size": 8})
  config_lib.validate(cfg)
  fns, init = build_model(cfg.model)
  params = init(jax.random.key(0))
  tok = jnp.asarray(np.random.default_rng(0).integers(0, 256, size=(1, 21)), jnp.int32)
  seg = jnp.asarray([[1] * 10 + [2] * 11], jnp.int32)
  cfg.model.attention.impl = "xla"
  fns_xla, _ = build_model(cfg.model)
  results = []
  for f in (fns, fns_xla):
    loss = lambda p: jnp.sum(jnp.sin(f.apply(p, tok, seg)))
    results.append(jax.value_and_grad(loss)(params))
  (l1, g1), (l2, g2) = results
  np.testing.assert_allclose(l1, l2, rtol=1e-4)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, atol=1e-4 * max(float(jnp.max(jnp.abs(b))), 1.0))
