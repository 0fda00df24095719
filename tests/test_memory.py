"""Training memory: remat policies, scan over layers and the vocabulary-chunked loss give the
plain step's losses and gradients (fp32, 1e-6 relative) for every attention kind and hybrids;
checkpoints cross scan settings both ways; the scanned program does not grow with depth; the
chunked loss never forms the [B, T, V] logits; the memory command; evals and generation."""
import os
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
# XLA's CPU backend without its expensive optimisations: these programs run once, and compile
# in about half the time (the numbers agree to well within RTOL)
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
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
  params = jax.jit(Trainer.from_config(cfg).init_params,
                   compiler_options=FAST_COMPILE)(jax.random.key(seed))
  return jax.tree.map(lambda p: p * 3.0 if p.ndim >= 2 else p, params)


def loss_and_grads(cfg, params, batch, *, dropout_seed=None):
  """(loss, grads in the unscanned layout) of the train step's loss for cfg's train settings;
  `params` are unscanned and converted to cfg's layout first."""
  trainer = Trainer.from_config(cfg)
  if cfg.train.scan_layers:
    period = stack.period_of(trainer.abstract_state()["params"])
    params = stack.to_scanned(params, period)
  rng = None if dropout_seed is None else jax.random.key(dropout_seed)
  loss, grads = jax.jit(jax.value_and_grad(lambda p: loss_sums(trainer.model, p, batch, rng)[0]),
                        compiler_options=FAST_COMPILE)(params)
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

# (remat, scan_layers, loss_chunk): every kind runs scanned, the policies cycled over the kinds;
# the hybrids add the policies without scan. Under full the MLP runs in chunks of 5 tokens.
SCANNED = [("full", True, 7), ("dots", True, 0), ("none", True, 7)]
CASES = [(k, "", 2, SCANNED[i % 3]) for i, k in enumerate(mixers.kinds())]
# "softmax,diff" (scanned over 5 layers: two groups and an unscanned tail) with dropout and tied
# embeddings; the README's "linear,linear,linear,softmax" over 6: one group and a tail of two
CASES += [("softmax", "softmax,diff", 5, ("full", True, 7)),
          ("softmax", "softmax,diff", 3, ("full", False, 7))]  # remat without scan
CASES += [("linear", "linear,linear,linear,softmax", 6, ("dots", True, 0))]


@pytest.mark.parametrize("kind,pattern,layers,combo", CASES,
                         ids=[f"{p or k}-{c[0]}-scan{int(c[1])}-chunk{c[2]}"
                              for k, p, _, c in CASES])
def test_remat_scan_and_chunked_loss_equal_the_plain_step(kind, pattern, layers, combo):
  """2 layers of each kind (diff's lambda_init differs per layer, so a scan that lost the layer
  index fails), and hybrids whose scanned groups leave a tail."""
  remat, scan, chunk = combo
  over = {"model.num_layers": layers}
  if pattern == "softmax,diff":
    over.update({"model.dropout_rate": 0.1, "model.tie_embeddings": True})
  seed = 3 if pattern == "softmax,diff" else None  # dropout's per-layer keys under scan/remat
  cfg = kind_config(kind, pattern, **over)
  params, batch = init_params(cfg), make_batch(cfg)
  want = loss_and_grads(cfg, params, batch, dropout_seed=seed)
  got = loss_and_grads(kind_config(kind, pattern, **over, **{
      "train.remat": remat, "train.scan_layers": scan, "train.loss_chunk": chunk,
      "train.mlp_chunk": 5}), params, batch, dropout_seed=seed)
  assert_same(got, want, f"{pattern or kind} {combo}")


# ---- the chunked loss ---------------------------------------------------------------------------

def test_auto_chunk_is_off_for_small_logits_and_bounded_for_large_ones():
  assert loss_lib.chunk_tokens(0, 1, 32768, 258) == 32768  # 32 MiB of logits: one chunk
  for rows, vocab in ((1, 131072), (8, 32000), (64, 258)):
    chunk = loss_lib.chunk_tokens(0, rows, 32768, vocab)
    assert chunk & (chunk - 1) == 0 and chunk >= loss_lib.MIN_AUTO_CHUNK
    assert rows * chunk * vocab * 4 <= loss_lib.AUTO_LOGITS_BYTES
    assert rows * 2 * chunk * vocab * 4 > loss_lib.AUTO_LOGITS_BYTES  # the largest that fits
  assert loss_lib.chunk_tokens(100, 1, 64, 258) == 64
  assert loss_lib.chunk_tokens(16, 1, 64, 258) == 16


def compiled_hlo(cfg):
  from lmtrain.data.pipeline import BATCH_KEYS
  trainer = Trainer.from_config(cfg)
  spec = {k: jax.ShapeDtypeStruct((cfg.data.batch_size, cfg.data.seq_len), jnp.int32)
          for k in BATCH_KEYS}
  return jax.jit(trainer.train_step).lower(trainer.abstract_state(), spec).compile()


def test_the_chunked_step_never_forms_the_whole_logits():
  over = {"model.vocab_size": 4096, "data.seq_len": 128, "model.num_layers": 1}
  whole = re.compile(r"f32\[2,128,4096\]")
  plain = compiled_hlo(kind_config("softmax", **over, **{"train.loss_chunk": 128}))
  chunked = compiled_hlo(kind_config("softmax", **over, **{"train.loss_chunk": 16}))
  assert whole.search(plain.as_text())  # the test sees the logits when they are formed
  assert not whole.search(chunked.as_text())
  assert re.search(r"f32\[2,16,4096\]", chunked.as_text())  # one chunk's
  temps = lambda c: c.memory_analysis().temp_size_in_bytes
  assert temps(chunked) < temps(plain) - 2 * 128 * 4096 * 4  # at least the logits


# ---- compile size, memory growth ----------------------------------------------------------------

def lowered_size(cfg):
  from lmtrain.data.pipeline import BATCH_KEYS
  trainer = Trainer.from_config(cfg)
  spec = {k: jax.ShapeDtypeStruct((cfg.data.batch_size, cfg.data.seq_len), jnp.int32)
          for k in BATCH_KEYS}
  return len(jax.jit(trainer.train_step).lower(trainer.abstract_state(), spec).as_text())


def test_the_scanned_program_does_not_grow_with_depth():
  """What XLA compiles (the lowered train step) for 2 vs 16 layers: about the same with scan
  (< 1.2x, the issue asks < 2x); without scan 4 layers already give 1.6x (the measure sees
  depth)."""
  size = {(scan, n): lowered_size(kind_config("softmax", **{
      "model.num_layers": n, "train.scan_layers": scan, "train.remat": "full"}))
          for scan, n in ((True, 2), (True, 16), (False, 2), (False, 4))}
  assert size[True, 16] < 1.2 * size[True, 2], size
  assert size[False, 4] > 1.6 * size[False, 2], size


def test_full_remat_with_scan_keeps_memory_linear_in_length_and_below_none():
  """Temporaries per token (beyond the gradients) at 1k and 4k tokens: flat under full remat
  with scan (no term grows with T^2, such as attention masks hoisted out of the layer scan), and
  under half of what remat=none keeps at 4k; the command's table rows, floor beside each."""
  from lmtrain import memory
  import ml_collections
  raw = small_config(resolve=False, **{**SIZES, "model.num_layers": 2, "data.batch_size": 1,
                                       "train.scan_layers": True, "train.remat": "full",
                                       "train.mlp_chunk": 256})
  rows = [memory.measure(raw, t) for t in (1024, 4096)]
  per_token = [r["per_token"] for r in rows]
  assert per_token[1] < 1.2 * per_token[0], per_token
  none = ml_collections.ConfigDict(raw.to_dict())
  none.train.remat, none.train.scan_layers = "none", False
  assert per_token[1] < 0.5 * memory.measure(none, 4096)["per_token"]
  assert memory.HEADER.split()[:6] == ["length", "tokens", "params", "optimizer", "temporaries",
                                       "floor"]
  for r, t in zip(rows, (1024, 4096)):
    assert 0 < r["floor"] <= r["temporaries"]
    assert memory.row_line(r).split()[:2] == [str(t), str(t)]


# ---- checkpoints across scan settings ----------------------------------------------------------

def noisy_state(trainer, seed=0):
  """A train state whose every float leaf (params and both Adam moments) is distinct."""
  state = jax.jit(trainer.init_state, static_argnums=0)(seed)
  leaves, treedef = jax.tree.flatten(state)
  rng = np.random.default_rng(seed)
  leaves = [x + jnp.asarray(rng.normal(size=x.shape), x.dtype)
            if jnp.issubdtype(x.dtype, jnp.floating) else x for x in leaves]
  return jax.tree.unflatten(treedef, leaves)


def test_a_checkpoint_restores_across_scan_settings_both_ways(tmp_path):
  """5 layers of "softmax,diff": stacked into two groups of two plus a tail of one, and back;
  params and Adam's moments alike, exactly."""
  over = {"model.num_layers": 5}
  plain = Trainer.from_config(kind_config("softmax", "softmax,diff", **over))
  scanned = Trainer.from_config(kind_config("softmax", "softmax,diff", **over,
                                            **{"train.scan_layers": True}))
  state = noisy_state(plain)
  as_scanned = stack.convert_tree(state, lambda p: stack.to_scanned(p, 2))
  assert jax.tree.structure(as_scanned) == jax.tree.structure(scanned.abstract_state())
  assert set(as_scanned["params"]) >= {"stack", "tail"} and "blocks" not in as_scanned["params"]
  for name, saved, reader, want in (("plain", state, scanned, as_scanned),
                                    ("scanned", as_scanned, plain, state)):
    ckpt = Checkpointer(str(tmp_path / name), keep=1, async_save=False)
    ckpt.save(1, saved, {"step": 1})
    ckpt.close()
    restored, data = Checkpointer(str(tmp_path / name), keep=1).restore(
        1, reader.abstract_state())
    assert data == {"step": 1}
    assert jax.tree.structure(restored) == jax.tree.structure(want), name
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(want)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


# ---- sharding, config errors --------------------------------------------------------------------

def test_stacked_parameters_carry_a_replicated_layers_axis():
  from jax.sharding import AbstractMesh, PartitionSpec as P

  from lmtrain import parallel
  from lmtrain.trainer import build_model
  fns, init = build_model(kind_config("softmax").model, scan_layers=True)
  axes = fns.logical_axes["stack"][0]["attn"]["q_proj"]["kernel"]
  assert axes == ("layers", "embed", "heads", "head_dim")
  params = jax.eval_shape(init, jax.random.key(0))
  shape = params["stack"][0]["attn"]["q_proj"]["kernel"].shape
  assert shape[0] == 2  # two layers stacked
  mesh = AbstractMesh((1, 2, 2, 1), parallel.MESH_AXES)
  assert parallel.logical_to_spec(axes, shape, mesh) == P(None, "fsdp", "tensor", None)


@pytest.mark.parametrize("over, needle", [
    ({"train.remat": "some"}, "train.remat='some' is not one of none, full, dots"),
    ({"train.loss_chunk": -1}, "train.loss_chunk=-1 must be an integer >= 0 (0 = auto)"),
    ({"train.mlp_chunk": -2}, "train.mlp_chunk=-2 must be an integer >= 0"),
])
def test_bad_memory_settings_fail_in_one_line(over, needle):
  from lmtrain.config import ConfigError
  with pytest.raises(ConfigError, match=re.escape(needle)) as e:
    small_config(**over)
  assert "\n" not in str(e.value)


def test_a_mixer_whose_layers_differ_beyond_parameters_is_refused_by_scan(monkeypatch):
  """A value derived from the layer index at construction (as diff's lambda_init was) would be
  silently the first layer's under scan: refused in one line before anything compiles."""
  from lmtrain.config import ConfigError
  from lmtrain.model.mixers.softmax import Softmax

  class LayerScaled(Softmax):
    kind = "layer_scaled"

    def __init__(self, dims, options, *, layer, **kwargs):
      super().__init__(dims, options, layer=layer, **kwargs)
      self.scale = 1.0 + layer  # static, so every layer's structure differs

  monkeypatch.setitem(mixers._REGISTRY, "layer_scaled", LayerScaled)
  small_config(**{"model.attention.kind": "layer_scaled"})  # fine without scan
  with pytest.raises(ConfigError, match="train.scan_layers=True: LayerScaled layers differ"):
    small_config(**{"model.attention.kind": "layer_scaled", "train.scan_layers": True})


# ---- evals and generation ----------------------------------------------------------------------

def test_the_eval_scorer_runs_the_chunked_loss_and_equals_the_logits_scorer():
  from lmtrain.evals.scoring import Scorer, model_scorer
  cfg = kind_config("softmax")
  params, batch = init_params(cfg), make_batch(cfg)
  saving = Trainer.from_config(kind_config("softmax", **{
      "train.loss_chunk": 5, "train.scan_layers": True, "train.remat": "full"}))
  args = (batch["tokens"], batch["targets"], batch["segment_ids"])
  nll, correct = model_scorer(saving.model).score(stack.to_scanned(params, 1), *args)
  fns = Trainer.from_config(cfg).model
  want_nll, want_correct = Scorer(lambda p, t, s: fns.apply(p, t, s)).score(params, *args)
  np.testing.assert_allclose(nll, want_nll, rtol=1e-5)
  np.testing.assert_array_equal(correct, want_correct)


def test_generation_with_scanned_layers_equals_the_unscanned_model():
  """A hybrid with a tail (3 layers of "linear,diff"): recurrent state and KV caches stacked
  over the groups, diff's per-layer lambda_init read from the scanned layer index."""
  kind, pattern, layers = "linear", "linear,diff", 3
  from lmtrain import generate as gen_lib
  cfg = kind_config(kind, pattern, **{"model.num_layers": layers})
  scanned_cfg = kind_config(kind, pattern, **{"model.num_layers": layers,
                                              "train.scan_layers": True})
  params = init_params(cfg)
  period = stack.period_of(Trainer.from_config(scanned_cfg).abstract_state()["params"])
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, 256, size=n).astype(np.int32) for n in (11, 5)]
  want = gen_lib.generate(params, cfg, prompts, max_new_tokens=6, temperature=0.0,
                          return_logits=True)
  got = gen_lib.generate(stack.to_scanned(params, period), scanned_cfg, prompts,
                         max_new_tokens=6, temperature=0.0, return_logits=True)
  np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5, atol=1e-5)
  for a, b in zip(got.tokens, want.tokens):
    np.testing.assert_array_equal(a, b)


# ---- the command -------------------------------------------------------------------------------

def test_the_memory_command_rejects_bad_input_in_one_line():
  """(Its table is test_full_remat_with_scan_keeps_memory_linear_in_length_and_below_none's.)"""
  from tests.conftest import cli_args
  for bad, needle in ((["--lengths", "64,x"], "--lengths='64,x'"),
                      (["--time_steps", "-1"], "--time_steps=-1")):
    proc = run_module("lmtrain.memory", cli_args() + bad)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and needle in proc.stderr, proc.stderr
