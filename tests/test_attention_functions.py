"""pallas_kernels' jnp paths: against independent float64 references, against each other, and
their gradients against finite differences."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from pallas_kernels import (BlockMask, MoBA, SlidingWindow, block_mask, blockwise_attention,
                            linear_attention, linear_attention_init_state, linear_attention_step,
                            sparse_attention)
from pallas_kernels.blockwise import blockwise_reference, dense_attention
from pallas_kernels.linear import linear_chunked, linear_parallel, linear_recurrent
from pallas_kernels.sparse import block_lists, moba_routing, sparse_blockwise, sparse_reference
from tests import naive


@pytest.fixture(autouse=True)
def x64():
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", False)


def qkv(b=2, t=37, hq=4, hkv=2, d=8, s=None, seed=0, dtype=np.float64):
  r = np.random.default_rng(seed)
  s = t if s is None else s
  mk = lambda *shape: jnp.asarray(r.normal(size=shape).astype(dtype))
  return mk(b, t, hq, d), mk(b, s, hkv, d), mk(b, s, hkv, d)


def packed_segments(b, t, seed=0):
  r = np.random.default_rng(seed)
  return jnp.asarray(np.sort(r.integers(1, 4, size=(b, t)), axis=1).astype(np.int32))


# ---- softmax: blockwise ----------------------------------------------------------------------

@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (4, 1)])
def test_blockwise_matches_naive_float64(causal, hq, hkv):
  q, k, v = qkv(hq=hq, hkv=hkv, t=29)
  seg = packed_segments(2, 29)
  allowed = lambda b, h, t, s: seg[b, t] == seg[b, s]
  want = naive.softmax_attention(q, k, v, allowed, causal=causal)
  for impl in ("reference", "xla"):
    got = blockwise_attention(q, k, v, causal=causal, segment_ids=seg, impl=impl)
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_blockwise_reference_equals_dense_fp32_with_alibi_and_odd_length():
  q, k, v = qkv(t=77, dtype=np.float32)
  slopes = jnp.asarray([0.5, 0.25, 0.125, 0.0625], jnp.float32)
  for causal in (True, False):
    want = dense_attention(q, k, v, causal=causal, alibi_slopes=slopes)
    got = blockwise_reference(q, k, v, causal=causal, alibi_slopes=slopes, block_k=16)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  want = naive.softmax_attention(q, k, v, lambda *a: True, alibi=np.asarray(slopes))
  np.testing.assert_allclose(blockwise_attention(q, k, v, alibi_slopes=slopes), want, atol=1e-5)


def test_blockwise_cross_attention_lengths():
  q, k, v = qkv(t=9, s=21)
  want = naive.softmax_attention(q, k, v, lambda *a: True, causal=False)
  np.testing.assert_allclose(blockwise_attention(q, k, v, causal=False), want, atol=1e-12)


def test_blockwise_reference_query_tiles_equal_the_naive_float64():
  """Query tiles of 4 (29 queries: the last tile padded) over key blocks of 8, with GQA,
  packed segments and ALiBi (causal and not), and a cross-attention length: the float64 naive
  result; causal with FoX gates, a soft-cap and sinks, the same values and gradients (gates and
  sinks included) as one tile of every query."""
  q, k, v = qkv(hq=4, hkv=2, t=29)
  seg = packed_segments(2, 29)
  slopes = jnp.asarray([0.5, 0.25, 0.125, 0.0625])
  allowed = lambda b, h, t, s: seg[b, t] == seg[b, s]
  for causal in (True, False):
    want = naive.softmax_attention(q, k, v, allowed, causal=causal, alibi=np.asarray(slopes))
    got = blockwise_reference(q, k, v, causal=causal, segment_ids=seg, alibi_slopes=slopes,
                              block_q=4, block_k=8)
    np.testing.assert_allclose(got, want, atol=1e-12)
  rng = np.random.default_rng(3)
  gates = jnp.asarray(-np.log1p(np.exp(rng.normal(size=(2, 29, 4)))))  # -softplus: <= 0
  sinks = jnp.asarray(rng.normal(size=4))
  r = jnp.asarray(rng.normal(size=q.shape))
  tiled = lambda bq, *a: blockwise_reference(*a[:3], causal=True, segment_ids=seg,
                                             log_gates=a[3], sinks=a[4], softcap=2.0,
                                             block_q=bq, block_k=8)
  outs = [jax.value_and_grad(lambda *a: jnp.sum(tiled(bq, *a) * r), argnums=(0, 1, 2, 3, 4))(
      q, k, v, gates, sinks) for bq in (4, 29)]
  for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])):
    np.testing.assert_allclose(a, b, atol=1e-12)
  q9, k21, v21 = qkv(t=9, s=21)
  want = naive.softmax_attention(q9, k21, v21, lambda *a: True, causal=False)
  got = blockwise_reference(q9, k21, v21, causal=False, block_q=4, block_k=8)
  np.testing.assert_allclose(got, want, atol=1e-12)


@pytest.mark.parametrize("fn", [
    lambda q, k, v: blockwise_reference(q, k, v, block_k=8),
    lambda q, k, v: blockwise_reference(q, k, v, block_q=4, block_k=8,
                                        segment_ids=packed_segments(1, 11)),
    lambda q, k, v: blockwise_reference(q, k, v, causal=False, block_k=8,
                                        segment_ids=packed_segments(1, 11)),
    lambda q, k, v: dense_attention(q, k, v),
])
def test_blockwise_gradients_match_finite_differences(fn):
  q, k, v = qkv(b=1, t=11, hq=2, hkv=1, d=4)
  check_grads(fn, (q, k, v), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


# ---- softmax: the Forgetting Transformer's gate bias (and ALiBi as constant gates) ------------

def fox_gates(b, t, hq, seed=2, low=0.0, high=1.0, dtype=np.float64):
  """log forget gates in [-high, -low] (f in [e^-high, e^-low])."""
  r = np.random.default_rng(seed)
  return jnp.asarray(-r.uniform(low, high, size=(b, t, hq)).astype(dtype))


@functools.partial(jax.jit, static_argnames=("impl", "block_k", "causal"))
def attend(q, k, v, g=None, seg=None, slopes=None, *, impl, block_k=8, causal=True):
  """blockwise_attention, jitted (one compile per shape, not op by op), with the reference's
  blocks small so that several of them and a ragged last one are crossed."""
  kw = dict(log_gates=g, segment_ids=seg, alibi_slopes=slopes, causal=causal)
  if impl == "reference":
    return blockwise_reference(q, k, v, block_k=block_k, **kw)
  return blockwise_attention(q, k, v, impl=impl, **kw)


def fox(impl, block_k=8):
  """(q, k, v, log_gates, segment_ids=None) -> out of one blockwise impl."""
  return lambda q, k, v, g, seg=None: attend(q, k, v, g, seg, impl=impl, block_k=block_k)


@pytest.mark.parametrize("impl", ["reference", "xla", "auto"])
@pytest.mark.parametrize("hq,hkv,segments", [(4, 2, True), (2, 2, False), (4, 1, True)])
def test_fox_matches_naive_float64(impl, hq, hkv, segments):
  q, k, v = qkv(t=21, hq=hq, hkv=hkv)
  seg = packed_segments(2, 21, seed=5) if segments else None
  g = fox_gates(2, 21, hq)
  want = naive.fox_attention(q, k, v, g, segment_ids=seg)
  np.testing.assert_allclose(fox(impl)(q, k, v, g, seg), want, atol=1e-12)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_fox_gradients_match_finite_differences(impl):
  """All four gradients, the gates' included, with packed documents (the running sums restart
  at each document, so the gates' gradient is reverse running sums within each)."""
  q, k, v = qkv(b=1, t=11, hq=2, hkv=1, d=4)
  seg = jnp.asarray([[1] * 4 + [2] * 7], jnp.int32)
  g = fox_gates(1, 11, 2)
  check_grads(lambda q, k, v, g: fox(impl, block_k=4)(q, k, v, g, seg), (q, k, v, g), order=1,
              modes=["rev"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_fox_gradients_match_the_naive_oracle(impl):
  """The gradient of sum(out * cot) along random directions of q, k, v and the gates against
  central differences of the float64 loop oracle (independent of pallas_kernels)."""
  q, k, v = qkv(b=1, t=9, hq=2, hkv=1, d=4, seed=3)
  seg = jnp.asarray([[1] * 5 + [2] * 4], jnp.int32)
  g = fox_gates(1, 9, 2)
  r = np.random.default_rng(7)
  cot = r.normal(size=q.shape)
  loss = lambda *x: jnp.sum(fox(impl, block_k=4)(*x, seg) * cot)
  grads = jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, g)
  oracle = lambda *x: float(np.sum(naive.fox_attention(*x, segment_ids=seg) * cot))
  eps = 1e-6
  for i, x in enumerate((q, k, v, g)):
    u = r.normal(size=x.shape)
    shifted = lambda sign: [y + sign * eps * u if j == i else y
                            for j, y in enumerate((q, k, v, g))]
    numeric = (oracle(*shifted(1)) - oracle(*shifted(-1))) / (2 * eps)
    np.testing.assert_allclose(float(jnp.sum(grads[i] * u)), numeric, rtol=1e-7, atol=1e-8,
                               err_msg=f"argument {i}")


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_fox_constant_gates_are_alibi_and_unit_gates_are_causal_softmax(impl):
  q, k, v = qkv(t=23)
  seg = packed_segments(2, 23, seed=1)
  slopes = jnp.asarray([0.5, 0.25, 1 / 16, 1 / 256])
  constant = jnp.broadcast_to(-slopes, (2, 23, 4))
  alibi = attend(q, k, v, None, seg, slopes, impl=impl)
  np.testing.assert_allclose(fox(impl)(q, k, v, constant, seg), alibi, atol=1e-12)
  seg_np = np.asarray(seg)  # (indexing numpy, not a jax array, in the loops)
  allowed = lambda b, h, t, s: seg_np[b, t] == seg_np[b, s]
  np.testing.assert_allclose(alibi, naive.softmax_attention(q, k, v, allowed,
                                                            alibi=np.asarray(slopes)),
                             atol=1e-12)
  plain = attend(q, k, v, None, seg, impl=impl)
  np.testing.assert_allclose(fox(impl)(q, k, v, jnp.zeros((2, 23, 4)), seg), plain, atol=1e-12)
  # the slopes' gradient is the constant gates' (-sum over tokens)
  d_slopes = jax.grad(lambda s: jnp.sum(attend(q, k, v, None, seg, s, impl=impl) ** 2))(slopes)
  d_gates = jax.grad(lambda g: jnp.sum(fox(impl)(q, k, v, g, seg) ** 2))(constant)
  np.testing.assert_allclose(d_slopes, -d_gates.sum(axis=(0, 1)), atol=1e-10)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_fox_packed_documents_do_not_see_each_other(impl):
  """The bias restarts at each document: a document's outputs do not depend on another's
  tokens or gates, and its loss gives another's gates no gradient."""
  q, k, v = qkv(b=1, t=30, seed=4)
  g = fox_gates(1, 30, 4, seed=4)
  seg = jnp.asarray([[1] * 12 + [2] * 18], jnp.int32)
  out = fox(impl)(q, k, v, g, seg)
  r = np.random.default_rng(9)
  other = lambda x: x.at[:, :12].set(jnp.asarray(r.normal(size=x[:, :12].shape)))
  out2 = fox(impl)(other(q), other(k), other(v), -jnp.abs(other(g)), seg)
  np.testing.assert_allclose(out2[:, 12:], out[:, 12:], atol=1e-12)
  d_g = jax.grad(lambda g: jnp.sum(fox(impl)(q, k, v, g, seg)[:, 12:] ** 2))(g)
  assert np.all(d_g[:, :12] == 0) and np.any(d_g[:, 12:] != 0)
  # ... and one document alone gives the same outputs
  alone = fox(impl)(q[:, 12:], k[:, 12:], v[:, 12:], g[:, 12:])
  np.testing.assert_allclose(alone, out[:, 12:], atol=1e-12)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_alibi_without_causality_or_with_cross_lengths(impl):
  """ALiBi outside causal self-attention (-slope * |t - s|) still runs on the jnp paths."""
  slopes = jnp.asarray([0.5, 0.25, 0.125, 0.0625])
  q, k, v = qkv(t=19)
  want = naive.softmax_attention(q, k, v, lambda *a: True, alibi=np.asarray(slopes),
                                 causal=False)
  got = attend(q, k, v, slopes=slopes, impl=impl, causal=False)
  np.testing.assert_allclose(got, want, atol=1e-12)
  q, k, v = qkv(t=9, s=21)
  want = naive.softmax_attention(q, k, v, lambda *a: True, alibi=np.asarray(slopes),
                                 causal=False)
  got = attend(q, k, v, slopes=slopes, impl=impl, causal=False)
  np.testing.assert_allclose(got, want, atol=1e-12)
  fn = lambda q, k, v, s: attend(q, k, v, slopes=s, impl=impl, block_k=4, causal=False)
  check_grads(fn, qkv(b=1, t=7, hq=2, hkv=1, d=4) + (slopes[:2],), order=1, modes=["rev"],
              atol=1e-6, rtol=1e-6)


def test_fox_bad_arguments_fail_in_one_line():
  q, k, v = qkv(t=10)
  g = jnp.zeros((2, 10, 4))
  cases = [
      (dict(log_gates=jnp.zeros((2, 10, 3))), r"log_gates\(2, 10, 3\) must be \[B, T, Hq\]"),
      (dict(log_gates=g, causal=False), "log_gates need causal=True"),
      (dict(log_gates=g.astype(jnp.int32)), "log_gates must be floating point"),
      (dict(alibi_slopes=jnp.zeros((3,))), r"alibi_slopes\(3,\) must be \[Hq\]"),
      (dict(log_gates=g, impl="cudnn"), "impl='cudnn' does not take log_gates"),
      (dict(alibi_slopes=jnp.ones((4,)), impl="cudnn"), "impl='cudnn' does not take alibi_slopes"),
  ]
  for kwargs, match in cases:
    with pytest.raises(ValueError, match=match):
      blockwise_attention(q, k, v, **kwargs)
  q2, k2, v2 = qkv(t=10, s=12)
  with pytest.raises(ValueError, match="log_gates need T == S"):
    blockwise_attention(q2, k2, v2, log_gates=g)


@pytest.mark.parametrize("backend", ["cpu", "gpu", "tpu"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("gated,segments", [(False, False), (True, False), (False, True),
                                            (True, True)])
def test_auto_lands_on_an_impl_that_takes_the_call(monkeypatch, backend, dtype, head_dim,
                                                   gated, segments):
  """auto, per backend (faked), for fp32 and bf16, ALiBi / forget gates, head dims 64-256 and
  packed segments: an implementation that takes the call, never cuDNN with a dense segment
  mask, never the dense jnp path."""
  from pallas_kernels import capabilities
  from pallas_kernels.blockwise import api
  monkeypatch.setattr(api._common, "backend", lambda: backend)
  impl = api.resolve_impl("auto", log_gates=gated, dtype=dtype, head_dim=head_dim,
                          segments=segments)
  assert capabilities.blockwise(impl, backend=backend, dtype=dtype, head_dim=head_dim,
                                gated=gated, segments=segments) is None, impl
  assert impl != "xla"
  if impl == "cudnn":
    assert not segments and not gated and dtype == "bfloat16"
  want = {"cpu": "reference", "tpu": "pallas",
          "gpu": "cudnn" if dtype == "bfloat16" and not gated and not segments else "reference"}
  assert impl == want[backend]


def test_auto_avoids_kernels_that_refuse_alibi(monkeypatch):
  from pallas_kernels.blockwise import api
  from pallas_kernels.sparse import api as sparse_api
  monkeypatch.setattr(api._common, "backend", lambda: "tpu")
  assert api.resolve_impl("auto", alibi=True) == "reference"  # not causal self-attention
  assert sparse_api.resolve_impl("auto") == "pallas"
  assert sparse_api.resolve_impl("auto", jnp_only=True) == "xla"
  assert sparse_api.resolve_impl("auto", dtype="float32", head_dim=64, pattern="moba",
                                 block_size=64, alibi=True) == "xla"


# Long sequences under strong decay: whole key blocks whose weights underflow in fp32 (once
# slope * distance > ~88) must add exact zeros, not NaN (the reference's online softmax was NaN
# from T=512 at slope 1/2 and T=2048 at slope 1/16). fp32 inputs, one head per slope (the dense
# oracle at T=16384 holds 1 GiB of logits per head), against the dense path.
LONG = [(1024, (0.5, 1 / 16, 1 / 256)), (4096, (0.5, 1 / 64, 1 / 256)), (16384, (0.5,)),
        (16384, (1 / 256,))]


def long_inputs(t, slopes, seed=0):
  r = np.random.default_rng(seed)
  mk = lambda *shape: jnp.asarray(r.normal(size=shape).astype(np.float32))
  return (mk(1, t, len(slopes), 8), mk(1, t, 1, 8), mk(1, t, 1, 8),
          jnp.asarray(slopes, jnp.float32))


def assert_finite_and_close(fn, oracle, args, argnums, tol):
  cot = jnp.asarray(np.random.default_rng(1).normal(size=args[0].shape).astype(np.float32))
  value = lambda f: jax.jit(jax.value_and_grad(lambda *a: jnp.sum(f(*a) * cot), argnums))(*args)
  (got, g_got), (want, g_want) = value(fn), value(oracle)
  for name, a, b in zip(("loss", "dq", "dk", "dv", "d4"), (got, *g_got), (want, *g_want)):
    assert np.all(np.isfinite(a)), name
    np.testing.assert_allclose(a, b, atol=tol * max(float(jnp.max(jnp.abs(b))), 1.0),
                               err_msg=name)


@pytest.mark.parametrize("t,slopes", LONG, ids=[f"T{t}-slopes" + ",".join(
    f"1/{round(1 / x)}" for x in s) for t, s in LONG])
def test_blockwise_stays_finite_under_strong_decay_at_long_lengths(t, slopes):
  q, k, v, s = long_inputs(t, slopes)
  gates = jnp.broadcast_to(-s, (1, t, len(slopes)))
  ref = lambda q, k, v, g: blockwise_attention(q, k, v, log_gates=g, impl="reference")
  dense = lambda q, k, v, g: blockwise_attention(q, k, v, log_gates=g, impl="xla")
  assert_finite_and_close(ref, dense, (q, k, v, gates), (0, 1, 2, 3), 2e-4)
  alibi = jax.jit(lambda q, k, v, s: blockwise_attention(q, k, v, alibi_slopes=s,
                                                         impl="reference"))
  assert np.all(np.isfinite(alibi(q, k, v, s)))


@pytest.mark.parametrize("t,slopes,impl", [
    (1024, (0.5, 1 / 256), "reference"), (1024, (0.5, 1 / 256), "xla"),
    (4096, (1 / 16, 1 / 256), "reference"), (4096, (1 / 16, 1 / 256), "xla")])
def test_sparse_stays_finite_under_strong_alibi_at_long_lengths(t, slopes, impl):
  q, k, v, s = long_inputs(t, slopes, seed=2)
  window = SlidingWindow(t // 2 + 3)
  fn = lambda q, k, v, s: sparse_attention(q, k, v, pattern=window, alibi_slopes=s, impl=impl)
  dense = lambda q, k, v, s: dense_attention(q, k, v, alibi_slopes=s, mask=jnp.asarray(
      sparse_pattern_token_mask(window, t))[None, None])
  assert_finite_and_close(fn, dense, (q, k, v, s), (0, 1, 2), 2e-4)


def test_sparse_window_stays_finite_at_16k():
  """T=16384 on the block-skipping path, whose window (256) at slope 1/2 only cuts weights
  below e^-128, exactly 0 in fp32: so it equals full ALiBi on the blockwise reference (checked
  against the dense path at this length above); the dense masked oracle would take minutes."""
  q, k, v, s = long_inputs(16384, (0.5,), seed=3)
  fn = lambda q, k, v: sparse_attention(q, k, v, pattern=SlidingWindow(256), alibi_slopes=s,
                                        impl="xla")
  full = lambda q, k, v: blockwise_attention(q, k, v, alibi_slopes=s, impl="reference")
  assert_finite_and_close(fn, full, (q, k, v), (0, 1, 2), 2e-4)


# ---- linear ------------------------------------------------------------------------------------

DECAYS = ["none", "constant", "gates", "strong_gates"]


def make_decay(kind, b, t, hq, seed=1):
  r = np.random.default_rng(seed)
  if kind == "none":
    return None
  if kind == "constant":
    return jnp.asarray(-r.uniform(0.01, 1.0, size=(hq,)))
  if kind == "gates":
    return jnp.asarray(-r.uniform(0.0, 1.0, size=(b, t, hq)))
  return jnp.asarray(-r.uniform(5.0, 30.0, size=(b, t, hq)))  # decays to ~0 within a step


def as_gates(decay, b, t, hq):
  if decay is None:
    return None
  return np.broadcast_to(np.asarray(decay), (b, t, hq)) if decay.ndim == 1 else np.asarray(decay)


@pytest.mark.parametrize("decay_kind", DECAYS)
@pytest.mark.parametrize("fmap,normalize", [("elu1", True), ("relu", True), ("identity", False),
                                            ("elu1", False)])
def test_linear_forms_match_naive_float64(decay_kind, fmap, normalize):
  q, k, v = qkv(t=23, hq=4, hkv=2)
  decay = make_decay(decay_kind, 2, 23, 4)
  want = naive.linear_attention(q, k, v, feature_map=fmap, log_gates=as_gates(decay, 2, 23, 4),
                                normalize=normalize)
  kw = dict(feature_map=fmap, decay=decay, normalize=normalize)
  tol = dict(atol=1e-9, rtol=1e-9)
  np.testing.assert_allclose(linear_parallel(q, k, v, **kw), want, **tol)
  np.testing.assert_allclose(linear_recurrent(q, k, v, **kw), want, **tol)
  for chunk in (4, 7, 64):  # 23 is not a multiple of any of them
    np.testing.assert_allclose(linear_chunked(q, k, v, chunk_size=chunk, **kw), want, **tol)
  np.testing.assert_allclose(linear_attention(q, k, v, chunk_size=8, **kw), want, **tol)


@pytest.mark.parametrize("decay_kind", DECAYS)
def test_linear_segments_match_naive(decay_kind):
  q, k, v = qkv(t=30)
  seg = packed_segments(2, 30, seed=3)
  decay = make_decay(decay_kind, 2, 30, 4)
  want = naive.linear_attention(q, k, v, log_gates=as_gates(decay, 2, 30, 4),
                                segment_ids=np.asarray(seg))
  for fn in (linear_parallel, linear_recurrent):
    np.testing.assert_allclose(fn(q, k, v, decay=decay, segment_ids=seg), want, atol=1e-9)
  for chunk in (4, 8, 32):
    np.testing.assert_allclose(linear_chunked(q, k, v, decay=decay, segment_ids=seg,
                                              chunk_size=chunk), want, atol=1e-9)


@pytest.mark.parametrize("decay_kind", DECAYS)
def test_recurrent_decoding_step_by_step_equals_chunked(decay_kind):
  b, t, hq, hkv, d = 2, 19, 4, 2, 8
  q, k, v = qkv(b=b, t=t, hq=hq, hkv=hkv, d=d)
  decay = make_decay(decay_kind, b, t, hq)
  state = linear_attention_init_state(b, hq, d, d, jnp.float64)
  outs = []
  for i in range(t):
    d_t = None if decay is None else (decay if decay.ndim == 1 else decay[:, i])
    state, o = linear_attention_step(state, q[:, i], k[:, i], v[:, i], decay=d_t)
    outs.append(o)
  np.testing.assert_allclose(jnp.stack(outs, 1), linear_chunked(q, k, v, decay=decay,
                                                                chunk_size=8), atol=1e-10)


@pytest.mark.parametrize("decay_kind", ["none", "constant", "gates"])
def test_linear_gradients_match_finite_differences(decay_kind):
  q, k, v = qkv(b=1, t=10, hq=2, hkv=1, d=3)
  decay = make_decay(decay_kind, 1, 10, 2)
  if decay is None:
    check_grads(lambda q, k, v: linear_chunked(q, k, v, chunk_size=4), (q, k, v), order=1,
                modes=["rev"], atol=1e-6, rtol=1e-6)
  else:  # gradients of the gates too
    check_grads(lambda q, k, v, g: linear_chunked(q, k, v, decay=g, chunk_size=4),
                (q, k, v, decay), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


# ---- sparse ------------------------------------------------------------------------------------

def window_allowed(w):
  return lambda b, h, t, s: t - w < s <= t


@pytest.mark.parametrize("window", [1, 5, 16, 40])
@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_sliding_window_matches_naive(window, impl):
  q, k, v = qkv(t=45, hq=4, hkv=2)
  want = naive.softmax_attention(q, k, v, window_allowed(window))
  got = sparse_attention(q, k, v, pattern=SlidingWindow(window), impl=impl)
  np.testing.assert_allclose(got, want, atol=1e-12)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_block_mask_matches_naive(impl):
  t, bs = 45, 8
  mask = block_mask(6, local=2, global_blocks=1, stride=3)
  q, k, v = qkv(t=t)
  allowed = lambda b, h, ti, s: bool(mask[ti // bs, s // bs])
  want = naive.softmax_attention(q, k, v, allowed)
  np.testing.assert_allclose(sparse_attention(q, k, v, pattern=BlockMask(bs, mask), impl=impl),
                             want, atol=1e-12)


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_moba_matches_naive_routing_and_attention(top_k, impl):
  t, bs = 47, 8  # 6 blocks, the last one ragged: top_k < number of blocks
  q, k, v = qkv(t=t, hq=4, hkv=2, seed=5)
  chosen = naive.moba_blocks(q, k, bs, top_k)
  allowed = lambda b, h, ti, s: s // bs in chosen[b, h, ti]
  want = naive.softmax_attention(q, k, v, allowed)
  got = sparse_attention(q, k, v, pattern=MoBA(bs, top_k), impl=impl)
  np.testing.assert_allclose(got, want, atol=1e-12)


def test_moba_routing_picks_the_highest_block_means():
  q, k, _ = qkv(t=40, seed=7)
  routes = np.asarray(moba_routing(q, k, block_size=8, top_k=3))
  chosen = naive.moba_blocks(q, k, 8, 3)
  for (b, h, t), blocks in chosen.items():
    got = {int(j) for j in routes[b, t, h] if j >= 0} | {t // 8}
    assert got == blocks


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_full_patterns_equal_causal_softmax(impl):
  t = 50
  q, k, v = qkv(t=t, dtype=np.float32)
  causal = dense_attention(q, k, v)
  tol = dict(atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(sparse_attention(q, k, v, pattern=SlidingWindow(t), impl=impl),
                             causal, **tol)
  np.testing.assert_allclose(sparse_attention(q, k, v, pattern=SlidingWindow(10 * t), impl=impl),
                             causal, **tol)
  ones = BlockMask(16, np.ones((4, 4), bool))
  np.testing.assert_allclose(sparse_attention(q, k, v, pattern=ones, impl=impl), causal, **tol)
  np.testing.assert_allclose(sparse_attention(q, k, v, pattern=MoBA(16, 4), impl=impl), causal,
                             **tol)
  np.testing.assert_allclose(sparse_attention(q, k, v, pattern=MoBA(16, 9), impl=impl), causal,
                             **tol)


@pytest.mark.parametrize("pattern", [SlidingWindow(6), BlockMask(8, block_mask(4, local=2)),
                                     MoBA(8, 2)], ids=["window", "blockmask", "moba"])
def test_sparse_segments_and_alibi_match_reference(pattern):
  q, k, v = qkv(t=29)
  seg = packed_segments(2, 29, seed=4)
  slopes = jnp.asarray([0.3, 0.2, 0.1, 0.05])
  want = sparse_reference(q, k, v, pattern=pattern, segment_ids=seg, alibi_slopes=slopes)
  got = sparse_blockwise(q, k, v, pattern=pattern, segment_ids=seg, alibi_slopes=slopes)
  np.testing.assert_allclose(got, want, atol=1e-12)
  if not isinstance(pattern, MoBA):
    allowed = lambda b, h, t, s: (seg[b, t] == seg[b, s]) and bool(
        np.asarray(sparse_pattern_token_mask(pattern, 29))[t, s])
    np.testing.assert_allclose(got, naive.softmax_attention(q, k, v, allowed,
                                                            alibi=np.asarray(slopes)),
                               atol=1e-12)


def sparse_pattern_token_mask(pattern, t):
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  if isinstance(pattern, SlidingWindow):
    return (i - j < pattern.window)
  return pattern.array[i // pattern.block_size, j // pattern.block_size]


def test_moba_routing_ignores_other_documents():
  """With packed documents, a document's routing and output do not depend on the others."""
  q, k, v = qkv(b=1, t=40, seed=9)
  seg = jnp.asarray([[1] * 13 + [2] * 27], jnp.int32)
  out = sparse_attention(q, k, v, pattern=MoBA(8, 2), segment_ids=seg)
  r = np.random.default_rng(1)
  k2 = k.at[:, :13].set(jnp.asarray(r.normal(size=(1, 13, 2, 8))) * 5)
  v2 = v.at[:, :13].set(jnp.asarray(r.normal(size=(1, 13, 2, 8))))
  out2 = sparse_attention(q, k2, v2, pattern=MoBA(8, 2), segment_ids=seg)
  np.testing.assert_allclose(out2[:, 13:], out[:, 13:], atol=1e-12)


def test_block_lists_visit_only_kept_blocks():
  _, idx, valid = block_lists(SlidingWindow(16), 128, 128, block_size=16)
  counts = valid.sum(axis=1)
  assert counts.tolist() == [1] + [2] * 7  # the own block and the one before
  _, idx, valid = block_lists(BlockMask(16, block_mask(8, local=1, global_blocks=1)), 128, 128)
  assert valid.sum() == 8 + 7  # diagonal + sink column below it


@pytest.mark.parametrize("pattern", [SlidingWindow(5), BlockMask(4, block_mask(3, local=2)),
                                     MoBA(4, 2)], ids=["window", "blockmask", "moba"])
def test_sparse_gradients_match_finite_differences(pattern):
  q, k, v = qkv(b=1, t=11, hq=2, hkv=1, d=4)
  for fn in (sparse_reference, sparse_blockwise):
    check_grads(lambda q, k, v: fn(q, k, v, pattern=pattern), (q, k, v), order=1,
                modes=["rev"], atol=1e-6, rtol=1e-6)


# ---- bad inputs ------------------------------------------------------------------------------

def test_bad_shapes_and_values_fail_in_one_line():
  q, k, v = qkv(hq=3, hkv=2)
  with pytest.raises(ValueError, match="not a multiple"):
    blockwise_attention(q, k, v)
  q, k, v = qkv()
  with pytest.raises(ValueError, match="impl='magic'"):
    blockwise_attention(q, k, v, impl="magic")
  with pytest.raises(ValueError, match="feature_map='cosine'"):
    linear_attention(q, k, v, feature_map="cosine")
  with pytest.raises(ValueError, match=r"decay\(5,\)"):
    linear_attention(q, k, v, decay=jnp.zeros((5,)))
  with pytest.raises(ValueError, match="does not fit"):
    sparse_attention(q, k, v, pattern=BlockMask(8, np.ones((2, 2), bool)))
  with pytest.raises(ValueError, match="window=0"):
    SlidingWindow(0)
  with pytest.raises(ValueError, match="causal only"):
    sparse_attention(q, k, v, pattern=MoBA(8, 2), causal=False)


def test_moba_jnp_path_memory_is_bounded_by_the_dense_path():
  """The block-skipping path of MoBA once gathered top_k blocks of keys per query token (12x the
  dense path's memory at the MoBA variant of configs/gpt125m.py); now one query block at a
  time: its compiled forward+backward needs no more temporaries than dense masked attention."""
  b, t, h, d = 1, 2048, 4, 64
  spec = jax.ShapeDtypeStruct((b, t, h, d), jnp.float32)
  pattern = MoBA(256, 3)

  def temporaries(impl):
    loss = lambda q, k, v: jnp.sum(sparse_attention(q, k, v, pattern=pattern, impl=impl))
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return grad.lower(spec, spec, spec).compile().memory_analysis().temp_size_in_bytes

  assert temporaries("xla") <= temporaries("reference")
