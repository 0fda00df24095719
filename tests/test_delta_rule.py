"""pallas_kernels.delta: the delta rule's recurrent and chunked forms against the float64 loop
oracle (tests/naive.py) and each other, gradients against finite differences, decoding parity,
the pass-through of beta-0 tokens, packed documents, and one-line errors."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from pallas_kernels import delta_rule, delta_rule_init_state, delta_rule_step
from pallas_kernels.delta import api as delta_api
from pallas_kernels.delta import delta_chunked, delta_recurrent
from tests import naive

TOL = dict(atol=1e-10, rtol=1e-10)
IMPLS = ("reference", "xla", "auto")


@pytest.fixture(autouse=True)
def x64():
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", False)


def inputs(b=2, t=21, hq=4, hkv=2, dk=6, dv=5, seed=0, gates=True, dtype=np.float64):
  """q, k (unit length, as the rule expects), v, beta in [0.1, 1], log-gates in [-1, 0], as numpy
  arrays (slicing and editing them compiles nothing). Most tests share these default shapes: the
  jitted forms then compile once for all of them."""
  r = np.random.default_rng(seed)
  k = r.normal(size=(b, t, hkv, dk))
  k /= np.linalg.norm(k, axis=-1, keepdims=True)
  arrays = dict(q=r.normal(size=(b, t, hq, dk)), k=k, v=r.normal(size=(b, t, hkv, dv)),
                beta=r.uniform(0.1, 1.0, size=(b, t, hkv)),
                log_gates=-r.uniform(0.0, 1.0, size=(b, t, hkv)) if gates else None)
  return {n: None if x is None else x.astype(dtype) for n, x in arrays.items()}


def state_like(x, seed=1):
  b, _, hkv, dk = x["k"].shape
  r = np.random.default_rng(seed)
  return r.normal(size=(b, hkv, dk, x["v"].shape[-1]))


def oracle(x, **kw):
  return naive.delta_rule(x["q"], x["k"], x["v"], x["beta"], log_gates=x["log_gates"], **kw)


def run(fn, x, **kw):
  """fn(q, k, v, beta, log_gates=..., return_state=True, **kw) -> (o, final state)."""
  return fn(x["q"], x["k"], x["v"], x["beta"], log_gates=x["log_gates"], return_state=True, **kw)


def tokens(x, index):
  return {n: None if a is None else a[:, index] for n, a in x.items()}


# Segment runs of 5, 3, 8 and 5 tokens (T = 21, a multiple of neither chunk size): boundaries at
# 5 (inside a chunk of 4 and of 16), 8 (a chunk start for 4, inside for 16) and 16 (a chunk start
# for both). The second row reuses id 1 after another document (a new document all the same) and
# has one-token documents.
SEGMENTS = np.array([[0] * 5 + [1] * 3 + [2] * 8 + [3] * 5,
                     [1] * 2 + [2] + [1] * 4 + [4] + [5] * 13], np.int32)


# ---- forward against the oracle ---------------------------------------------------------------

@pytest.mark.parametrize("gates", [False, True], ids=["deltanet", "gated"])
@pytest.mark.parametrize("segments", [False, True], ids=["one_doc", "packed"])
def test_forms_match_naive_float64(gates, segments):
  """GQA (Hq=4, Hkv=2), T=21, chunks of 4 (and 16 with segments): every form, every jnp impl,
  and the final state. (Each new shape or chunk size is an XLA compile: about 2 s of CPU.)"""
  x = inputs(gates=gates)
  seg = SEGMENTS if segments else None
  want, want_state = oracle(x, segment_ids=seg)
  chunks = (4, 16) if segments else (4,)
  for fn, kw in [(delta_recurrent, {})] + [
      (f, dict(chunk_size=c)) for c in chunks for f in (
          delta_chunked, *(functools.partial(delta_rule, impl=i) for i in IMPLS))]:
    o, state = run(fn, x, segment_ids=seg, **kw)
    np.testing.assert_allclose(o, want, **TOL)
    np.testing.assert_allclose(state, want_state, **TOL)


@pytest.mark.parametrize("gates,segments", [(False, False), (True, True)],
                         ids=["deltanet-one_doc", "gated-packed"])
def test_initial_state_and_return_state_match_naive(gates, segments):
  """The initial state continues the row's first document; the final state is the last
  document's, after the last token."""
  x = inputs(gates=gates, seed=2)
  s0 = state_like(x)
  seg = SEGMENTS if segments else None
  want, want_state = oracle(x, segment_ids=seg, initial_state=s0)
  for fn, kw in ((delta_recurrent, {}), (delta_chunked, dict(chunk_size=4)),
                 (delta_rule, dict(chunk_size=4))):
    o, state = run(fn, x, segment_ids=seg, initial_state=s0, **kw)
    np.testing.assert_allclose(o, want, **TOL)
    np.testing.assert_allclose(state, want_state, **TOL)


def test_chunk_sizes_from_one_token_to_more_than_t_without_gqa():
  x = inputs(t=16, hq=2, hkv=2, seed=3)
  want, want_state = oracle(x)
  for chunk in (1, 8, 64):  # one token, an exact multiple, and one chunk longer than T
    o, state = run(delta_chunked, x, chunk_size=chunk)
    np.testing.assert_allclose(o, want, **TOL)
    np.testing.assert_allclose(state, want_state, **TOL)


def test_low_precision_inputs_compute_in_fp32_and_return_q_dtype():
  x = inputs()
  want, _ = run(delta_recurrent, x)
  for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 0.1)):
    o, state = run(delta_rule, {n: a.astype(dtype) for n, a in x.items()}, chunk_size=4)
    assert o.dtype == dtype and state.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(o).astype(np.float64), want, atol=tol, rtol=tol)


def test_jit_and_vmap():
  x = inputs()
  fn = lambda q, k, v, b, g: delta_rule(q, k, v, b, log_gates=g, chunk_size=4, return_state=True)
  args = (x["q"], x["k"], x["v"], x["beta"], x["log_gates"])
  scaled = (2 * x["q"], x["k"], 3 * x["v"], 0.5 * x["beta"], x["log_gates"])
  want = [fn(*args), fn(*scaled)]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), jax.jit(fn)(*args), want[0])
  out = jax.vmap(fn)(*(np.stack([a, b]) for a, b in zip(args, scaled)))
  for i in range(2):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[i], b, **TOL), out, want[i])


# ---- gradients --------------------------------------------------------------------------------

def test_gradients_match_finite_differences():
  """Through the triangular solve, the gates' exponentials and the segment masks (a boundary
  inside a chunk, one at a chunk start), w.r.t. q, k, v, beta, log-gates and the initial state.
  """
  x = inputs(b=1, t=10, hq=2, hkv=1, dk=3, dv=2, seed=6)
  seg = np.array([[0] * 3 + [1] * 5 + [2] * 2], np.int32)
  args = tuple(jnp.asarray(a) for a in (x["q"], x["k"], x["v"], x["beta"], x["log_gates"],
                                        state_like(x, seed=7)))

  def chunked(q, k, v, beta, g, s0):
    return delta_chunked(q, k, v, beta, log_gates=g, segment_ids=seg, chunk_size=4,
                         initial_state=s0, return_state=True)

  check_grads(chunked, args, order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_gradients_are_finite_in_fp32_with_long_chunks_and_strong_gates():
  """Gates that decay to ~0 within a token (exp(-30)) and a chunk of 64: the masked exponents
  keep the backward pass free of inf * 0."""
  x = inputs(b=1, t=70, hq=2, hkv=1, dk=8, dv=8, seed=9, dtype=np.float32)
  gates = -np.random.default_rng(1).uniform(5.0, 30.0, size=(1, 70, 1)).astype(np.float32)
  seg = np.array([[0] * 30 + [1] * 40], np.int32)

  @jax.jit
  def grads(q, k, v, beta, g):
    loss = lambda *a: jnp.sum(delta_rule(*a[:4], log_gates=a[4], segment_ids=seg) ** 2)
    return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, beta, g)

  for g in grads(x["q"], x["k"], x["v"], x["beta"], gates):
    assert np.all(np.isfinite(np.asarray(g)))


# ---- decoding ---------------------------------------------------------------------------------

@pytest.mark.parametrize("gates", [False, True], ids=["deltanet", "gated"])
def test_step_by_step_equals_delta_rule(gates):
  x = inputs(gates=gates, seed=10)
  b, t, _, dk = x["q"].shape
  hkv, dv = x["k"].shape[2], x["v"].shape[-1]
  want, want_state = run(delta_rule, x, chunk_size=4)
  step = jax.jit(delta_rule_step)

  def decode(state, start):
    outs = []
    for i in range(start, t):
      xi = tokens(x, i)
      state, o = step(state, xi["q"], xi["k"], xi["v"], xi["beta"], xi["log_gates"])
      outs.append(o)
    return jnp.stack(outs, 1), state

  o, state = decode(delta_rule_init_state(b, hkv, dk, dv, jnp.float64), 0)
  np.testing.assert_allclose(o, want, **TOL)
  np.testing.assert_allclose(state, want_state, **TOL)
  if not gates:
    return
  # Prefill + decode parity (gated; DeltaNet runs the same code with gates 0): prefill 9 tokens
  # with the chunked form, then decode the rest one token at a time ...
  o_pre, prefix_state = run(delta_rule, tokens(x, slice(0, 9)), chunk_size=4)
  np.testing.assert_allclose(o_pre, want[:, :9], **TOL)
  o, state = decode(prefix_state, 9)
  np.testing.assert_allclose(o, want[:, 9:], **TOL)
  np.testing.assert_allclose(state, want_state, **TOL)
  # ... or continue the chunked form from the prefix's state.
  o, state = run(delta_rule, tokens(x, slice(9, t)), chunk_size=4, initial_state=prefix_state)
  np.testing.assert_allclose(o, want[:, 9:], **TOL)
  np.testing.assert_allclose(state, want_state, **TOL)


def test_tokens_with_zero_beta_and_gate_pass_the_state_through():
  """The decoder right-pads prompts with such tokens: the later outputs and the final state are
  those of the sequence without them."""
  x = inputs(seed=11)
  dropped = np.array([3, 4, 9, 16, 17, 18, 19, 20])  # inside, across a chunk start, the tail
  kept = np.setdiff1d(np.arange(21), dropped)
  padded = {n: a.copy() for n, a in x.items()}
  padded["beta"][:, dropped] = 0.0
  padded["log_gates"][:, dropped] = 0.0
  want, want_state = run(delta_recurrent, tokens(x, kept))
  for fn, kw in ((delta_recurrent, {}), (delta_chunked, dict(chunk_size=4)),
                 (delta_rule, dict(chunk_size=16))):
    o, state = run(fn, padded, **kw)
    np.testing.assert_allclose(np.asarray(o)[:, kept], want, **TOL)
    np.testing.assert_allclose(state, want_state, **TOL)


def test_packed_documents_are_independent():
  """Each document of a packed row gives what it gives alone, whatever the other holds."""
  x = inputs(seed=12)
  seg = np.array([[7] * 6 + [3] * 15] * 2, np.int32)
  o, state = run(delta_rule, x, segment_ids=seg, chunk_size=4)
  first = tokens(x, slice(0, 6))  # return_state=False: the outputs alone
  o1 = delta_rule(first["q"], first["k"], first["v"], first["beta"],
                  log_gates=first["log_gates"], chunk_size=4)
  o2, state2 = run(delta_rule, tokens(x, slice(6, 21)), chunk_size=4)
  np.testing.assert_allclose(o[:, :6], o1, **TOL)
  np.testing.assert_allclose(o[:, 6:], o2, **TOL)
  np.testing.assert_allclose(state, state2, **TOL)
  # Changing the first document (and the initial state it continues) leaves the second alone.
  r = np.random.default_rng(13)
  other = {n: a.copy() for n, a in x.items()}
  other["k"][:, :6] = r.normal(size=(2, 6, 2, 6))
  other["v"][:, :6] = 5.0
  other["beta"][:, :6] = 1.0
  o3, state3 = run(delta_rule, other, segment_ids=seg, chunk_size=4, initial_state=state_like(x))
  np.testing.assert_allclose(o3[:, 6:], o[:, 6:], **TOL)
  np.testing.assert_allclose(state3, state, **TOL)


# ---- bad inputs -------------------------------------------------------------------------------

def test_no_pallas_kernel_yet():
  assert delta_api.KERNELS == {}
  for impl in ("pallas", "interpret", "interpret_gpu"):
    assert delta_api.kernel_for(impl) is None
    assert delta_api.kernel_for(impl, "tpu") is None


def one_line_error(match, fn, *args, **kwargs):
  with pytest.raises(ValueError, match=match) as info:
    fn(*args, **kwargs)
  assert "\n" not in str(info.value)


def test_bad_inputs_fail_in_one_line():
  x = inputs(b=2, t=9, hq=4, hkv=2, dk=6, dv=5)
  q, k, v, beta, g = x["q"], x["k"], x["v"], x["beta"], x["log_gates"]
  for impl in ("pallas", "interpret", "interpret_gpu"):
    one_line_error(f"impl='{impl}'.*no Pallas kernel yet", delta_rule, q, k, v, beta, impl=impl)
  one_line_error("impl='magic' is not one of", delta_rule, q, k, v, beta, impl="magic")
  one_line_error("not a multiple", delta_rule, q[:, :, :3], k, v, beta)
  one_line_error(r"q, k, v must be \[B, T, H, D\]", delta_rule, q[0], k, v, beta)
  one_line_error(r"k\(2, 8, 2, 6\)", delta_rule, q, k[:, :8], v, beta)
  one_line_error(r"v\(2, 9, 1, 5\)", delta_rule, q, k, v[:, :, :1], beta)
  one_line_error(r"beta\(2, 9\)", delta_rule, q, k, v, beta[..., 0])
  one_line_error(r"log_gates\(2, 9, 4\)", delta_rule, q, k, v, beta,
                 log_gates=np.zeros((2, 9, 4)))
  one_line_error(r"segment_ids\(2, 8\)", delta_rule, q, k, v, beta,
                 segment_ids=np.zeros((2, 8), np.int32))
  one_line_error(r"initial_state\(2, 4, 6, 5\)", delta_rule, q, k, v, beta,
                 initial_state=np.zeros((2, 4, 6, 5)))
  one_line_error("chunk_size=0", delta_rule, q, k, v, beta, chunk_size=0)
  one_line_error("empty sequence", delta_rule, q[:, :0], k[:, :0], v[:, :0], beta[:, :0])
  state = delta_rule_init_state(2, 2, 6, 5, jnp.float64)
  args = (q[:, 0], k[:, 0], v[:, 0], beta[:, 0])
  assert jax.eval_shape(delta_rule_step, state, *args, g[:, 0])[1].shape == (2, 4, 5)
  one_line_error(r"k_t\(2, 2, 5\)", delta_rule_step, state, q[:, 0], k[:, 0, :, :5], *args[2:])
  one_line_error(r"q_t\(2, 3, 6\)", delta_rule_step, state, q[:, 0, :3], *args[1:])
  one_line_error(r"beta_t\(2,\)", delta_rule_step, state, *args[:3], beta[:, 0, 0])
  one_line_error(r"log_gate_t\(2, 4\)", delta_rule_step, state, *args, np.zeros((2, 4)))
  one_line_error(r"state must be", delta_rule_step, state[0], *args)
