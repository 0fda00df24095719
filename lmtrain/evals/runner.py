"""Runs the evals on a model's params and reports them: JSON files, TensorBoard scalars and
images. Used by `python -m lmtrain.evaluate` and, periodically, by the trainer."""
from __future__ import annotations

import os

import jax
import numpy as np

from lmtrain import provenance
from lmtrain.data.pipeline import mqar_options
from lmtrain.data.heldout import heldout_stream
from lmtrain.data.tokenizers import get_tokenizer
from lmtrain.evals import extrapolation as extrap
from lmtrain.evals import mqar, needle, perplexity, report
from lmtrain.evals.scoring import model_scorer

EVALS = ("ppl", "niah", "extrapolation", "mqar")


def parse_list(text: str, kind=int) -> list:
  return [kind(x) for x in str(text).split(",") if x.strip()]


def eval_names(text: str) -> list[str]:
  names = [x.strip() for x in str(text).split(",") if x.strip()]
  if names == ["all"]:
    return list(EVALS)
  for name in names:
    if name not in EVALS:
      raise ValueError(f"eval {name!r} is not one of {', '.join(EVALS)} (or all)")
  return names


class EvalSuite:
  """The evals of one config; the compiled scoring functions are kept across calls."""

  def __init__(self, cfg, model_fns, *, num_params: int | None = None,
               checkpoint_config: dict | None = None):
    """checkpoint_config: the config saved with the evaluated checkpoint when it differs from
    cfg (an allowed mismatch); the eval JSONs then record both."""
    self.cfg = cfg
    self.checkpoint_config = checkpoint_config
    self.e = cfg.eval
    self.t = cfg.data.seq_len
    self.scorer = model_scorer(model_fns)
    self.tokenizer = get_tokenizer(cfg.data.tokenizer)
    self.num_params = num_params

  # -- the evals ------------------------------------------------------------------------------

  def ppl(self, params) -> dict:
    window = self.e.ppl_window or self.t
    stride = self.e.ppl_stride or max(window // 2, 1)
    return perplexity.perplexity(self.scorer, params, self.cfg, window=window, stride=stride,
                                 max_tokens=self.e.ppl_tokens,
                                 batch_size=max(1, self.e.batch_tokens // window))

  def niah(self, params) -> dict:
    shortest = needle.prompt_tokens(self.tokenizer) + 16
    lengths = parse_list(self.e.lengths) or [l for l in (self.t // 2, self.t, 2 * self.t)
                                              if l >= shortest]
    if not lengths or min(lengths) < shortest:
      raise ValueError(f"eval.lengths={self.e.lengths!r}: NIAH contexts need at least "
                       f"{shortest} tokens (the prompt takes {shortest - 16})")
    depths = parse_list(self.e.niah_depths, float)
    out = {"threshold": self.e.niah_threshold, "grids": []}
    for filler in [f.strip() for f in self.e.niah_fillers.split(",") if f.strip()]:
      natural = self._natural_ids(max(lengths) * 2) if filler == "natural" else None
      grid = needle.passkey_grid(self.scorer, params, self.tokenizer, lengths=lengths,
                                 depths=depths, samples=self.e.niah_samples, filler=filler,
                                 natural_text=natural, seed=self.e.seed,
                                 batch_tokens=self.e.batch_tokens,
                                 generate_fn=self._generate_fn(params))
      by_length = np.mean(np.asarray(grid["accuracy"]), axis=0)
      grid["accuracy_by_length"] = by_length.tolist()
      grid["effective_length"] = needle.effective_length(lengths, by_length,
                                                         self.e.niah_threshold)
      out["grids"].append(grid)
    return out

  def extrapolation(self, params) -> dict:
    if self.cfg.data.source == "mqar":
      raise ValueError("eval 'extrapolation' needs text data, not data.source='mqar'")
    return extrap.extrapolation(
        self.scorer, params, self.cfg, train_length=self.t,
        factors=parse_list(self.e.extrapolation_factors, float),
        tokens_per_length=self.e.extrapolation_tokens, batch_tokens=self.e.batch_tokens,
        max_length=self.e.max_length)

  def mqar(self, params) -> dict:
    lengths = parse_list(self.e.mqar_lengths) or [self.t]
    return mqar.mqar_grid(self.scorer, params, pairs=parse_list(self.e.mqar_pairs),
                          lengths=lengths, samples=self.e.mqar_samples,
                          batch_tokens=self.e.batch_tokens, **mqar_options(self.cfg.data))

  def _generate_fn(self, params):
    """Greedy generation with the decoding cache for eval.niah_mode=generate, else None."""
    if self.e.niah_mode != "generate":
      return None
    from lmtrain.generate import generate

    def fn(prompts, max_new_tokens):
      gen = generate(params, self.cfg, prompts, max_new_tokens=max_new_tokens, temperature=0.0)
      return gen.tokens
    return fn

  def _natural_ids(self, num_tokens: int) -> np.ndarray:
    """Held-out text as token ids (many documents, lmtrain.data.heldout), without BOS/EOS."""
    tokens, segments = heldout_stream(self.cfg, num_tokens, doc_tokens=num_tokens // 2)
    tok = self.tokenizer
    return tokens[(segments > 0) & (tokens != tok.bos_id) & (tokens != tok.eos_id)]

  # -- running and reporting ------------------------------------------------------------------

  def run(self, params, names, *, step: int, writer=None, out_dir: str | None = None) -> dict:
    results = {}
    for name in names:
      result = getattr(self, name)(params)
      payload = {"eval": name, "step": int(step), "num_params": self.num_params,
                 "attention": _attention_summary(self.cfg), "train_seq_len": self.t,
                 "result": result, "config": self.cfg.to_dict(),
                 "run": provenance.run_metadata(self.cfg.data)}
      if self.checkpoint_config is not None:
        payload["checkpoint_config"] = self.checkpoint_config
      if out_dir is not None and jax.process_index() == 0:  # one writer for the whole job
        report.write_json(os.path.join(out_dir, f"{name}.json"), payload)
        report.write_json(os.path.join(out_dir, f"{name}_step{int(step)}.json"), payload)
      if writer is not None:
        _log(writer, name, result, int(step))
      results[name] = result
    return results


def _attention_summary(cfg) -> str:
  a = cfg.model.attention
  return a.layer_pattern if a.layer_pattern else a.kind


def _log(writer, name: str, r: dict, step: int) -> None:
  if name == "ppl":
    for mode in ("disjoint", "sliding"):
      if mode in r:
        writer.scalars(step, {f"eval_ppl/{mode}/{k}": r[mode][k]
                              for k in ("nats_per_token", "perplexity", "bits_per_byte")})
  elif name == "niah":
    for g in r["grids"]:
      f = g["filler"]
      writer.scalars(step, {f"niah/{f}/accuracy_L{l}": a
                            for l, a in zip(g["lengths"], g["accuracy_by_length"])})
      writer.scalars(step, {f"niah/{f}/effective_length": g["effective_length"]})
      writer.image(step, f"niah/{f}/heatmap", report.heatmap_image(
          g["accuracy"], g["lengths"], g["depths"], title=f"passkey accuracy ({f} filler)",
          xlabel="context length", ylabel="depth"))
  elif name == "extrapolation":
    rows = r["lengths"]
    writer.scalars(step, {f"extrapolation/ppl_L{x['length']}": x["perplexity"] for x in rows})
    writer.scalars(step, {f"extrapolation/loss_pos_{b['positions']}": b["nats_per_token"]
                          for b in r["loss_by_position"]})
    if rows:
      writer.image(step, "extrapolation/ppl_vs_length", report.line_image(
          {"ppl": ([x["length"] for x in rows], [x["perplexity"] for x in rows])},
          title=f"perplexity by length (trained at {r['train_length']})",
          xlabel="length", ylabel="perplexity", logx=True))
    if r["loss_by_position"]:
      writer.image(step, "extrapolation/loss_by_position", report.line_image(
          {"loss": ([2 ** b["bucket"] for b in r["loss_by_position"]],
                    [b["nats_per_token"] for b in r["loss_by_position"]])},
          title="loss by token position", xlabel="position (log2 bucket end)",
          ylabel="nats/token", logx=True))
  elif name == "mqar":
    scalars = {f"mqar/acc_p{p}_L{l}": a for p, row in zip(r["pairs"], r["accuracy"])
               for l, a in zip(r["lengths"], row) if a is not None}
    if r["mean_accuracy"] is not None:
      scalars["mqar/mean_accuracy"] = r["mean_accuracy"]
    writer.scalars(step, scalars)
    acc = [[np.nan if a is None else a for a in row] for row in r["accuracy"]]
    writer.image(step, "mqar/accuracy", report.heatmap_image(
        acc, r["lengths"], r["pairs"], title="MQAR recall accuracy", xlabel="sequence length",
        ylabel="key-value pairs"))
  writer.flush()
