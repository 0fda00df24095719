"""Where the train step's memory goes, before launching:

  python -m lmtrain.memory --config configs/gpt125m.py [--config.* overrides]
      [--lengths 4096,16384,32768,65536] [--batch_size 1] [--time_steps 3]

Compiles the train step ahead of time at each sequence length (no training, no data: the state
and the batch are abstract) for this backend's devices on the config's mesh, and prints per
device: parameters, optimizer state, XLA's temporaries and activation bytes per token, each
beside its analytic floor, so a researcher sees whether a length fits a device before launching.

The floor is what a step must hold besides parameters and optimizer state: the fp32 gradients
(parameter-sized), the residual stream kept at every block boundary (L x T x d_model in the
compute dtype: what train.remat=full keeps), one layer's working set while it is recomputed
(normed inputs, q/k/v, attention output and softmax statistics, and the MLP's hidden for one
train.mlp_chunk of tokens) and one chunk of logits with its gradient. "Per token" divides what
is left of the temporaries after the gradients by the tokens of the step.
"""
from __future__ import annotations

import math
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags

from lmtrain import cli, parallel

_FLAGS = {}


def _define_flags() -> None:
  """The command's flags, defined only when it runs (the trainer imports this module for its
  start-up line and defines its own --config)."""
  _FLAGS["config"] = cli.CONFIG  # shared by every entry point
  _FLAGS["lengths"] = flags.DEFINE_string(
      "lengths", "", "Comma list of sequence lengths (default: data.seq_len x 1, 4, 8, 16).")
  _FLAGS["batch_size"] = flags.DEFINE_integer(
      "batch_size", 0, "Rows per step (default: data.batch_size).")
  _FLAGS["time_steps"] = flags.DEFINE_integer(
      "time_steps", 0, "Also run the compiled step this many times (after one warm-up) on a "
      "real state and a constant batch, and print the median seconds per step.")


def fmt_bytes(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if abs(n) < 1024 or unit == "TiB":
      return f"{n:.1f} {unit}"
    n /= 1024


def per_device_bytes(tree, shardings) -> int:
  total = 0
  for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    total += math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
  return total


def memory_line(compiled, abstract_state, shardings) -> str:
  """The trainer's start-up report: per-device params, optimizer state and XLA's buffers."""
  params = per_device_bytes(abstract_state["params"], shardings["params"])
  opt = per_device_bytes(abstract_state["opt_state"], shardings["opt_state"])
  line = f"per-device memory: params {fmt_bytes(params)}, optimizer state {fmt_bytes(opt)}"
  analysis = compiled.memory_analysis()
  if analysis is not None:
    line += (f", temporaries {fmt_bytes(analysis.temp_size_in_bytes)}, "
             f"arguments {fmt_bytes(analysis.argument_size_in_bytes)}, "
             f"outputs {fmt_bytes(analysis.output_size_in_bytes)} (XLA)")
  return line


def compile_train_step(trainer, cfg, mesh):
  """The train step of `trainer` for cfg's batch, lowered and compiled ahead of time for
  `mesh` (abstract state and batch: nothing is allocated). Returns (compiled, abstract state
  with shardings, shardings)."""
  from lmtrain.data.pipeline import BATCH_KEYS
  shardings = trainer.state_shardings(mesh)
  batch_sharding = parallel.batch_sharding(mesh)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          trainer.abstract_state(), shardings)
  batch = {k: jax.ShapeDtypeStruct((cfg.data.batch_size, cfg.data.seq_len), jnp.int32,
                                   sharding=batch_sharding) for k in BATCH_KEYS}
  step = jax.jit(trainer.train_step, in_shardings=(shardings, batch_sharding),
                 out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=0)
  with jax.set_mesh(mesh):  # the model reads the mesh (ring attention, the loss's chunks)
    compiled = step.lower(abstract, batch).compile()
  return compiled, abstract, shardings


def time_step(trainer, cfg, compiled, shardings, steps: int) -> float:
  """Median seconds of `steps` runs of the compiled step (after one warm-up) from a freshly
  initialised state on a constant batch: one document per row, every token scored."""
  from lmtrain.data.pipeline import BATCH_KEYS
  state = jax.jit(trainer.init_state, static_argnums=0, out_shardings=shardings)(cfg.train.seed)
  shape = (cfg.data.batch_size, cfg.data.seq_len)
  ones = {"segment_ids", "loss_mask"}
  batch = {k: jnp.ones(shape, jnp.int32) if k in ones else
           (jnp.broadcast_to(jnp.arange(shape[1], dtype=jnp.int32), shape) if k == "positions"
            else jnp.zeros(shape, jnp.int32)) for k in BATCH_KEYS}
  times = []
  for _ in range(steps + 1):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  return float(np.median(times[1:]))


def floor(cfg, mesh_shape: dict, params_bytes: int) -> dict:
  """The analytic floor of the temporaries per device (see the module docstring), in bytes."""
  from lmtrain.model import loss as loss_lib
  from lmtrain.model.dims import DTYPES, ModelDims
  m = ModelDims.from_config(cfg.model)
  rows = max(cfg.data.batch_size // (mesh_shape["data"] * mesh_shape["fsdp"]), 1)
  tokens = rows * cfg.data.seq_len // mesh_shape["sequence"]
  b = np.dtype(DTYPES[cfg.model.dtype]).itemsize
  qkvo = (2 * m.num_heads + 2 * m.num_kv_heads) * m.head_dim // mesh_shape["tensor"]
  # the MLP's hidden for the tokens it holds at once (a chunk of them under train.mlp_chunk)
  mlp_chunk = cfg.train.mlp_chunk or cfg.data.seq_len
  mlp_tokens = tokens * min(mlp_chunk, cfg.data.seq_len) // cfg.data.seq_len
  layer = (tokens * (b * (2 * m.d_model + qkvo) + 4 * m.num_heads)
           + mlp_tokens * b * 3 * m.mlp_dim // mesh_shape["tensor"])
  chunk = loss_lib.chunk_tokens(cfg.train.loss_chunk, rows, cfg.data.seq_len, m.vocab_size)
  logits = 2 * 4 * rows * chunk * m.vocab_size // mesh_shape["tensor"]
  return {"gradients": params_bytes, "residual": m.num_layers * tokens * m.d_model * b,
          "layer": layer, "logits": logits, "tokens": tokens, "chunk": chunk}


def measure(raw_cfg, length: int, batch_size: int = 0, time_steps: int = 0) -> dict:
  """Compiles the train step of `raw_cfg` (unresolved: sizes derived from the length are
  resolved for each) at sequence `length` and returns the per-device numbers in bytes (and
  with time_steps, the median seconds per step)."""
  from lmtrain import config as config_lib
  from lmtrain.trainer import Trainer
  c = ml_collections.ConfigDict(raw_cfg.to_dict())
  c.data.seq_len = length
  if batch_size:
    c.data.batch_size = batch_size
  cfg = config_lib.finalize(c)
  mesh = parallel.make_mesh(cfg.mesh)
  parallel.check_config_fits_mesh(cfg, tuple(mesh.shape.values()))
  trainer = Trainer.from_config(cfg)
  t0 = time.perf_counter()
  compiled, abstract, shardings = compile_train_step(trainer, cfg, mesh)
  seconds = time.perf_counter() - t0
  analysis = compiled.memory_analysis()
  params = per_device_bytes(abstract["params"], shardings["params"])
  fl = floor(cfg, dict(mesh.shape), params)
  temps = analysis.temp_size_in_bytes if analysis is not None else float("nan")
  floor_total = fl["gradients"] + fl["residual"] + fl["layer"] + fl["logits"]
  return {"length": length, "tokens": fl["tokens"], "params": params,
          "optimizer": per_device_bytes(abstract["opt_state"], shardings["opt_state"]),
          "temporaries": temps, "floor": floor_total,
          "per_token": (temps - fl["gradients"]) / fl["tokens"],
          "floor_per_token": (floor_total - fl["gradients"]) / fl["tokens"],
          "loss_chunk": fl["chunk"], "compile_seconds": seconds,
          "hlo_bytes": len(compiled.as_text() or ""),
          "step_seconds": (time_step(trainer, cfg, compiled, shardings, time_steps)
                           if time_steps else None)}


HEADER = (f"{'length':>8}{'tokens':>9}{'params':>12}{'optimizer':>12}{'temporaries':>14}"
          f"{'floor':>12}{'per token':>12}{'floor/token':>13}{'loss chunk':>12}{'compile':>9}")


def row_line(r: dict) -> str:
  return (f"{r['length']:>8}{r['tokens']:>9}{fmt_bytes(r['params']):>12}"
          f"{fmt_bytes(r['optimizer']):>12}{fmt_bytes(r['temporaries']):>14}"
          f"{fmt_bytes(r['floor']):>12}{fmt_bytes(r['per_token']):>12}"
          f"{fmt_bytes(r['floor_per_token']):>13}{r['loss_chunk']:>12}"
          f"{r['compile_seconds']:>8.1f}s"
          + ("" if r.get("step_seconds") is None else f"{r['step_seconds']:>8.2f}s"))


def settings_line(cfg) -> str:
  t, m = cfg.train, cfg.model
  return (f"{m.num_layers} layers x d_model {m.d_model}, vocab {m.vocab_size}, {m.dtype}; "
          f"train.remat={t.remat}, train.scan_layers={t.scan_layers}, "
          f"train.mlp_chunk={t.mlp_chunk}, train.loss_chunk={t.loss_chunk}; "
          f"backend {jax.default_backend()}, {jax.device_count()} device(s), "
          f"mesh {dict(parallel.make_mesh(cfg.mesh).shape)}")


def main(argv):
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  cfg = cli.load_config(_FLAGS["config"])  # validated: exit 2 with one line, before compiling
  raw = _FLAGS["config"].value
  lengths_flag, batch_flag = _FLAGS["lengths"].value, _FLAGS["batch_size"].value
  try:
    lengths = ([int(x) for x in lengths_flag.split(",") if x.strip()]
               or [cfg.data.seq_len * f for f in (1, 4, 8, 16)])
  except ValueError:
    cli.fail(f"--lengths={lengths_flag!r} is not a comma-separated list of integers")
  if any(n <= 0 for n in lengths):
    cli.fail(f"--lengths={lengths_flag!r} must be positive")
  if batch_flag < 0:
    cli.fail(f"--batch_size={batch_flag} must be >= 0 (0 = data.batch_size)")
  time_steps = _FLAGS["time_steps"].value
  if time_steps < 0:
    cli.fail(f"--time_steps={time_steps} must be >= 0")
  for length in lengths:  # every length's config is checked before the first compile
    c = ml_collections.ConfigDict(raw.to_dict())
    c.data.seq_len = length
    if batch_flag:
      c.data.batch_size = batch_flag
    c = cli.validated(c)
    try:
      parallel.check_config_fits_mesh(c, parallel.mesh_shape(c.mesh, jax.device_count()))
    except parallel.MeshError as e:
      cli.fail(str(e))
  batch = batch_flag or cfg.data.batch_size
  print(f"lmtrain.memory: the train step compiled per length, per device, batch {batch}; "
        + settings_line(cfg), flush=True)
  print("floor = fp32 gradients + residual stream at every block boundary + one layer's "
        "working set + one chunk of logits and its gradient; per token = (temporaries - "
        "gradients) / tokens", flush=True)
  print(HEADER + (f"{'step':>9}" if time_steps else ""), flush=True)
  for length in lengths:
    print(row_line(measure(raw, length, batch_flag, time_steps)), flush=True)


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags_or_exit)
