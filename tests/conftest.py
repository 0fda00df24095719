"""Shared test helpers: a small config, running the CLI in a subprocess, reading TensorBoard."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small enough that a subprocess run of 40 steps takes seconds on 2 CPU cores.
SMALL_OVERRIDES = {
    "model.num_layers": 2, "model.d_model": 64, "model.num_heads": 2, "model.num_kv_heads": 1,
    "model.mlp_dim": 128, "data.seq_len": 64, "data.batch_size": 8, "data.eval_batches": 2,
    "data.shuffle_window": 1024, "train.steps": 40, "train.warmup_steps": 5, "train.log_every": 1,
    "train.eval_every": 20, "train.checkpoint_every": 10,
}


def small_config(arg=None, *, resolve=True, **overrides):
  """configs/tiny.py shrunk for tests; overrides use dotted keys, e.g. {"train.steps": 5}.
  Returns the resolved config (lmtrain.config.finalize), as the entry points use it; with
  resolve=False the raw one (to test validation)."""
  sys.path.insert(0, REPO)
  from configs import tiny
  from lmtrain import config as config_lib
  cfg = tiny.get_config(arg)
  for key, value in {**SMALL_OVERRIDES, **overrides}.items():
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config_lib.finalize(cfg) if resolve else cfg


def cli_args(config="configs/tiny.py", **overrides):
  args = ["--config", config]
  for key, value in {**SMALL_OVERRIDES, **overrides}.items():
    args.append(f"--config.{key}={value}")
  return args


def run_module(module: str, args, *, timeout=300, env=None, **popen_kw):
  """Runs python -m module args in the repo; returns CompletedProcess (text)."""
  full_env = {**os.environ, **(env or {})}
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=full_env,
                        capture_output=True, text=True, timeout=timeout, **popen_kw)


def popen_module(module: str, args, env=None):
  full_env = {**os.environ, **(env or {})}
  return subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=full_env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def read_scalars(logdir: str) -> dict[str, dict[int, float]]:
  """tag -> {step: value} from every event file under logdir (the last write of a step wins)."""
  from tensorboard.backend.event_processing import event_accumulator
  out: dict[str, dict[int, float]] = {}
  files = sorted((os.path.join(d, f) for d, _, fs in os.walk(logdir) for f in fs
                  if "tfevents" in f), key=os.path.getmtime)
  for path in files:
    acc = event_accumulator.EventAccumulator(path, size_guidance={"scalars": 0})
    acc.Reload()
    for tag in acc.Tags()["scalars"]:
      for ev in acc.Scalars(tag):
        out.setdefault(tag, {})[ev.step] = ev.value
  return out


@pytest.fixture
def repo():
  return REPO


def pytest_collection_modifyitems(config, items):
  """Tests marked gpu / tpu run only where jax has that backend (DESIGN.md: skipped on CPU)."""
  import jax
  backend = jax.default_backend()
  for item in items:
    for mark in ("gpu", "tpu"):
      if mark in item.keywords and backend != mark:
        item.add_marker(pytest.mark.skip(reason=f"needs a {mark.upper()} (backend is {backend})"))
