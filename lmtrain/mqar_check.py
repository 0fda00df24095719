"""Zoology's MQAR orderings, on this machine: python -m lmtrain.mqar_check [--check zoology|state|all]

Trains `configs/mqar.py` (2 layers, width 128, Zoology's multi-query associative recall at
sequence 32 with 2/4/8 pairs per row, 800 steps of 64 rows) once per attention variant,
evaluates recall by number of pairs and by how far back each query's pair lies, prints one line
per variant, then checks what Zoology (Arora et al., 2023) and the kinds' papers report. Two
checks, each a setting and the variants its claims name:

  zoology (default; about 13 minutes on 2 CPU cores), 2 heads of 64:
    - softmax attention recalls (>= 95% at every pair count);
    - the additive linear kinds without a short convolution (linear, gla) recall less, and less
      as the pairs grow;
    - a sliding window shorter than a query's distance to its pair is near chance on it;
    - FoX keeps softmax's recall (Lin et al., 2025): the paper's FoX (Pro) (`fox_pro`) and its
      LLaMA-style FoX (`fox`) each get a verdict.
  state (about 16 minutes), 16 heads of 8 at the same width, so that 8 pairs fill a head's
  state (8 x 8): the delta rule recalls clearly better than the additive rules at the same
  width (Yang et al., 2024; 2025): deltanet and gated_deltanet against simple_gla and linear,
  and the additive ones recall less as the pairs grow.

--kinds a,b runs those variants in the chosen check's setting instead of its own list. Each
verdict is printed with its numbers; a claim whose variants were not run is skipped. With --lrs
a,b each variant is trained at every learning rate and its best kept, as Zoology reports. Exit 0
when every verdict holds.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WINDOW_CONTROL = 8  # the sliding window of the control: shorter than most query distances
DELTA_RULE = ("deltanet", "gated_deltanet")  # the claims of Yang et al. (2024, 2025)
ADDITIVE = ("linear", "simple_gla", "gla")  # linear-family kinds whose state only adds
MARGIN = 0.05  # "clearly better": beyond the noise of the eval's samples
CHECKS = {  # name -> (the variants its claims name, the setting's overrides of configs/mqar.py)
    "zoology": (("softmax", "sliding_window", "linear", "gla", "fox", "fox_pro"), {}),
    "state": (("linear", "simple_gla", "deltanet", "gated_deltanet"),
              {"model.num_heads": 16, "model.num_kv_heads": 16}),
}


def mqar_config(variant: str, **overrides):
  """configs/mqar.py with `variant` and dotted overrides, resolved."""
  sys.path.insert(0, REPO)
  from configs import mqar
  from lmtrain import config as config_lib
  cfg = mqar.get_config(f"attention={variant}")
  for key, value in overrides.items():
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config_lib.finalize(cfg)


def train_recall(cfg, *, log=None) -> dict:
  """Trains cfg (data.source=mqar) for train.steps and returns its recall: accuracy by pairs
  (eval.mqar_pairs, at data.seq_len), by query distance, the final loss and the time taken."""
  import jax

  from lmtrain.data import train_dataset
  from lmtrain.data.pipeline import mqar_options
  from lmtrain.evals.mqar import mqar_grid
  from lmtrain.evals.scoring import model_scorer
  from lmtrain.evals.runner import parse_list
  from lmtrain.trainer import Trainer
  t0 = time.perf_counter()
  trainer = Trainer.from_config(cfg)
  state = jax.jit(trainer.init_state, static_argnums=0)(cfg.train.seed)
  step = jax.jit(trainer.train_step, donate_argnums=0)
  data = iter(train_dataset(cfg))
  loss = None
  for i in range(1, cfg.train.steps + 1):
    state, metrics = step(state, next(data))
    if log is not None and (i % cfg.train.log_every == 0 or i == cfg.train.steps):
      loss = float(metrics["loss"])
      log(f"step {i}/{cfg.train.steps}: loss {loss:.3f}")
  loss = float(metrics["loss"])
  pairs = parse_list(cfg.eval.mqar_pairs)
  r = mqar_grid(model_scorer(trainer.model), state["params"], pairs=pairs,
                lengths=[cfg.data.seq_len], samples=cfg.eval.mqar_samples,
                batch_tokens=cfg.eval.batch_tokens, **mqar_options(cfg.data))
  return {"accuracy": {p: row[0] for p, row in zip(pairs, r["accuracy"])},
          "by_distance": r["by_distance"], "loss": loss, "lr": cfg.train.lr,
          "seconds": time.perf_counter() - t0}


def beyond(result: dict, distance: int) -> float | None:
  """Accuracy over the queries whose pair lies more than `distance` tokens back."""
  rows = [b for b in result["by_distance"] if 2 ** (b["bucket"] - 1) > distance]
  n = sum(b["queries"] for b in rows)
  return sum(b["accuracy"] * b["queries"] for b in rows) / n if n else None


def verdicts(check: str, results: dict, chance: float) -> list[tuple[str, bool, str]]:
  """(claim, holds, numbers) for each claim of `check` whose variants were run."""
  out = []
  acc = {k: r["accuracy"] for k, r in results.items()}
  pairs = sorted(next(iter(acc.values()))) if acc else []
  fmt = lambda k: "/".join(f"{acc[k][p]:.2f}" for p in pairs)
  falling = lambda k: all(acc[k][a] >= acc[k][b] - 0.02 for a, b in zip(pairs, pairs[1:]))
  if check == "zoology":
    if "softmax" in acc:
      out.append(("softmax recalls >= 95% at every pair count",
                  min(acc["softmax"].values()) >= 0.95, f"softmax {fmt('softmax')}"))
      for k in (k for k in acc if k in ADDITIVE):
        below = acc[k][pairs[-1]] < acc["softmax"][pairs[-1]]
        out.append((f"{k} recalls less than softmax, and less as pairs grow",
                    bool(below and falling(k)), f"{k} {fmt(k)}"))
      for k in (k for k in acc if k in ("fox", "fox_pro")):
        out.append((f"{k} keeps softmax's recall (within 5 points at every pair count)",
                    all(acc[k][p] >= acc["softmax"][p] - 0.05 for p in pairs),
                    f"{k} {fmt(k)}, softmax {fmt('softmax')}"))
    if "sliding_window" in results:
      far = beyond(results["sliding_window"], WINDOW_CONTROL)
      if far is not None:
        out.append((f"sliding_window (window {WINDOW_CONTROL}) is near chance ({chance:.3f}) on "
                    f"queries more than {WINDOW_CONTROL} tokens from their pair",
                    far <= 3 * chance, f"accuracy there {far:.3f}"))
  if check == "state":
    for delta in (d for d in DELTA_RULE if d in acc):
      for weaker in (w for w in ("linear", "simple_gla") if w in acc):
        out.append((f"{delta} recalls clearly better than {weaker} (by {MARGIN:.2f} or more "
                    f"at {pairs[-1]} pairs)",
                    acc[delta][pairs[-1]] >= acc[weaker][pairs[-1]] + MARGIN,
                    f"{delta} {fmt(delta)}, {weaker} {fmt(weaker)}"))
    for k in (k for k in acc if k in ADDITIVE):
      out.append((f"{k} recalls less as pairs grow", falling(k) and
                  acc[k][pairs[-1]] < acc[k][pairs[0]] - MARGIN, f"{k} {fmt(k)}"))
  return out


def _overrides(check: str, variant: str, args) -> dict:
  overrides = {"train.seed": args.seed, **CHECKS[check][1]}
  if args.steps:
    overrides["train.steps"] = args.steps
  if variant == "sliding_window":
    overrides["model.attention.sliding_window.window"] = WINDOW_CONTROL
  return overrides


def run_check(check: str, variants: list[str], args, lrs: list[float]) -> tuple[dict, float]:
  """Trains each variant in `check`'s setting (the best of `lrs`), printing a line per run;
  returns ({variant: result}, chance)."""
  results, chance = {}, 0.0
  for variant in variants:
    overrides = _overrides(check, variant, args)
    best = None
    for lr in lrs or [None]:
      if lr is not None:
        overrides["train.lr"] = lr
      cfg = mqar_config(variant, **overrides)
      chance = 1.0 / (cfg.data.mqar_vocab_size - cfg.data.mqar_vocab_size // 2)
      r = train_recall(cfg)
      print(f"{check:<8} {variant:<16} lr {cfg.train.lr:<8g} loss {r['loss']:.3f}  recall by "
            "pairs " + "  ".join(f"{p}: {a:.3f}" for p, a in r["accuracy"].items())
            + f"  ({r['seconds']:.0f}s)", flush=True)
      if best is None or np.mean(list(r["accuracy"].values())) > np.mean(
          list(best["accuracy"].values())):
        best = r
    results[variant] = best
  return results, chance


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m lmtrain.mqar_check", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--check", default="zoology", choices=[*CHECKS, "all"])
  parser.add_argument("--kinds", default="",
                      help="comma list of attention variants (kinds or ready variants) to run in "
                           "the check's setting instead of its own")
  parser.add_argument("--steps", type=int, default=None, help="train.steps (configs/mqar.py)")
  parser.add_argument("--lrs", default="", help="learning rates to sweep, best kept")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", default="", help="write the results here")
  args = parser.parse_args(argv)
  from lmtrain import config as config_lib
  from lmtrain.model import mixers
  checks = list(CHECKS) if args.check == "all" else [args.check]
  chosen = [k.strip() for k in args.kinds.split(",") if k.strip()]
  unknown = [k for k in chosen if k not in mixers.variants()]
  if unknown:
    print(f"lmtrain: error: --kinds: unknown attention variant {unknown[0]!r} (variants: "
          f"{', '.join(sorted(mixers.variants()))})", file=sys.stderr)
    return 2
  try:
    lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
  except ValueError:
    print(f"lmtrain: error: --lrs={args.lrs!r} is not a comma list of numbers", file=sys.stderr)
    return 2
  plan = {c: chosen or list(CHECKS[c][0]) for c in checks}
  try:  # every config resolved, and its error reported, before anything trains
    for c, variants in plan.items():
      for v in variants:
        mqar_config(v, **_overrides(c, v, args))
  except config_lib.ConfigError as e:
    print(f"lmtrain: error: {e}", file=sys.stderr)
    return 2
  held, report = True, {}
  for c, variants in plan.items():
    results, chance = run_check(c, variants, args, lrs)
    report[c] = results
    print()
    for claim, ok, numbers in verdicts(c, results, chance):
      held &= ok
      print(f"{'HOLDS' if ok else 'FAILS'}  [{c}] {claim}: {numbers}", flush=True)
    print()
  if args.json:
    with open(args.json, "w") as f:
      json.dump({c: {k: {**v, "accuracy": {str(p): a for p, a in v["accuracy"].items()}}
                     for k, v in results.items()} for c, results in report.items()}, f, indent=2)
  return 0 if held else 1


if __name__ == "__main__":
  sys.exit(main())
