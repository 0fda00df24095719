"""Training memory: remat policies, scan over layers and the vocabulary-chunked loss give the
plain step's losses and gradients (fp32, 1e-6 relative) for every attention kind and hybrids;
checkpoints cross scan settings both ways; the scanned program does not grow with depth; the
chunked loss never forms the [B, T, V] logits; the memory command; evals and generation."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmtrain.checkpoint import Checkpointer
from lmtrain.model import loss as loss_lib
from lmtrain.model import mixers, stack
from lmtrain.model.positions import positions_from_segments
from lmtrain.trainer import Trainer, loss_sums
from tests.conftest import run_module, small_config

RTOL = 1e-6
T = 32  # linear kinds run 4 chunks of 8; a loss chunk of 7 does not divide T
SIZES = {"model.num_heads": 4, "model.num_kv_heads": 2, "data.seq_len": T,
         "data.batch_size": 2}
# options that make the short test length cross blocks, windows and chunks
SHORT = {"sliding_window": {"window": 6}, "block_sparse": {"block_size": 8},
         "moba": {"block_size": 8, "top_k": 2}}


def kind_config(kind, pattern="", **overrides):
  """A small config of attention `kind` (or a `pattern` of kinds), dotted overrides."""
  over = {}
  for k in set(pattern.split(",") if pattern else [kind]):
    over.update({f"model.attention.{k}.{f}": v for f, v in SHORT.get(k, {}).items()})
    if "chunk_size" in mixers.get(k).Options.config_fields():
      over[f"model.attention.{k}.chunk_size"] = 8
  return small_config(**{"model.attention.kind": kind, "model.attention.layer_pattern": pattern,
                         **SIZES, **over, **overrides})


def make_batch(cfg, seed=0):
  """Two rows: the first packs two documents, the second scores only part of its tokens."""
  b, t = cfg.data.batch_size, cfg.data.seq_len
  rng = np.random.default_rng(seed)
  stream = rng.integers(0, 256, size=(b, t + 1)).astype(np.int32)
  seg = np.ones((b, t), np.int32)
  seg[0, t // 3:] = 2
  mask = np.ones((b, t), np.int32)
  mask[1, : t // 4] = 0
  return {"tokens": jnp.asarray(stream[:, :-1]), "targets": jnp.asarray(stream[:, 1:]),
          "segment_ids": jnp.asarray(seg), "positions": positions_from_segments(jnp.asarray(seg)),
          "loss_mask": jnp.asarray(mask)}


def init_params(cfg, seed=0):
  """Initial params of an unscanned cfg, scaled up so that every layer's mixing shows."""
  assert not cfg.train.scan_layers
  params = jax.jit(Trainer.from_config(cfg).init_params)(jax.random.key(seed))
  return jax.tree.map(lambda p: p * 3.0 if p.ndim >= 2 else p, params)


def loss_and_grads(cfg, params, batch, *, dropout_seed=None):
  """(loss, grads in the unscanned layout) of the train step's loss for cfg's train settings;
  `params` are unscanned and converted to cfg's layout first."""
  trainer = Trainer.from_config(cfg)
  if cfg.train.scan_layers:
    period = stack.period_of(trainer.abstract_state()["params"])
    params = stack.to_scanned(params, period)
  rng = None if dropout_seed is None else jax.random.key(dropout_seed)
  loss, grads = jax.jit(jax.value_and_grad(
      lambda p: loss_sums(trainer.model, p, batch, rng)[0]))(params)
  return float(loss), stack.to_unscanned(grads)


def assert_same(got, want, what):
  """Loss to 1e-6 relative; gradients to 1e-6 relative as a whole (the norm of the difference
  over the gradient's norm: fp32 rounding of a matmul whose shape changed, e.g. a chunk of
  the loss, reaches ~1e-6 in a small leaf after five layers of backward)."""
  (loss, grads), (loss0, grads0) = got, want
  assert loss == pytest.approx(loss0, rel=RTOL), what
  diff = jnp.sqrt(sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(grads),
                                                             jax.tree.leaves(grads0))))
  norm = jnp.sqrt(sum(jnp.sum(b ** 2) for b in jax.tree.leaves(grads0)))
  assert jax.tree.structure(grads) == jax.tree.structure(grads0), what
  assert float(diff / norm) <= RTOL, f"{what}: gradients differ by {float(diff / norm):.2e}"


# ---- losses and gradients: every policy, scan, the chunked loss; every kind ------------------

COMBOS = [("full", False, 0), ("dots", False, 7), ("none", True, 0), ("full", True, 7),
          ("dots", True, 0), ("none", False, 7)]


def test_every_remat_policy_with_and_without_scan_and_chunks_equals_the_plain_step():
  """A hybrid whose pattern leaves a layer over (5 layers of "linear,softmax": two scanned
  groups and an unscanned tail), with dropout on (its per-layer keys under scan and remat)."""
  over = {"model.num_layers": 5, "model.dropout_rate": 0.1}
  base_cfg = kind_config("softmax", "linear,softmax", **over)
  params, batch = init_params(base_cfg), make_batch(base_cfg)
  want = loss_and_grads(base_cfg, params, batch, dropout_seed=3)
  for remat, scan, chunk in COMBOS:
    cfg = kind_config("softmax", "linear,softmax", **over, **{
        "train.remat": remat, "train.scan_layers": scan, "train.loss_chunk": chunk})
    got = loss_and_grads(cfg, params, batch, dropout_seed=3)
    assert_same(got, want, f"remat={remat} scan={scan} loss_chunk={chunk}")


@pytest.mark.parametrize("kind", mixers.kinds())
def test_every_kind_under_full_remat_scan_and_chunked_loss_equals_the_plain_step(kind):
  # 3 layers: diff's lambda_init differs per layer, so a scan that lost the layer index fails
  cfg = kind_config(kind, **{"model.num_layers": 3})
  params, batch = init_params(cfg), make_batch(cfg)
  want = loss_and_grads(cfg, params, batch)
  got = loss_and_grads(kind_config(kind, **{"model.num_layers": 3, "train.remat": "full",
                                            "train.scan_layers": True, "train.loss_chunk": 7}),
                       params, batch)
  assert_same(got, want, kind)
