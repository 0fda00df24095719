"""Evaluate a checkpoint: python -m lmtrain.evaluate --workdir DIR [--config ...] [--evals ...]

Restores the latest checkpoint of DIR (or --step), runs the evals, and writes one JSON per eval
to DIR/evals/ and the scalars and images to TensorBoard in DIR. Without --config the
checkpoint's own (resolved) config is used; with one, its model must be the checkpoint's
(a mismatch is refused in one line naming the fields, unless --allow_config_mismatch, and then
the eval JSONs record both configs).
"""
from __future__ import annotations

import json
import math
import os

import jax
from absl import flags


from lmtrain import cli, provenance
from lmtrain import config as config_lib
from lmtrain.checkpoint import Checkpointer
from lmtrain.data import DataError
from lmtrain.evals.runner import EvalSuite, eval_names
from lmtrain.metrics import MetricWriter
from lmtrain.workdir import WorkdirError, check_writable
from lmtrain.trainer import Trainer

_CONFIG, _WORKDIR, _STEP = cli.CONFIG, cli.WORKDIR, cli.STEP
_EVALS = flags.DEFINE_string("evals", "all", "Comma list of ppl, niah, extrapolation, mqar.")


class ConfigMismatch(ValueError):
  pass


def checkpoint_step(ckpt, step: int | None) -> int:
  steps = ckpt.all_steps()
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {ckpt.directory}")
  step = max(steps) if step is None else step
  if step not in steps:
    raise FileNotFoundError(f"no checkpoint at step {step} in {ckpt.directory} "
                            f"(have {sorted(steps)})")
  return step


def checked_config(cfg, saved: dict | None, step: int, directory: str, *, allow: bool):
  """The config to evaluate with, and the checkpoint's when it differs (else None): cfg=None
  takes the checkpoint's own; a model that differs from the checkpoint's is refused unless
  allowed."""
  if cfg is None:
    if saved is None:
      raise ConfigMismatch(f"the checkpoint at step {step} in {directory} has no saved config: "
                           "give --config")
    return cli.validated(config_lib.from_saved(saved["config"])), None
  if saved is None:
    return cfg, None
  diffs = provenance.differences(saved["config"], cfg.to_dict())
  if diffs and not allow:
    raise ConfigMismatch(f"the checkpoint at step {step} in {directory} was trained with another "
                         f"model: {provenance.describe(diffs, 'checkpoint', '--config')} (pass "
                         "--allow_config_mismatch to evaluate it anyway)")
  return cfg, (saved if diffs else None)


def evaluate(cfg, workdir: str, names, step: int | None = None, *,
             allow_config_mismatch: bool = False, evals_flag: str = "--evals") -> dict:
  """Runs `names` on the checkpoint at `step` (default: the latest). cfg None: the config saved
  with the checkpoint."""
  ckpt = Checkpointer(workdir, keep=max(cfg.train.keep_checkpoints, 1) if cfg else 1,
                      async_save=False)
  try:
    step = checkpoint_step(ckpt, step)
    saved = ckpt.saved_config(step)
    cfg, other = checked_config(cfg, saved, step, ckpt.directory, allow=allow_config_mismatch)
    if evals_flag == "all" and cfg.data.source == "mqar":  # all that apply to a synthetic task
      names = [n for n in names if n not in config_lib.TEXT_EVALS]
    config_lib.check_evals(cfg, names, where=f"--evals={evals_flag!r}")
    check_writable(os.path.join(workdir, "evals"), "the eval directory")
    trainer = Trainer.from_config(cfg)
    try:
      state, _ = ckpt.restore(step, trainer.abstract_state())
    except (ValueError, KeyError) as e:
      raise ConfigMismatch(f"the checkpoint at step {step} in {ckpt.directory} does not fit this "
                           f"config: {str(e).splitlines()[0]}") from e
  finally:
    ckpt.close()
  params = state["params"]
  num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  suite = EvalSuite(cfg, trainer.model, num_params=num_params,
                    checkpoint_config=None if other is None else other["config"])
  # The run's own evals/ and TensorBoard logs hold results of the config it was trained with;
  # another config's results go beside them, never over them.
  out = workdir
  if other is not None:
    out = os.path.join(workdir, "evals", "other-configs", config_digest(cfg))
  writer = MetricWriter(out)
  try:
    return suite.run(params, names, step=step, writer=writer,
                     out_dir=os.path.join(workdir, "evals") if other is None else out)
  finally:
    writer.close()


def config_digest(cfg) -> str:
  import hashlib
  import json
  return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True,
                                   default=str).encode()).hexdigest()[:12]


def main(argv):
  cfg, workdir = cli.start(argv, _CONFIG, _WORKDIR, config_required=False)
  try:
    names = eval_names(_EVALS.value)
  except ValueError as e:
    cli.fail(f"--evals: {e}")
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    cli.fail(f"no checkpoints in {workdir} (train first: python -m lmtrain.train --config ... "
             f"--workdir {workdir})")

  if cfg is not None and _EVALS.value != "all":
    try:
      config_lib.check_evals(cfg, names, where=f"--evals={_EVALS.value!r}")
    except config_lib.ConfigError as e:
      cli.fail(str(e))
  try:
    results = evaluate(cfg, workdir, names, _STEP.value,
                       allow_config_mismatch=cli.allow_config_mismatch(),
                       evals_flag=_EVALS.value)
  except (FileNotFoundError, ConfigMismatch, config_lib.ConfigError, WorkdirError,
          DataError) as e:
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
  cli.run(main)
