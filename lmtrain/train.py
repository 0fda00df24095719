"""Train a language model: python -m lmtrain.train --config configs/tiny.py[:variant] --workdir DIR

Resumes from the latest checkpoint in DIR if there is one. SIGTERM (or Ctrl-C) saves a checkpoint
at the current step and exits; a NaN/inf loss stops the run and leaves the last good checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np

from lmtrain import cli, distributed, parallel, provenance
from lmtrain.checkpoint import (Checkpointer, CheckpointShapeError, CheckpointWriteError,
                                DataStateMismatch)
from lmtrain.data import DataError, heldout_batches, set_iterator_state, train_dataset
from lmtrain.data.pipeline import BATCH_KEYS
from lmtrain.evals.runner import EvalSuite, eval_names
from lmtrain.flops import peak_flops, train_flops_per_step
from lmtrain.memory import memory_line
from lmtrain.metrics import MetricWriter, Progress, Stopwatch
from lmtrain.profiling import StepProfiler
from lmtrain.trainer import Trainer
from lmtrain.workdir import WorkdirError, WorkdirLock, check_writable

_CONFIG, _WORKDIR, _STEP = cli.CONFIG, cli.WORKDIR, cli.STEP


class NonFiniteLoss(RuntimeError):
  pass


class CheckpointMismatch(RuntimeError):
  pass


class NothingToDo(RuntimeError):
  pass


class _StopSignal:
  """SIGTERM / SIGINT ask the loop to save and exit at the next step boundary; a second SIGINT
  interrupts at once. A context manager: the previous handlers come back on exit."""

  def __init__(self):
    self.requested = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, frame):
    del frame
    if self.requested is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.requested = signal.Signals(signum).name


def _log(message: str) -> None:
  if jax.process_index() == 0:
    print(f"lmtrain: {message}", flush=True)


def _host_slice(batch):
  n = jax.process_count()
  if n == 1:
    return batch
  i = jax.process_index()
  return jax.tree.map(lambda x: x[i * x.shape[0] // n:(i + 1) * x.shape[0] // n], batch)


def _to_global(batch, sharding, columns=None):
  """Host batch -> global arrays; `columns` reorders the sequence (ring attention's zigzag)."""
  if columns is not None:
    batch = jax.tree.map(lambda x: x[:, columns], batch)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def train(cfg, workdir: str, *, allow_config_mismatch: bool = False) -> dict:
  """Runs (or resumes) training to cfg.train.steps; returns the final metrics. Resuming from a
  checkpoint whose model differs from cfg's is refused (CheckpointMismatch) unless allowed.
  One trainer per workdir (WorkdirLock; WorkdirError names the holder), and the workdir and its
  checkpoint directory are checked writable before anything compiles."""
  check_writable(workdir, "the workdir")
  check_writable(os.path.join(workdir, "checkpoints"), "the checkpoint directory")
  if jax.process_index() != 0:  # process 0 holds the lock for the job
    return _train(cfg, workdir, allow_config_mismatch)
  with WorkdirLock(workdir, log=_log):
    return _train(cfg, workdir, allow_config_mismatch)


def _train(cfg, workdir: str, allow_config_mismatch: bool) -> dict:
  record = {"config": cfg.to_dict(), "run": provenance.run_metadata(cfg.data)}
  mesh = parallel.make_mesh(cfg.mesh)
  trainer = Trainer.from_config(cfg)
  shardings = trainer.state_shardings(mesh)
  batch_sharding = parallel.batch_sharding(mesh)
  columns = parallel.sequence_layout(mesh, cfg.data.seq_len)
  abstract_state = trainer.abstract_state()
  ckpt = Checkpointer(workdir, keep=cfg.train.keep_checkpoints,
                      async_save=cfg.train.async_checkpoints)
  data_iter = iter(train_dataset(cfg, process_index=jax.process_index(),
                                 process_count=jax.process_count()))
  # Every host evaluates the same held-out rows; read before compiling (a split too small for
  # one batch fails here, DataError).
  heldout_host = heldout_batches(cfg)

  latest = ckpt.latest_step()
  state = None
  if latest is not None:
    try:
      saved = ckpt.saved_config(latest)
    except Exception:  # an unreadable step: restore_intact reports it and moves it aside
      saved = None
    if saved is not None:
      diffs = provenance.differences(saved["config"], record["config"])
      if diffs and not allow_config_mismatch:
        raise CheckpointMismatch(
            f"the checkpoint at step {latest} in {ckpt.directory} was written with another model: "
            f"{provenance.describe(diffs, 'checkpoint', 'this config')} (pass "
            "--allow_config_mismatch to resume anyway)")
    try:
      restored, state, data_state = ckpt.restore_intact(abstract_state, shardings, log=_log)
    except CheckpointShapeError as e:
      raise CheckpointMismatch(
          f"the checkpoint at step {latest} in {ckpt.directory} does not fit this config "
          f"(did the model or optimizer change?): {str(e).splitlines()[0]}") from e
    if restored is None:
      _log(f"no intact checkpoint is left in {ckpt.directory}: starting at step 0")
    elif isinstance(data_state, DataStateMismatch):
      raise CheckpointMismatch(f"cannot resume training from step {restored}: "
                               f"{data_state.message()}")
    else:
      set_iterator_state(data_iter, data_state)
      ckpt.last_verified = restored
      _log(f"resumed from checkpoint step {restored} in {workdir}")
  if state is None:
    with jax.set_mesh(mesh):
      state = jax.jit(trainer.init_state, static_argnums=0,
                      out_shardings=shardings)(cfg.train.seed)
    _log(f"starting at step 0 in {workdir}")
  start = int(jax.device_get(state["step"]))
  if start >= cfg.train.steps:
    ckpt.close()
    raise NothingToDo(f"the checkpoint in {ckpt.directory} is at step {start}, and train.steps="
                      f"{cfg.train.steps}: nothing to train (raise train.steps to continue)")

  batch_spec = {k: jax.ShapeDtypeStruct((cfg.data.batch_size, cfg.data.seq_len), jnp.int32,
                                        sharding=batch_sharding)
                for k in BATCH_KEYS}
  rep = parallel.replicated(mesh)
  step_fn = jax.jit(trainer.train_step, in_shardings=(shardings, batch_sharding),
                    out_shardings=(shardings, rep), donate_argnums=0)
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):  # the model reads the mesh (ring attention over "sequence")
    compiled = step_fn.lower(abstract_with(abstract_state, shardings), batch_spec).compile()
  _log(f"compiled the train step in {time.perf_counter() - t0:.1f}s; "
       f"{memory_line(compiled, abstract_state, shardings)}")
  with jax.set_mesh(mesh):
    eval_fn = jax.jit(trainer.eval_step, in_shardings=(shardings["params"], batch_sharding),
                      out_shardings=rep).lower(
                          abstract_with(abstract_state, shardings)["params"], batch_spec).compile()
  # Each host contributes its slice of the global batch.
  heldout = [_to_global(_host_slice(b), batch_sharding, columns) for b in heldout_host]

  eval_suite = None
  if cfg.eval.evals:  # the eval jobs, periodically (on every process: they run the model)
    num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_state["params"]))
    eval_suite = EvalSuite(cfg, trainer.model, num_params=num_params)
  all_finite = jax.jit(lambda tree: jnp.all(jnp.asarray(
      [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)])))
  writer = MetricWriter(workdir)
  writer.text(start, "config", "```\n" + json.dumps(record, indent=2) + "\n```")
  if jax.process_index() == 0:  # the resolved config and what ran it, as of this start
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(cfg.to_json_best_effort(indent=2))
    with open(os.path.join(workdir, "run.json"), "w") as f:
      json.dump(record["run"], f, indent=2)
  progress = Progress(cfg.train.steps)
  tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
  flops_per_step = train_flops_per_step(cfg.model, cfg.data.batch_size, cfg.data.seq_len)
  peak = peak_flops(jax.devices()[0].device_kind, cfg.model.dtype)
  pending: list[tuple[int, dict]] = []  # metrics still on device, fetched at log points

  def last_good() -> str:
    """The newest checkpoint whose files are verified (for the messages that stop a run)."""
    if ckpt.last_verified is None:
      return f"there is no checkpoint in {ckpt.directory} yet"
    return f"the last good checkpoint is step {ckpt.last_verified} in {ckpt.directory}"
  watch = Stopwatch()
  final = {}
  profiler = StepProfiler.from_config(cfg, workdir)  # None unless train.profile_steps is set

  def flush(step: int) -> None:
    """Fetches pending metrics, checks them, writes them; one host sync per log interval."""
    nonlocal final
    if not pending:
      return
    fetched = jax.device_get([m for _, m in pending])
    elapsed = watch.lap()
    for (s, _), m in zip(pending, fetched):
      bad = [f"{name} is {m[key]}" for key, name in (("loss", "loss"), ("grad_norm", "grad norm"))
             if not np.isfinite(m[key])]
      if bad:
        raise NonFiniteLoss(f"{' and '.join(bad)} at step {s}; stopping: {last_good()}")
      writer.scalars(s, {"train/loss": m["loss"], "train/lr": m["lr"],
                         "train/grad_norm": m["grad_norm"]})
    step_time = elapsed / len(pending)
    tps = tokens_per_step / step_time
    perf = {"perf/tokens_per_sec": tps, "perf/step_time": step_time,
            "perf/tokens_per_sec_per_device": tps / jax.device_count()}
    if peak is not None:
      perf["perf/mfu"] = flops_per_step / step_time / (peak * jax.device_count())
    writer.scalars(step, perf)
    progress.update(step, float(fetched[-1]["loss"]), tps, step_time,
                    extra=f"MFU {perf['perf/mfu']:.1%}" if "perf/mfu" in perf else "")
    final = {"step": step, "loss": float(fetched[-1]["loss"])}
    pending.clear()

  try:
    with _StopSignal() as stop:
      step = start
      while step < cfg.train.steps:
        batch = _to_global(next(data_iter), batch_sharding, columns)
        if profiler is not None:
          profiler.before(step)
        state, metrics = compiled(state, batch)
        ckpt.check_saved()  # a background save that failed stops the run here, in one line
        step += 1
        if profiler is not None:
          profiler.after(step, state)
        pending.append((step, metrics))
        last = step == cfg.train.steps
        stopping = stop.requested  # read once: a signal may arrive at any point below
        save = last or step % cfg.train.checkpoint_every == 0 or stopping is not None
        if save or step % cfg.train.log_every == 0:
          flush(step)
        if save:
          if not bool(all_finite(state["params"])):  # never checkpoint a diverged state
            raise NonFiniteLoss(f"parameters are not finite after step {step}; stopping: "
                                f"{last_good()}")
          ckpt.save(step, state, data_iter.get_state(), record)
        if last or step % cfg.train.eval_every == 0:  # after the save: an eval loses nothing
          sums = [eval_fn(state["params"], b) for b in heldout]
          loss_sum, count = jax.device_get(jnp.sum(jnp.asarray(sums), axis=0))
          final["eval_loss"] = float(loss_sum / count)
          writer.scalars(step, {"eval/loss": final["eval_loss"]})
          progress.message(f"step {step}: eval/loss {final['eval_loss']:.4f} nats/token "
                           f"({count:.0f} held-out tokens)")
          if eval_suite is not None:
            try:
              eval_suite.run(state["params"], eval_names(cfg.eval.evals), step=step,
                             writer=writer, out_dir=os.path.join(workdir, "evals"))
            except Exception as e:  # an eval that fails must not end the training
              progress.message(f"lmtrain: warning: the evals at step {step} failed and training "
                               f"goes on: {type(e).__name__}: {cli.one_line(e)}")
          watch.lap()  # eval time is not train step time
        if stopping is not None:
          progress.message(f"lmtrain: {stopping}: saved a checkpoint at step {step}; exiting")
          break
  finally:
    if profiler is not None:
      profiler.close()
    writer.close()
    ckpt.close()
  return final


def abstract_with(abstract_state, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract_state, shardings)


def main(argv):
  try:  # before anything touches a JAX backend (config validation may ask for kernels)
    distributed.initialize()
  except ValueError as e:
    cli.fail(str(e))
  cfg, workdir = cli.start(argv, _CONFIG, _WORKDIR)
  if _STEP.value is not None:
    cli.fail("--step is for evaluate and generate; training resumes from the latest checkpoint")
  try:
    parallel.check_config_fits_mesh(cfg, parallel.mesh_shape(cfg.mesh, jax.device_count()))
  except parallel.MeshError as e:
    cli.fail(str(e))
  try:
    final = train(cfg, workdir, allow_config_mismatch=cli.allow_config_mismatch())
  except (NonFiniteLoss, CheckpointWriteError) as e:  # the run failed: exit 1
    cli.fail(str(e), code=1)
  except (CheckpointMismatch, WorkdirError, DataError) as e:  # the user asked for the impossible
    cli.fail(str(e))
  except NothingToDo as e:
    _log(str(e))
    return
  _log("done: " + json.dumps(final))


if __name__ == "__main__":
  cli.run(main)
