"""Evaluate a checkpoint: python -m lmtrain.evaluate --config ... --workdir DIR [--evals ...]

Restores the latest checkpoint of DIR (or --step), runs the evals, and writes one JSON per eval
to DIR/evals/ and the scalars and images to TensorBoard in DIR.
"""
from __future__ import annotations

import json
import math
import os

import jax
from absl import app, flags
from ml_collections import config_flags

from lmtrain import cli
from lmtrain.checkpoint import Checkpointer
from lmtrain.evals.runner import EvalSuite, eval_names
from lmtrain.metrics import MetricWriter
from lmtrain.trainer import Trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "The run's config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The run's directory (checkpoints, logs).")
_EVALS = flags.DEFINE_string("evals", "all", "Comma list of ppl, niah, extrapolation, mqar.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")


def evaluate(cfg, workdir: str, names, step: int | None = None) -> dict:
  ckpt = Checkpointer(workdir, keep=max(cfg.train.keep_checkpoints, 1))
  steps = ckpt.all_steps()
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {ckpt.directory}")
  step = max(steps) if step is None else step
  if step not in steps:
    raise FileNotFoundError(f"no checkpoint at step {step} in {ckpt.directory} "
                            f"(have {sorted(steps)})")
  trainer = Trainer.from_config(cfg)
  state, _ = ckpt.restore(step, trainer.abstract_state())
  ckpt.close()
  params = state["params"]
  num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  suite = EvalSuite(cfg, trainer.model, num_params=num_params)
  writer = MetricWriter(workdir)
  try:
    return suite.run(params, names, step=step, writer=writer,
                     out_dir=os.path.join(workdir, "evals"))
  finally:
    writer.close()


def main(argv):
  cfg, workdir = cli.start(argv, _CONFIG, _WORKDIR)
  try:
    names = eval_names(_EVALS.value)
  except ValueError as e:
    cli.fail(f"--evals: {e}")
  try:
    results = evaluate(cfg, workdir, names, _STEP.value)
  except FileNotFoundError as e:
    cli.fail(str(e))
  for name, result in results.items():
    print(f"lmtrain: {name}: {_headline(name, result)}", flush=True)


def _headline(name: str, r: dict) -> str:
  if name == "ppl":
    d = r["disjoint"]
    line = (f"disjoint {d['nats_per_token']:.4f} nats/token, ppl {d['perplexity']:.3f}, "
            f"{d['bits_per_byte']:.4f} bits/byte")
    if "sliding" in r:
      line += f"; sliding (stride {r['stride']}) ppl {r['sliding']['perplexity']:.3f}"
    return line
  if name == "niah":
    return "; ".join(f"{g['filler']}: accuracy by length "
                     f"{dict(zip(g['lengths'], [round(a, 2) for a in g['accuracy_by_length']]))}"
                     f", effective length {g['effective_length']}" for g in r["grids"])
  if name == "extrapolation":
    line = ", ".join(f"L={x['length']}: ppl {x['perplexity']:.3f}" for x in r["lengths"])
    if r["skipped"]:
      line += "; skipped " + ", ".join(f"L={s['length']} ({s['reason']})" for s in r["skipped"])
    return line
  if name == "mqar":
    return f"mean accuracy {r['mean_accuracy']}; " + json.dumps(
        {f"pairs={p}": row for p, row in zip(r["pairs"], r["accuracy"])})
  return json.dumps(r)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags_or_exit)
