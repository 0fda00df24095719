"""The train state, the optimizer, the loss, and the jitted train and eval steps.

The state is a plain pytree (so orbax and shardings see ordinary arrays):
  {"params": nested dict of fp32 arrays, "opt_state": optax state, "step": int32 [],
   "rng": uint32 [2] (raw key data)}
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lmtrain import parallel
from lmtrain.model import Transformer
from lmtrain.model import loss as loss_lib


@dataclasses.dataclass(frozen=True)
class ModelFns:
  """The model as pure functions of a params dict."""
  graphdef: Any
  logical_axes: Any  # params tree of logical axis-name tuples
  loss_chunk: int = 0  # train.loss_chunk: tokens per chunk of the loss (0 = auto)

  def apply(self, params, tokens_BT, segment_ids_BT=None, positions_BT=None, *,
            dropout_rng=None):
    """Logits [B, T, V] float32 (all of them: the losses below never form them)."""
    model = nnx.merge(self.graphdef, nnx.State(params))
    return model(tokens_BT, segment_ids_BT, positions_BT, dropout_rng=dropout_rng)

  def token_losses(self, params, tokens_BT, targets_BT, segment_ids_BT=None, positions_BT=None,
                   *, dropout_rng=None, with_correct: bool = False):
    """Per-token cross-entropy [B, T] float32 (and, with_correct, argmax == target), with the
    vocabulary projection run over chunks of tokens (lmtrain.model.loss)."""
    model = nnx.merge(self.graphdef, nnx.State(params))
    hidden = model.hidden(tokens_BT, segment_ids_BT, positions_BT, dropout_rng=dropout_rng)
    b, t = tokens_BT.shape
    chunk = loss_lib.chunk_tokens(self.loss_chunk, loss_lib.data_parallel_rows(b), t,
                                  model.dims.vocab_size)
    return loss_lib.token_losses(hidden, targets_BT, model.logits, chunk=chunk,
                                 with_correct=with_correct)


def build_model(model_cfg, *, scan_layers: bool = False, remat: str = "none",
                mlp_chunk: int = 0, loss_chunk: int = 0) -> tuple[ModelFns, Callable]:
  """ModelFns and `init(rng_key) -> params` (run it under jit: nothing is allocated here).
  scan_layers, remat, mlp_chunk and loss_chunk are the train.* fields of the same names."""
  make = lambda key: Transformer(model_cfg, rngs=nnx.Rngs(key), scan_layers=scan_layers,
                                 remat=remat, mlp_chunk=mlp_chunk)

  def init(key):
    return nnx.to_pure_dict(nnx.state(make(key)))

  abstract = nnx.eval_shape(lambda: make(0))
  graphdef, state = nnx.split(abstract)
  specs = nnx.to_pure_dict(nnx.get_partition_spec(state))
  logical_axes = jax.tree.map(lambda s: tuple(s), specs,
                              is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  return ModelFns(graphdef, logical_axes, loss_chunk), init


def model_options(train_cfg) -> dict:
  """The build_model keywords of a config's `train` section."""
  return {"scan_layers": train_cfg.scan_layers, "remat": train_cfg.remat,
          "mlp_chunk": train_cfg.mlp_chunk, "loss_chunk": train_cfg.loss_chunk}


def make_optimizer(train_cfg) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with linear warmup and cosine decay; global-norm clipping; no decay on vectors."""
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train_cfg.lr, warmup_steps=train_cfg.warmup_steps,
      decay_steps=max(train_cfg.steps, train_cfg.warmup_steps + 1), end_value=train_cfg.lr * train_cfg.end_lr_ratio)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  # Clipping stays in the chain when off (an infinite threshold) so that the optimizer state has
  # the same structure whatever the config says, and a checkpoint restores across such changes.
  clip = train_cfg.grad_clip if train_cfg.grad_clip > 0 else float("inf")
  return optax.chain(
      optax.clip_by_global_norm(clip),
      optax.adamw(schedule, b1=train_cfg.b1, b2=train_cfg.b2, eps=1e-8,
                  weight_decay=train_cfg.weight_decay, mask=decay_mask)), schedule


def loss_sums(model: ModelFns, params, batch, dropout_rng=None):
  """(sum of token losses, number of tokens) over the scored tokens (loss_mask) of a batch."""
  nll, = model.token_losses(params, batch["tokens"], batch["targets"], batch["segment_ids"],
                            batch["positions"], dropout_rng=dropout_rng)
  mask = batch["loss_mask"].astype(jnp.float32)
  return jnp.sum(nll * mask), jnp.sum(mask)


@dataclasses.dataclass(frozen=True)
class Trainer:
  """Builds the state and the step functions for one config on one mesh."""
  model: ModelFns
  init_params: Callable
  optimizer: optax.GradientTransformation
  schedule: optax.Schedule
  grad_accum: int
  dropout: bool

  @classmethod
  def from_config(cls, cfg) -> "Trainer":
    model, init_params = build_model(cfg.model, **model_options(cfg.train))
    optimizer, schedule = make_optimizer(cfg.train)
    return cls(model, init_params, optimizer, schedule, cfg.train.grad_accum,
               cfg.model.dropout_rate > 0)

  def init_state(self, seed: int):
    key = jax.random.key(seed)
    init_key, train_key = jax.random.split(key)
    params = self.init_params(init_key)
    return {"params": params, "opt_state": self.optimizer.init(params),
            "step": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(train_key)}

  def abstract_state(self, seed: int = 0):
    return jax.eval_shape(self.init_state, seed)

  def state_shardings(self, mesh):
    """Params by the logical rules; optimizer moments like their params; scalars replicated."""
    abstract = self.abstract_state()
    p_shard = parallel.param_shardings(abstract["params"], self.model.logical_axes, mesh)
    rep = parallel.replicated(mesh)
    opt_shard = _shard_like_params(abstract["opt_state"], jax.tree.structure(abstract["params"]),
                                   p_shard, rep)
    return {"params": p_shard, "opt_state": opt_shard, "step": rep, "rng": rep}

  # -- steps ----------------------------------------------------------------------------------

  def train_step(self, state, batch):
    """One optimizer step over `grad_accum` microbatches; returns (state, metrics)."""
    params = state["params"]
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    num_tokens = jnp.sum(batch["loss_mask"]).astype(jnp.float32)
    micro = jax.tree.map(
        lambda x: x.reshape(self.grad_accum, x.shape[0] // self.grad_accum, *x.shape[1:]), batch)

    def grad(i, mb):
      rng = jax.random.fold_in(step_key, i) if self.dropout else None
      # Each microbatch's loss is divided by the whole batch's token count, so the summed
      # gradients equal the gradient of the token-weighted mean over the batch.
      (loss_sum, _), grads = jax.value_and_grad(
          lambda p: _scaled(loss_sums(self.model, p, mb, rng), num_tokens), has_aux=True)(params)
      return loss_sum, grads

    if self.grad_accum == 1:  # no accumulator: one params-sized buffer fewer
      loss, grads = grad(0, jax.tree.map(lambda x: x[0], micro))
    else:
      def micro_grad(carry, inputs):
        loss_sum, grads = grad(*inputs)
        acc_loss, acc_grads = carry
        return (acc_loss + loss_sum, jax.tree.map(jnp.add, acc_grads, grads)), None

      zeros = jax.tree.map(jnp.zeros_like, params)
      (loss, grads), _ = jax.lax.scan(micro_grad, (jnp.zeros((), jnp.float32), zeros),
                                      (jnp.arange(self.grad_accum), micro))
    updates, opt_state = self.optimizer.update(grads, state["opt_state"], params)
    new_state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state,
                 "step": state["step"] + 1, "rng": state["rng"]}
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
               "lr": self.schedule(state["step"]), "tokens": num_tokens}
    return new_state, metrics

  def eval_step(self, params, batch):
    """(sum of token losses, token count) of one batch, for token-weighted averages."""
    return loss_sums(self.model, params, batch)


def _scaled(sums, num_tokens):
  loss_sum, count = sums
  return loss_sum / jnp.maximum(num_tokens, 1.0), count


def _shard_like_params(node, params_def, param_shardings, replicated):
  """Optimizer state: subtrees shaped like the params (Adam's moments) get the params'
  shardings; everything else (counts, scalars) is replicated."""
  if jax.tree.structure(node) == params_def:
    return param_shardings
  if isinstance(node, tuple) and hasattr(node, "_fields"):  # optax states are namedtuples
    return type(node)(*(_shard_like_params(n, params_def, param_shardings, replicated)
                        for n in node))
  if isinstance(node, (tuple, list)):
    return type(node)(_shard_like_params(n, params_def, param_shardings, replicated)
                      for n in node)
  return jax.tree.map(lambda _: replicated, node)
