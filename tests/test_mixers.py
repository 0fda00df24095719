"""Every token mixer in the registry: equal to its independent float64 oracle (forward and
gradients), causal, packed documents isolated, options checked, FLOPs declared."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmtrain import config as config_lib
from lmtrain.flops import train_flops_per_step
from lmtrain.model import ModelDims, layer_kinds, mixers
from lmtrain.model.positions import positions_from_segments
from lmtrain.trainer import build_model
from tests import naive
from tests.conftest import small_config

KINDS = mixers.kinds()
VARIANTS = list(mixers.variants())


def chunk_overrides(variant):
  """Chunk size 16 for linear-family kinds at the test length 64 (so several chunks run)."""
  spec = mixers.variants()[variant]
  kinds = spec["layer_pattern"].split(",") if spec["layer_pattern"] else [spec["kind"]]
  return {f"model.attention.{k}.chunk_size": 16 for k in set(kinds)
          if "chunk_size" in mixers.get(k).Options.config_fields()}


def variant_config(variant, **overrides):
  return small_config(f"attention={variant}", **{**chunk_overrides(variant), **overrides})


def jitted_model(cfg):
  fns, init = build_model(cfg.model)
  params = jax.jit(init)(jax.random.key(0))
  apply = jax.jit(lambda p, tok, seg: fns.apply(p, tok, seg))
  return lambda tok, seg=None: apply(params, tok, seg)


def tokens(b, t, seed):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 256, size=(b, t)), jnp.int32)


def test_the_registry_has_the_shipped_kinds_each_with_a_paper_and_a_variant():
  assert {"softmax", "sliding_window", "block_sparse", "moba", "linear", "simple_gla",
          "gla", "diff", "selective", "deltanet", "gated_deltanet", "fox"} <= set(KINDS)
  assert KINDS[0] == "softmax"
  for kind in KINDS:
    cls = mixers.get(kind)
    assert cls.kind == kind and cls.paper and issubclass(cls, mixers.Mixer)
    assert dataclasses.is_dataclass(cls.Options)
    assert kind in VARIANTS
  assert {"hybrid"} <= set(VARIANTS)


# ---- the float64 oracles ---------------------------------------------------------------------

T_ORACLE = 13  # crosses windows, blocks and chunks of the sizes below, and a document boundary
ORACLE_OPTIONS = {
    "sliding_window": {"window": 5},
    "block_sparse": {"block_size": 4, "local_blocks": 1, "global_blocks": 1, "stride": 2},
    "moba": {"block_size": 4, "top_k": 2},
}
EXTRA_CASES = [  # options off by default, tested on
    ("softmax", {"position": "alibi"}), ("softmax", {"position": "none"}),
    ("softmax", {"qk_norm": True, "output_gate": True}),
    ("moba", {"qk_norm": True, "output_gate": True, "position": "none"}),
    ("sliding_window", {"position": "alibi"}),
    ("linear", {"short_conv": True, "output_norm": True, "output_gate": True,
                "feature_map": "relu"}),
    ("linear", {"normalize": False, "feature_map": "identity"}),
    ("gla", {"short_conv": True}),
    ("selective", {"position": "alibi", "qk_norm": True, "output_gate": True}),
    ("deltanet", {"short_conv": False, "output_gate": True}),
    ("gated_deltanet", {"expand_v": 1.0, "output_norm": False}),
    ("fox", {"position": "rope", "qk_norm": True, "output_gate": True}),
    ("fox", {"kv_shift": True, "output_norm": True, "qk_norm": True, "output_gate": True}),
    ("softmax", {"softcap": 3.0, "sinks": True}),
    ("sliding_window", {"sinks": True, "softcap": 2.0}),
    ("moba", {"softcap": 3.0, "sinks": True}),
    ("fox", {"sinks": True, "softcap": 4.0}),
    ("selective", {"sinks": True, "softcap": 5.0}),
    ("simple_gla", {"short_conv": False, "output_gate": False}),
]


def oracle_options(kind, extra):
  fields = mixers.get(kind).Options.config_fields()
  base = dict(ORACLE_OPTIONS.get(kind, {}))
  if "chunk_size" in fields:
    base["chunk_size"] = 4
  return mixers.get(kind).Options(**{**base, **extra}).resolve(T_ORACLE)


def random_like(tree, rng, scale):
  def draw(path, a):
    name = jax.tree_util.keystr(path)
    if "scale" in name:  # norm scales around one
      return jnp.asarray(1.0 + scale * rng.normal(size=a.shape))
    if "sink" in name:  # sink logits comparable to the others
      return jnp.asarray(4 * scale * rng.normal(size=a.shape))
    return jnp.asarray(scale * rng.normal(size=a.shape))
  return jax.tree_util.tree_map_with_path(draw, tree)


@pytest.fixture
def x64():
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", False)


@pytest.mark.parametrize("kind,extra", [(k, {}) for k in KINDS] + EXTRA_CASES)
def test_mixer_forward_and_gradients_equal_the_float64_oracle(kind, extra, x64):
  layer_oracle = naive.layer_oracle(kind)
  assert layer_oracle is not None, (f"attention kind {kind!r} has no float64 oracle: define "
                                    f"layer_oracle in tests/test_{kind}.py (see tests/naive.py)")
  dims = ModelDims(vocab_size=258, num_layers=2, d_model=16, num_heads=4, num_kv_heads=2,
                   head_dim=8, mlp_dim=32, tie_embeddings=False, compute_dtype=jnp.float64,
                   dropout_rate=0.0, layer_kinds=(kind, kind))
  options = oracle_options(kind, extra)
  mixer = mixers.get(kind)(dims, options, layer=1, impl="xla", out_std=0.02, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(mixer)
  rng = np.random.default_rng(0)
  params = random_like(nnx.to_pure_dict(state), rng, 0.5)
  x = jnp.asarray(rng.normal(size=(2, T_ORACLE, dims.d_model)))
  seg = jnp.asarray([[1] * 6 + [2] * 7, [3] * T_ORACLE], jnp.int32)
  pos = positions_from_segments(seg)

  @jax.jit
  def apply(p, x):
    return nnx.merge(graphdef, nnx.State(p))(x, pos, seg)

  def oracle(p, x):
    p = jax.tree.map(np.asarray, p)
    return layer_oracle(kind, p, np.asarray(x), np.asarray(seg), np.asarray(pos), options,
                              layer=1)

  np.testing.assert_allclose(apply(params, x), oracle(params, x), rtol=1e-9, atol=1e-10)
  r = jnp.asarray(rng.normal(size=(2, T_ORACLE, dims.d_model)))
  gp, gx = jax.jit(jax.grad(lambda p, x: jnp.sum(apply(p, x) * r), argnums=(0, 1)))(params, x)
  h = 1e-6
  for _ in range(2):  # directional derivatives against central differences of the oracle
    up, ux = random_like(params, rng, 1.0), jnp.asarray(rng.normal(size=x.shape))
    analytic = sum(float(jnp.vdot(a, b)) for a, b in zip(jax.tree.leaves(gp),
                                                         jax.tree.leaves(up)))
    analytic += float(jnp.vdot(gx, ux))
    shift = lambda s: oracle(jax.tree.map(lambda a, u: a + s * u, params, up), x + s * ux)
    f = lambda s: float(np.sum(shift(s) * np.asarray(r)))
    numeric = (f(h) - f(-h)) / (2 * h)
    assert abs(analytic - numeric) <= 1e-6 * max(1.0, abs(numeric)), (kind, analytic, numeric)


# ---- causality and packed documents in the whole model ---------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_changing_token_p_leaves_earlier_logits_bit_identical(variant):
  model = jitted_model(variant_config(variant))
  t = 53  # not a multiple of any block or chunk size
  tok = tokens(2, t, 0)
  seg = jnp.ones((2, t), jnp.int32)
  base = np.asarray(model(tok, seg))
  for p in (0, 8, 17, 52):
    out = np.asarray(model(tok.at[:, p].set((tok[:, p] + 7) % 256), seg))
    np.testing.assert_array_equal(out[:, :p], base[:, :p], err_msg=f"{variant} p={p}")
    assert not np.array_equal(out[:, p], base[:, p])


@pytest.mark.parametrize("variant", VARIANTS)
def test_packed_documents_do_not_depend_on_each_other(variant):
  model = jitted_model(variant_config(variant))
  a, b = tokens(1, 21, 1), tokens(1, 30, 2)
  seg = jnp.asarray([[1] * 21 + [2] * 30], jnp.int32)
  packed = model(jnp.concatenate([a, b], 1), seg)
  other = model(jnp.concatenate([tokens(1, 21, 3), b], 1), seg)
  np.testing.assert_allclose(other[:, 21:], packed[:, 21:], atol=1e-5)
  if variant in ("block_sparse", "moba"):
    return  # their blocks are absolute positions in the row, so a shifted document differs
  # and equal to the document run alone (positions restart at the segment start)
  alone = model(b, jnp.ones_like(b))
  np.testing.assert_allclose(packed[:, 21:], alone, atol=2e-4)


@pytest.mark.parametrize("kind,position", [("softmax", "alibi"), ("sliding_window", "alibi"),
                                           ("moba", "alibi"), ("softmax", "none")])
def test_positions_alibi_and_none_are_causal_and_isolate_documents(kind, position):
  model = jitted_model(variant_config(kind, **{f"model.attention.{kind}.position": position}))
  tok = tokens(1, 40, 5)
  seg = jnp.asarray([[1] * 15 + [2] * 25], jnp.int32)
  base = np.asarray(model(tok, seg))
  out = np.asarray(model(tok.at[:, 20].set((tok[:, 20] + 3) % 256), seg))
  np.testing.assert_array_equal(out[:, :20], base[:, :20])
  other = np.asarray(model(tok.at[:, :15].set(tokens(1, 15, 9)), seg))
  np.testing.assert_allclose(other[:, 15:], base[:, 15:], atol=1e-5)


def test_linear_kinds_take_no_positions():
  """No rotation before a feature map: a linear-family model shifted to another absolute offset
  inside its document... has no offset to see. Its layer gives the same output for a document
  whatever positions the model is handed."""
  for kind in [k for k in KINDS if mixers.get(k).group == "linear"]:
    cfg = variant_config(kind)
    fns, init = build_model(cfg.model)
    params = init(jax.random.key(1))
    tok = tokens(1, 24, 4)
    seg = jnp.ones((1, 24), jnp.int32)
    a = fns.apply(params, tok, seg, jnp.arange(24)[None])
    b = fns.apply(params, tok, seg, jnp.arange(24)[None] + 1000)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=kind)
    assert "position" not in mixers.get(kind).Options.config_fields()


def test_hybrid_pattern_repeats_over_depth():
  cfg = variant_config("hybrid", **{"model.num_layers": 6})
  assert layer_kinds(cfg.model) == ("linear", "linear", "linear", "softmax", "linear", "linear")


def test_gla_gates_are_per_key_dimension_from_a_low_rank_projection():
  cfg = variant_config("gla")
  fns, _ = build_model(cfg.model)
  attn = fns.logical_axes["blocks"][0]["attn"]
  assert {"gate_down", "gate_up", "g_proj", "o_norm"} <= set(attn)
  dims = ModelDims.from_config(cfg.model)
  mixer = mixers.get("gla")(dims, mixers.get("gla").Options(), layer=0, impl="xla",
                            out_std=0.02, rngs=nnx.Rngs(0))
  gates = mixer.log_gates(jnp.ones((2, 5, dims.d_model)))
  assert gates.shape == (2, 5, dims.num_heads, dims.head_dim // 2)  # expand_k = 0.5
  assert float(jnp.max(gates)) <= 0.0
  assert mixer.gate_down.kernel.shape == (dims.d_model, 16)


# ---- options and config checks ---------------------------------------------------------------

@pytest.mark.parametrize("overrides, needle", [
    ({"model.attention.kind": "sliding_window", "model.attention.sliding_window.window": 0},
     "model.attention.sliding_window.window=0"),
    ({"model.attention.kind": "moba", "model.attention.moba.top_k": 0}, "top_k=0"),
    ({"model.attention.kind": "linear", "model.attention.linear.feature_map": "cos"}, "'cos'"),
    ({"model.attention.kind": "linear", "model.attention.linear.feature_map": "identity"},
     "identity"),
    ({"model.attention.kind": "gla", "model.attention.gla.expand_k": 0.3}, "expand_k=0.3"),
    ({"model.attention.moba.top_k": 2}, "no layer uses attention kind 'moba'"),
    ({"model.attention.layer_pattern": "linear,telepathy"}, "'telepathy'"),
    ({"model.attention.layer_pattern": "linear,linear"}, "not in layer_pattern"),
    ({"model.attention.impl": "cudnn", "model.attention.kind": "linear"},
     "linear_attention has no cuDNN path"),
    ({"model.attention.impl": "cudnn"}, "cuDNN needs a CUDA GPU (this backend is cpu)"),
    ({"model.attention.impl": "pallas", "model.attention.kind": "linear"},
     "no Pallas linear-attention kernel for backend cpu"),
    ({"model.attention.impl": "interpret", "model.attention.kind": "gla"}, "per-key gates"),
    ({"model.attention.impl": "interpret", "model.attention.kind": "moba",
      "model.attention.moba.position": "alibi"}, "MoBA kernels take no ALiBi"),
    ({"model.attention.impl": "interpret_gpu"}, "takes bfloat16/float16, not float32"),
    ({"model.attention.impl": "interpret", "model.attention.kind": "deltanet"},
     "the delta rule has no Pallas kernel yet"),
])
def test_kind_options_are_checked(overrides, needle):
  with pytest.raises(config_lib.ConfigError) as e:
    small_config(**overrides)
  assert needle in str(e.value)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("variant", VARIANTS)
def test_flops_count_every_kind(variant):
  """The MFU count of every kind: parameter matmuls plus the mixer's token mixing, which is
  positive and less than dense causal softmax's for the sparse kinds at long lengths."""
  cfg = variant_config(variant)
  flops = train_flops_per_step(cfg.model, 1, 64)
  assert flops > 0
  for kind in set(layer_kinds(cfg.model)):
    from lmtrain.model.transformer import mixer_options
    dims = ModelDims.from_config(cfg.model)
    options = mixer_options(cfg.model.attention, kind)
    mixing = mixers.get(kind).forward_flops(options, dims, 4096)
    assert mixing > 0
    if mixers.get(kind).group == "sparse":
      full = mixers.get("softmax").forward_flops(
          mixers.get("softmax").Options(), dims, 4096)
      assert mixing < full


def test_sinks_at_minus_infinity_and_a_large_softcap_change_nothing():
  """A sink whose logit is -inf adds nothing to the denominator; soft-capping tends to plain
  softmax as the cap grows (tanh(x / c) * c -> x)."""
  from pallas_kernels import blockwise_attention, sparse_attention, SlidingWindow
  r = np.random.default_rng(0)
  q, k, v = (jnp.asarray(r.normal(size=(2, 19, 4, 8)), jnp.float32) for _ in range(3))
  plain = blockwise_attention(q, k, v, impl="reference")
  off = blockwise_attention(q, k, v, sinks=jnp.full((4,), -jnp.inf), impl="reference")
  np.testing.assert_allclose(off, plain, atol=1e-6)
  on = blockwise_attention(q, k, v, sinks=jnp.zeros((4,)), impl="reference")
  assert float(jnp.max(jnp.abs(on - plain))) > 1e-3
  errors = [float(jnp.max(jnp.abs(blockwise_attention(q, k, v, softcap=c, impl="reference")
                                  - plain))) for c in (1.0, 10.0, 100.0, 1000.0)]
  assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-4 and errors[0] > 1e-2
  window = lambda **kw: sparse_attention(q, k, v, pattern=SlidingWindow(5), impl="xla", **kw)
  np.testing.assert_allclose(window(softcap=1e5), window(), atol=1e-5)
