"""Every attention kind in the model: causal, packed documents isolated, trains; config checks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmtrain import config as config_lib
from lmtrain.model import layer_kinds
from lmtrain.train import train
from lmtrain.trainer import build_model
from tests.conftest import read_scalars, small_config

VARIANTS = ["softmax", "linear", "gla", "sliding_window", "block_sparse", "moba", "hybrid"]
SMALL_FIELDS = {  # sized for the small test config (seq_len 64)
    "sliding_window": {"model.attention.window": 12},
    "block_sparse": {"model.attention.block_size": 8},
    "moba": {"model.attention.block_size": 8, "model.attention.top_k": 2},
    "linear": {"model.attention.chunk_size": 16},
    "gla": {"model.attention.chunk_size": 16},
    "hybrid": {"model.attention.chunk_size": 16},
}


def variant_config(variant, **overrides):
  return small_config(f"attention={variant}", **{**SMALL_FIELDS.get(variant, {}), **overrides})


def jitted_model(cfg):
  fns, init = build_model(cfg.model)
  params = jax.jit(init)(jax.random.key(0))
  apply = jax.jit(lambda p, tok, seg: fns.apply(p, tok, seg))
  return lambda tok, seg=None: apply(params, tok, seg)


def tokens(b, t, seed):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 256, size=(b, t)), jnp.int32)


@pytest.mark.parametrize("variant", VARIANTS)
def test_changing_token_p_leaves_earlier_logits_bit_identical(variant):
  cfg = variant_config(variant)
  config_lib.validate(cfg)
  model = jitted_model(cfg)
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


def test_hybrid_pattern_repeats_over_depth():
  cfg = variant_config("hybrid", **{"model.num_layers": 6})
  assert layer_kinds(cfg.model) == ("linear", "linear", "linear", "softmax", "linear", "linear")


def test_gla_has_a_gate_projection_and_linear_does_not():
  fns, _ = build_model(variant_config("gla").model)
  assert "gate_proj" in fns.logical_axes["blocks"][0]["attn"]
  fns, _ = build_model(variant_config("linear").model)
  assert "gate_proj" not in fns.logical_axes["blocks"][0]["attn"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_kind_trains_and_its_loss_falls(variant, tmp_path):
  cfg = variant_config(variant, **{"train.steps": 50, "train.eval_every": 50,
                                   "train.checkpoint_every": 50})
  train(cfg, str(tmp_path))
  losses = read_scalars(str(tmp_path))["train/loss"]
  assert losses[1] > 5.0
  assert np.mean([losses[s] for s in range(41, 51)]) < losses[1] - 1.5, variant


@pytest.mark.parametrize("overrides, needle", [
    ({"model.attention.kind": "sliding_window"}, "window must be set"),
    ({"model.attention.kind": "moba", "model.attention.block_size": 8}, "top_k must be set"),
    ({"model.attention.kind": "moba", "model.attention.block_size": 8,
      "model.attention.top_k": 0}, "top_k=0"),
    ({"model.attention.kind": "linear", "model.attention.feature_map": "cos"}, "'cos'"),
    ({"model.attention.kind": "linear", "model.attention.decay": "sometimes"}, "'sometimes'"),
    ({"model.attention.kind": "linear", "model.attention.feature_map": "identity"}, "identity"),
    ({"model.attention.kind": "linear", "model.position": "alibi"}, "alibi"),
    ({"model.attention.top_k": 2}, "top_k=2 is not used by attention kind softmax"),
    ({"model.attention.kind": "linear", "model.attention.window": 8}, "window=8"),
    ({"model.attention.layer_pattern": "linear,telepathy"}, "'telepathy'"),
    ({"model.attention.layer_pattern": "linear,linear"}, "not in layer_pattern"),
    ({"model.attention.impl": "cudnn", "model.attention.kind": "linear"}, "cudnn"),
    ({"model.attention.impl": "pallas", "model.attention.kind": "linear"}, "no such kernel"),
])
def test_kind_fields_are_checked(overrides, needle):
  with pytest.raises(config_lib.ConfigError, match=None) as e:
    config_lib.validate(small_config(**overrides))
  assert needle in str(e.value)


@pytest.mark.parametrize("variant,position", [("softmax", "alibi"), ("sliding_window", "alibi"),
                                              ("moba", "alibi"), ("softmax", "none"),
                                              ("linear", "none")])
def test_positions_alibi_and_none_are_causal_and_isolate_documents(variant, position):
  cfg = variant_config(variant, **{"model.position": position})
  config_lib.validate(cfg)
  model = jitted_model(cfg)
  tok = tokens(1, 40, 5)
  seg = jnp.asarray([[1] * 15 + [2] * 25], jnp.int32)
  base = np.asarray(model(tok, seg))
  out = np.asarray(model(tok.at[:, 20].set((tok[:, 20] + 3) % 256), seg))
  np.testing.assert_array_equal(out[:, :20], base[:, :20])
  other = np.asarray(model(tok.at[:, :15].set(tokens(1, 15, 9)), seg))
  np.testing.assert_allclose(other[:, 15:], base[:, 15:], atol=1e-5)
