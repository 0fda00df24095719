"""Compare runs: python -m lmtrain.compare runs/* [--out comparison]

Gathers each workdir's evals/*.json and writes, under --out, comparison.md (one table: which
attention should I use), comparison.json (the gathered numbers), and plots: ppl_vs_length.png,
loss_by_position.png, niah.png (heatmaps side by side) and mqar.png.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys

import numpy as np

from lmtrain import provenance
from lmtrain.evals import report


def load_run(workdir: str) -> dict | None:
  """{"name", "attention", "num_params", "step", evals...} or None when it has no evals."""
  evals = {}
  for path in sorted(glob.glob(os.path.join(workdir, "evals", "*.json"))):
    name = os.path.basename(path)[:-5]
    if "_step" in name:
      continue
    evals[name] = report.read_json(path)
  if not evals:
    return None
  first = next(iter(evals.values()))
  return {"name": os.path.basename(os.path.normpath(workdir)), "workdir": workdir,
          "attention": first.get("attention"), "num_params": first.get("num_params"),
          "train_seq_len": first.get("train_seq_len"),
          "step": max(e["step"] for e in evals.values()),
          "config": first.get("config"), "run": first.get("run"),
          **{k: v["result"] for k, v in evals.items()}}


def differing_fields(runs: list[dict]) -> list[str]:
  """Every resolved config field whose value is not the same in all compared runs."""
  flat = [provenance.flatten(r["config"]) if r.get("config") else {} for r in runs]
  keys = sorted(set().union(*flat)) if flat else []
  return [k for k in keys if len({repr(f.get(k)) for f in flat}) > 1]


def code_label(run: dict) -> str:
  r = run.get("run") or {}
  if not r.get("source_hash"):
    return "-"
  return r["source_hash"][:8] + ("+dirty" if r.get("git_dirty") else "")


def _fmt(x, spec=".3f"):
  return "-" if x is None else format(x, spec)


def table(runs: list[dict]) -> str:
  """The markdown table: one row per run."""
  cols = ["run", "attention", "params", "step", "ppl", "bits/byte", "ppl (sliding)",
          "NIAH eff. length (synth/natural)", "NIAH answer NLL", "ppl @T", "ppl @4T",
          "ppl @16T", "MQAR acc", "code", "config fields that differ"]
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  differ = differing_fields(runs)
  for r in runs:
    flat = provenance.flatten(r["config"]) if r.get("config") else {}
    fields = ", ".join(f"{k}={flat[k]}" for k in differ if k in flat) or "-"
    ppl = r.get("ppl", {})
    niah = {g["filler"]: g for g in r.get("niah", {}).get("grids", [])}
    eff = "/".join(str(niah[f]["effective_length"]) if f in niah else "-"
                   for f in ("synthetic", "natural"))
    nll = [np.mean(g["answer_nll"]) for g in niah.values()]
    by_len = {x["length"]: x["perplexity"] for x in r.get("extrapolation", {}).get("lengths", [])}
    t = r.get("train_seq_len") or 0
    mq = r.get("mqar", {}).get("mean_accuracy")
    lines.append("| " + " | ".join([
        r["name"], str(r["attention"]), f"{r['num_params'] / 1e6:.2f}M" if r["num_params"] else "-",
        str(r["step"]), _fmt(ppl.get("disjoint", {}).get("perplexity")),
        _fmt(ppl.get("disjoint", {}).get("bits_per_byte")),
        _fmt(ppl.get("sliding", {}).get("perplexity")), eff,
        _fmt(float(np.mean(nll)) if nll else None, ".2f"),
        _fmt(by_len.get(t)), _fmt(by_len.get(4 * t)), _fmt(by_len.get(16 * t)),
        _fmt(mq, ".2f"), code_label(r), fields]) + " |")
  return "\n".join(lines) + "\n" + code_note(runs)


def code_note(runs: list[dict]) -> str:
  """A warning line when the runs did not all run the same sources."""
  labels = {code_label(r) for r in runs}
  if len(labels) == 1 and "-" not in labels:
    return ""
  return ("\n**Warning: these runs ran different (or unrecorded) code** ("
          + ", ".join(f"{r['name']}: {code_label(r)}" for r in runs)
          + "); differences may come from the code, not the config.\n")


def papers(runs: list[dict]) -> str:
  """The citation of every attention kind in the compared runs, from the mixer registry."""
  from lmtrain.model import mixers
  used = {k.strip() for r in runs for k in str(r.get("attention") or "").split(",")}
  lines = [f"- `{k}`: {mixers.get(k).paper}" for k in mixers.kinds() if k in used]
  return ("\nAttention kinds:\n\n" + "\n".join(lines) + "\n") if lines else ""


def plots(runs: list[dict], out: str) -> list[str]:
  plt = report._pyplot()
  written = []
  series = {r["name"]: ([x["length"] for x in r["extrapolation"]["lengths"]],
                        [x["perplexity"] for x in r["extrapolation"]["lengths"]])
            for r in runs if r.get("extrapolation", {}).get("lengths")}
  if series:
    _save(report.line_image(series, title="perplexity by evaluation length", xlabel="length",
                            ylabel="perplexity", logx=True), out, "ppl_vs_length.png", written)
  series = {r["name"]: ([2 ** b["bucket"] for b in r["extrapolation"]["loss_by_position"]],
                        [b["nats_per_token"] for b in r["extrapolation"]["loss_by_position"]])
            for r in runs if r.get("extrapolation", {}).get("loss_by_position")}
  if series:
    _save(report.line_image(series, title="loss by token position", xlabel="position (log2 bucket end)",
                            ylabel="nats/token", logx=True), out, "loss_by_position.png", written)
  grids = [(r["name"], g) for r in runs for g in r.get("niah", {}).get("grids", [])]
  if grids:
    fig, axes = plt.subplots(1, len(grids), figsize=(3.2 * len(grids), 3), squeeze=False)
    for ax, (name, g) in zip(axes[0], grids):
      report.heatmap(ax, g["accuracy"], g["lengths"], g["depths"], f"{name}\n{g['filler']}")
      ax.set_xlabel("length")
    axes[0][0].set_ylabel("depth")
    _save(report.figure_to_array(fig), out, "niah.png", written)
  series = {}
  for r in runs:
    m = r.get("mqar")
    if m:
      accs = [np.nanmean([np.nan if a is None else a for a in row]) for row in m["accuracy"]]
      series[r["name"]] = (m["pairs"], accs)
  if series:
    _save(report.line_image(series, title="MQAR recall accuracy", xlabel="key-value pairs",
                            ylabel="accuracy"), out, "mqar.png", written)
  return written


def _save(image, out, name, written):
  from PIL import Image
  path = os.path.join(out, name)
  Image.fromarray(image).save(path)
  written.append(path)


def compare(workdirs, out: str) -> dict:
  runs = [r for r in (load_run(w) for w in workdirs) if r is not None]
  if not runs:
    raise FileNotFoundError(f"no evals/*.json in any of {', '.join(workdirs)}; run "
                            "python -m lmtrain.evaluate first")
  os.makedirs(out, exist_ok=True)
  md = table(runs) + papers(runs)
  with open(os.path.join(out, "comparison.md"), "w") as f:
    f.write("# Attention comparison\n\n" + md)
  report.write_json(os.path.join(out, "comparison.json"), {"runs": runs})
  images = plots(runs, out)
  return {"runs": runs, "table": md, "images": images}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m lmtrain.compare", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("workdirs", nargs="+", help="run directories (with evals/*.json)")
  parser.add_argument("--out", default="comparison", help="where to write the table and plots")
  args = parser.parse_args(argv)
  missing = [w for w in args.workdirs if not os.path.isdir(w)]
  if missing:
    print(f"lmtrain: error: not a directory: {missing[0]}", file=sys.stderr)
    return 2
  try:
    result = compare(args.workdirs, args.out)
  except FileNotFoundError as e:
    print(f"lmtrain: error: {e}", file=sys.stderr)
    return 2
  print(result["table"], end="")
  print(f"lmtrain: wrote {os.path.join(args.out, 'comparison.md')} and "
        f"{len(result['images'])} plots", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
