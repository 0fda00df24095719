"""End-to-end training on CPU: learning, checkpoints, exact resume, signals, NaN, TensorBoard."""
import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmtrain.checkpoint import Checkpointer
from lmtrain.data import train_dataset
from lmtrain.train import train
from lmtrain.trainer import Trainer
from tests.conftest import cli_args, popen_module, read_scalars, run_module, small_config

TB_TAGS = {"train/loss", "train/lr", "train/grad_norm", "eval/loss", "perf/tokens_per_sec",
           "perf/step_time"}


def test_loss_falls_and_tensorboard_has_every_tag(tmp_path):
  cfg = small_config(**{"train.steps": 60, "train.eval_every": 30})
  final = train(cfg, str(tmp_path))
  scalars = read_scalars(str(tmp_path))
  assert TB_TAGS <= set(scalars), set(scalars)
  losses = scalars["train/loss"]
  assert sorted(losses) == list(range(1, 61))
  assert losses[1] > 5.0  # ~ln(258) at initialisation
  assert np.mean([losses[s] for s in range(51, 61)]) < losses[1] - 1.5
  assert scalars["eval/loss"][60] < scalars["eval/loss"][30] < 5.0
  assert final["eval_loss"] == pytest.approx(scalars["eval/loss"][60], rel=1e-6)
  lr = scalars["train/lr"]
  assert lr[1] == 0.0 and lr[6] == pytest.approx(cfg.train.lr, rel=1e-5)  # warmup of 5 steps
  assert lr[60] < lr[30] < lr[6]  # cosine decay
  # The config is in TensorBoard as text.
  from tensorboard.backend.event_processing import event_accumulator
  files = [os.path.join(tmp_path, f) for f in os.listdir(tmp_path) if "tfevents" in f]
  acc = event_accumulator.EventAccumulator(files[0], size_guidance={"tensors": 0})
  acc.Reload()
  assert any("config" in t for t in acc.Tags()["tensors"])
  assert sorted(Checkpointer(str(tmp_path), keep=3).all_steps()) == [40, 50, 60]


def test_checkpoint_round_trip_is_exact(tmp_path):
  cfg = small_config()
  trainer = Trainer.from_config(cfg)
  state = jax.jit(trainer.init_state, static_argnums=0)(3)
  state["step"] = jnp.asarray(7, jnp.int32)
  it = iter(train_dataset(cfg))
  next(it)
  ckpt = Checkpointer(str(tmp_path), keep=2)
  ckpt.save(7, state, it.get_state())
  ckpt.wait()
  restored, data_state = Checkpointer(str(tmp_path), keep=2).restore(7, trainer.abstract_state())
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert jax.tree.structure(state) == jax.tree.structure(restored)
  assert data_state == json.loads(json.dumps(it.get_state()))


def test_grad_accumulation_matches_one_big_batch():
  cfg = small_config()
  batch = jax.tree.map(jnp.asarray, next(iter(train_dataset(cfg))))
  results = []
  for accum in (1, 4):
    cfg.train.grad_accum = accum
    trainer = Trainer.from_config(cfg)
    state = jax.jit(trainer.init_state, static_argnums=0)(0)
    new_state, metrics = jax.jit(trainer.train_step)(state, batch)
    results.append((new_state, metrics))
  (s1, m1), (s4, m4) = results
  assert float(m1["loss"]) == pytest.approx(float(m4["loss"]), rel=1e-5)
  assert float(m1["grad_norm"]) == pytest.approx(float(m4["grad_norm"]), rel=1e-4)
  for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s4["params"])):
    np.testing.assert_allclose(a, b, atol=1e-6)


def _wait_for_checkpoint(workdir, step, proc, timeout=240):
  path = os.path.join(workdir, "checkpoints", str(step))
  deadline = time.time() + timeout
  while not os.path.isdir(path):
    assert proc.poll() is None, proc.stdout.read()
    assert time.time() < deadline, "no checkpoint appeared"
    time.sleep(0.05)


def _final_params(workdir, cfg):
  trainer = Trainer.from_config(cfg)
  ckpt = Checkpointer(workdir, keep=3)
  state, _ = ckpt.restore(ckpt.latest_step(), trainer.abstract_state())
  return jax.tree.leaves(state["params"])


@pytest.mark.slow
def test_kill_9_then_restart_matches_straight_run_bitwise(tmp_path):
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  args = cli_args(**{"train.async_checkpoints": True})
  proc = run_module("lmtrain.train", args + ["--workdir", straight])
  assert proc.returncode == 0, proc.stderr
  # Second run: kill -9 once step 20 is checkpointed, then start again with the same command.
  p = popen_module("lmtrain.train", args + ["--workdir", resumed])
  _wait_for_checkpoint(resumed, 20, p)
  p.send_signal(signal.SIGKILL)
  p.wait()
  proc = run_module("lmtrain.train", args + ["--workdir", resumed])
  assert proc.returncode == 0, proc.stderr
  assert "resumed from checkpoint step" in proc.stdout
  a, b = read_scalars(straight)["train/loss"], read_scalars(resumed)["train/loss"]
  assert [a[s] for s in range(21, 41)] == [b[s] for s in range(21, 41)]  # bitwise floats
  cfg = small_config()
  for x, y in zip(_final_params(straight, cfg), _final_params(resumed, cfg)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_sigterm_saves_current_step_and_next_start_resumes(tmp_path):
  workdir = str(tmp_path)
  args = cli_args(**{"train.steps": 100000, "train.checkpoint_every": 100000,
                     "train.eval_every": 100000}) + ["--workdir", workdir]
  p = popen_module("lmtrain.train", args)
  deadline = time.time() + 240
  while True:  # wait until training is under way (a progress line was printed)
    line = p.stdout.readline()
    assert line or p.poll() is None, "trainer exited early"
    if line.startswith("step "):
      break
    assert time.time() < deadline
  p.send_signal(signal.SIGTERM)
  out, _ = p.communicate(timeout=120)
  assert p.returncode == 0, out
  steps = Checkpointer(workdir, keep=3).all_steps()
  assert len(steps) == 1 and steps[0] >= 1
  assert f"saved a checkpoint at step {steps[0]}" in out
  proc = run_module("lmtrain.train", args[:-2] + [f"--config.train.steps={steps[0] + 2}",
                                                  "--config.train.warmup_steps=0",
                                                  "--workdir", workdir])
  assert proc.returncode == 0, proc.stderr
  assert f"resumed from checkpoint step {steps[0]}" in proc.stdout


@pytest.mark.slow
def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path):
  workdir = str(tmp_path)
  # Train to step 10 normally, then continue with an absurd learning rate until it blows up.
  proc = run_module("lmtrain.train", cli_args(**{"train.steps": 10}) + ["--workdir", workdir])
  assert proc.returncode == 0, proc.stderr
  args = cli_args(**{"train.steps": 40, "train.lr": 1e38, "train.grad_clip": 0.0,
                     "train.warmup_steps": 0}) + ["--workdir", workdir]
  proc = run_module("lmtrain.train", args)
  assert proc.returncode == 1, proc.stdout + proc.stderr
  err = proc.stderr.strip().splitlines()[-1]
  assert any(f"{what} is {v}" in err for what in ("loss", "grad norm") for v in ("nan", "inf"))
  assert "last good checkpoint is step 10" in err
  trainer = Trainer.from_config(small_config())
  ckpt = Checkpointer(workdir, keep=3)
  assert ckpt.all_steps() == [10]
  state, _ = ckpt.restore(10, trainer.abstract_state())
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))


def test_resuming_with_another_model_shape_fails_in_one_line(tmp_path):
  workdir = str(tmp_path)
  proc = run_module("lmtrain.train", cli_args(**{"train.steps": 10}) + ["--workdir", workdir])
  assert proc.returncode == 0, proc.stderr
  proc = run_module("lmtrain.train", cli_args(**{"model.d_model": 32}) + ["--workdir", workdir])
  assert proc.returncode == 2
  line = proc.stderr.strip().splitlines()[-1]
  assert "checkpoint at step 10" in line and "model.d_model: 64 (checkpoint) vs 32" in line
  assert Checkpointer(workdir, keep=3).all_steps() == [10]  # nothing was overwritten
