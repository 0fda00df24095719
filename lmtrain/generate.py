"""Sample from a trained model: python -m lmtrain.generate --config ... --workdir DIR --prompt "def "

Prefills the prompt with the training kernels (one pass), then decodes one token per step with
each mixer's cache (KV cache, sliding-window ring buffer, recurrent state): one jitted decode
step for the whole model, compiled once per (batch, cache length), with the cache donated.
Greedy at temperature 0. `--bench` measures prefill and decode speed and cache bytes for every
attention kind at a few context lengths (random weights, no checkpoint needed).

Batches of prompts of different lengths are right-padded: every row starts at position 0, so
positions, ALiBi distances and block patterns are exactly those a training row sees; each row
writes its cache at its own position.
"""
from __future__ import annotations

import dataclasses
import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from lmtrain import cli


class GenerateError(ValueError):
  """A prompt or setting generation cannot take; one line."""


def max_context(cfg) -> int:
  """The longest prompt + generation this model is run at: 16x its training length (the
  extrapolation eval's range), or eval.max_length when set."""
  return cfg.eval.max_length or 16 * cfg.data.seq_len


# -- sampling -----------------------------------------------------------------------------------

def filter_logits(logits_BV, *, top_k: int = 0, top_p: float = 1.0):
  """-inf outside the kept set: the top_k highest (0 = all), then the smallest set of the most
  likely tokens whose probability reaches top_p (the most likely one is always kept)."""
  if top_k:
    kth = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth, -jnp.inf, logits_BV)
  if top_p < 1.0:
    order = jnp.argsort(-logits_BV, axis=-1)
    sorted_logits = jnp.take_along_axis(logits_BV, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above
    keep_sorted = before < top_p
    keep = jnp.zeros_like(keep_sorted).at[
        jnp.arange(logits_BV.shape[0])[:, None], order].set(keep_sorted)
    logits_BV = jnp.where(keep, logits_BV, -jnp.inf)
  return logits_BV


def sample(logits_BV, key, *, temperature: float, top_k: int = 0, top_p: float = 1.0):
  """Next tokens [B]: argmax at temperature 0, else a draw from the filtered softmax."""
  if temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits = filter_logits(logits_BV / temperature, top_k=top_k, top_p=top_p)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# -- the generator ------------------------------------------------------------------------------

@dataclasses.dataclass
class Generation:
  tokens: list[np.ndarray]  # the new tokens of each row (stopping after eos when given)
  prefill_seconds: float
  decode_seconds: float
  prefill_tokens: int
  decode_tokens: int
  cache_bytes_per_sequence: int

  def speed_line(self) -> str:
    pre = self.prefill_tokens / max(self.prefill_seconds, 1e-9)
    dec = self.decode_tokens / max(self.decode_seconds, 1e-9)
    return (f"prefill {pre:,.0f} tokens/s, decode {dec:,.0f} tokens/s, cache "
            f"{self.cache_bytes_per_sequence / 1024:,.1f} KiB per sequence")


class Generator:
  """Compiled prefill and decode steps of one model; reused across calls of equal shapes."""

  def __init__(self, model_cfg, *, scan_layers: bool = False):
    """scan_layers: the params are in the scanned layout (train.scan_layers); prefill and
    decode then scan over the layers too."""
    from lmtrain.trainer import build_model
    self.fns, _ = build_model(model_cfg, scan_layers=scan_layers)
    self._prefill = {}
    self._step = {}
    self._compiled = {}

  def _model(self, params):
    return nnx.merge(self.fns.graphdef, nnx.State(params))

  def prefill_fn(self, batch: int, prompt_len: int, cache_len: int):
    key = (batch, prompt_len, cache_len)
    if key not in self._prefill:
      def prefill(params, tokens, lengths):
        model = self._model(params)
        logits, cache = model.prefill(tokens, lengths, model.init_cache(batch, cache_len))
        return logits[jnp.arange(batch), lengths - 1], cache
      self._prefill[key] = jax.jit(prefill)
    return self._prefill[key]

  def step_fn(self, batch: int, cache_len: int, temperature: float, top_k: int, top_p: float):
    key = (batch, cache_len, temperature, top_k, top_p)
    if key not in self._step:
      def step(params, cache, token, position, rng):
        logits, cache = self._model(params).decode(token, position, cache)
        return cache, logits, sample(logits, rng, temperature=temperature, top_k=top_k,
                                     top_p=top_p)
      self._step[key] = jax.jit(step, donate_argnums=1)
    return self._step[key]

  def compiled_step(self, step, params, cache, token, position, rng):
    key = (step, jax.tree.structure(cache), tuple(x.shape for x in jax.tree.leaves(cache)))
    if key not in self._compiled:
      self._compiled[key] = step.lower(params, cache, token, position, rng).compile()
    return self._compiled[key]

  def generate(self, params, prompts, *, max_new_tokens: int, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos_id: int | None = None,
               limit: int | None = None, return_logits: bool = False) -> Generation:
    prompts = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
    if not prompts or any(len(p) == 0 for p in prompts):
      raise GenerateError("the prompt is empty (give at least one token)")
    lengths = np.asarray([len(p) for p in prompts], np.int32)
    batch, prompt_len = len(prompts), int(lengths.max())
    cache_len = prompt_len + max_new_tokens
    if limit is not None and cache_len > limit:
      raise GenerateError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) = "
                          f"{cache_len} tokens is more than this model is run at ({limit})")
    tokens = np.zeros((batch, prompt_len), np.int32)
    for i, p in enumerate(prompts):
      tokens[i, :len(p)] = p
    prefill = self.prefill_fn(batch, prompt_len, cache_len)
    step = self.step_fn(batch, cache_len, float(temperature), int(top_k), float(top_p))
    lengths_j, tokens_j = jnp.asarray(lengths), jnp.asarray(tokens)
    jax.block_until_ready(prefill(params, tokens_j, lengths_j))  # compile outside the timing
    t0 = time.perf_counter()
    logits, cache = prefill(params, tokens_j, lengths_j)
    jax.block_until_ready(cache)
    prefill_seconds = time.perf_counter() - t0
    cache_bytes = sum(x.nbytes for x in jax.tree.leaves(cache)) // batch
    rng = jax.random.key(seed)
    token = sample(logits, jax.random.fold_in(rng, 0), temperature=temperature, top_k=top_k,
                   top_p=top_p)
    out, all_logits = [token], [logits]
    done = np.zeros(batch, bool)
    if eos_id is not None:
      done |= np.asarray(token) == eos_id
    decode_seconds, decoded = 0.0, 0
    for i in range(1, max_new_tokens):
      if done.all():
        break
      position = lengths_j + (i - 1)
      if i == 1:  # compile outside the timing
        step = self.compiled_step(step, params, cache, token, position, rng)
      t0 = time.perf_counter()
      cache, logits, token = step(params, cache, token, position, jax.random.fold_in(rng, i))
      token.block_until_ready()
      decode_seconds += time.perf_counter() - t0
      decoded += batch
      out.append(token)
      all_logits.append(logits)
      if eos_id is not None:
        done |= np.asarray(token) == eos_id
    new = np.stack([np.asarray(t) for t in out], axis=1)
    rows = []
    for row in new:
      if eos_id is not None and (row == eos_id).any():
        row = row[:int(np.argmax(row == eos_id)) + 1]
      rows.append(row)
    gen = Generation(rows, prefill_seconds, decode_seconds, int(lengths.sum()), decoded,
                     int(cache_bytes))
    if return_logits:
      gen.logits = np.stack([np.asarray(l) for l in all_logits], axis=1)
    return gen


@functools.lru_cache(maxsize=8)
def _generator(model_cfg_json: str, scan_layers: bool):
  import json

  import ml_collections
  return Generator(ml_collections.ConfigDict(json.loads(model_cfg_json)), scan_layers=scan_layers)


def generate(params, cfg, prompt_tokens, **kwargs) -> Generation:
  """Generates from `params` of the model of (resolved) `cfg` after each prompt (a list of token
  id sequences, or one [B, T] array of equal-length prompts). kwargs: max_new_tokens,
  temperature (0 = greedy), top_k, top_p, seed, eos_id, return_logits."""
  gen = _generator(cfg.model.to_json(), bool(cfg.train.scan_layers))
  kwargs.setdefault("limit", max_context(cfg))
  return gen.generate(params, list(prompt_tokens), **kwargs)


# -- the command --------------------------------------------------------------------------------

_CONFIG, _WORKDIR, _STEP = cli.CONFIG, cli.WORKDIR, cli.STEP
_PROMPT = flags.DEFINE_string("prompt", None, "Prompt text.")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "Read the prompt from this file.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: keep tokens up to this mass.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_BATCH = flags.DEFINE_integer("batch", 1, "Rows generated in parallel from the prompt.")
_BENCH = flags.DEFINE_bool("bench", False, "Measure prefill/decode speed and cache bytes per "
                           "attention kind instead (random weights).")
_LENGTHS = flags.DEFINE_string("lengths", "256,1024,4096", "--bench: context lengths.")
_KINDS = flags.DEFINE_string("kinds", "", "--bench: attention kinds (default: all).")


def load_params(cfg, workdir: str, step: int | None, *, allow_config_mismatch: bool = False):
  """(params, step, cfg) of the checkpoint at `step` (default: the latest); cfg None takes the
  checkpoint's own config, and a given one must have the checkpoint's model."""
  import os

  from lmtrain.checkpoint import Checkpointer
  from lmtrain.evaluate import ConfigMismatch, checked_config, checkpoint_step
  from lmtrain.trainer import Trainer
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise GenerateError(f"no checkpoints in {workdir} (train first: python -m lmtrain.train "
                        f"--config ... --workdir {workdir})")
  ckpt = Checkpointer(workdir, keep=1, async_save=False)
  try:
    step = checkpoint_step(ckpt, step)
    cfg, _ = checked_config(cfg, ckpt.saved_config(step), step, ckpt.directory,
                            allow=allow_config_mismatch)
    trainer = Trainer.from_config(cfg)
    try:
      state, _ = ckpt.restore(step, trainer.abstract_state())
    except (ValueError, KeyError) as e:
      raise GenerateError(f"the checkpoint at step {step} in {ckpt.directory} does not fit this "
                          f"config: {str(e).splitlines()[0]}") from e
  except (FileNotFoundError, ConfigMismatch) as e:
    raise GenerateError(str(e)) from e
  finally:
    ckpt.close()
  return state["params"], step, cfg


def bench(cfg, lengths, kinds, *, decode_steps: int = 32, out=sys.stdout) -> list[dict]:
  """Prefill and decode tokens/s and cache bytes per sequence for each kind and context length
  (one sequence, random weights: the speed and memory of the mechanism, not of a checkpoint)."""
  from lmtrain import config as config_lib
  from lmtrain.trainer import build_model
  rows = []
  print(f"{'kind':<16}{'context':>9}{'prefill tok/s':>15}{'decode tok/s':>14}"
        f"{'cache KiB/seq':>15}", file=out, flush=True)
  for kind in kinds:
    resolved = config_lib.finalize(with_kind(cfg, kind))
    generator = Generator(resolved.model)
    params = jax.jit(build_model(resolved.model)[1])(jax.random.key(0))
    for length in lengths:
      prompt = np.random.default_rng(0).integers(0, 256, size=length).astype(np.int32)
      gen = generator.generate(params, [prompt], max_new_tokens=decode_steps + 1)
      row = {"kind": kind, "context": length,
             "prefill_tokens_per_sec": gen.prefill_tokens / gen.prefill_seconds,
             "decode_tokens_per_sec": gen.decode_tokens / gen.decode_seconds,
             "cache_bytes_per_sequence": gen.cache_bytes_per_sequence}
      rows.append(row)
      print(f"{kind:<16}{length:>9}{row['prefill_tokens_per_sec']:>15,.0f}"
            f"{row['decode_tokens_per_sec']:>14,.0f}"
            f"{row['cache_bytes_per_sequence'] / 1024:>15,.1f}", file=out, flush=True)
  return rows


def with_kind(cfg, kind: str):
  """A raw config equal to `cfg` but with every layer of attention kind `kind` (its default
  options, sized for cfg's data.seq_len)."""
  from lmtrain import config as config_lib
  c = config_lib.base_config()
  for section in ("model", "data", "train", "eval", "mesh"):
    for key, value in cfg[section].items():
      if not (section == "model" and key == "attention"):
        c[section][key] = value
  c.model.attention.update(kind=kind, layer_pattern="", impl=cfg.model.attention.impl)
  return c


def main(argv):
  from absl import logging

  from lmtrain.data.tokenizers import get_tokenizer
  logging.set_verbosity(logging.WARNING)
  cfg = cli.load_config(_CONFIG, required=False)
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  if _BENCH.value:
    from lmtrain.model import mixers
    if cfg is None:
      sys.path.insert(0, ".")
      from configs import tiny
      cfg = cli.validated(tiny.get_config())
    kinds = [k.strip() for k in _KINDS.value.split(",") if k.strip()] or list(mixers.kinds())
    unknown = [k for k in kinds if k not in mixers.kinds()]
    if unknown:
      cli.fail(f"--kinds: unknown attention kind {unknown[0]!r} (kinds: "
               f"{', '.join(mixers.kinds())})")
    try:
      lengths = [int(x) for x in _LENGTHS.value.split(",") if x.strip()]
    except ValueError:
      cli.fail(f"--lengths={_LENGTHS.value!r} is not a comma list of integers")
    bench(cfg, lengths, kinds)
    return
  if not _WORKDIR.value:
    cli.fail("--workdir is required")
  if (_PROMPT.value is None) == (_PROMPT_FILE.value is None):
    cli.fail("give exactly one of --prompt and --prompt_file")
  if _PROMPT_FILE.value is not None:
    try:
      with open(_PROMPT_FILE.value, "rb") as f:
        text = f.read()
    except OSError as e:
      cli.fail(f"--prompt_file: {e.strerror}: {_PROMPT_FILE.value}")
  else:
    text = _PROMPT.value.encode("utf-8")
  if not text:
    cli.fail("the prompt is empty (give at least one character)")
  for name, flag, ok in (("--max_new_tokens", _MAX_NEW, _MAX_NEW.value >= 1),
                         ("--temperature", _TEMPERATURE, _TEMPERATURE.value >= 0),
                         ("--top_k", _TOP_K, _TOP_K.value >= 0),
                         ("--top_p", _TOP_P, 0 < _TOP_P.value <= 1),
                         ("--batch", _BATCH, _BATCH.value >= 1)):
    if not ok:
      cli.fail(f"{name}={flag.value} is out of range")
  try:
    params, step, cfg = load_params(cfg, _WORKDIR.value, _STEP.value,
                                    allow_config_mismatch=cli.allow_config_mismatch())
  except GenerateError as e:
    cli.fail(str(e))
  tok = get_tokenizer(cfg.data.tokenizer)
  if _TOP_K.value > cfg.model.vocab_size:
    cli.fail(f"--top_k={_TOP_K.value} exceeds the vocabulary ({cfg.model.vocab_size})")
  prompt = np.concatenate([[tok.bos_id], tok.encode(text)]).astype(np.int32)
  try:
    gen = generate(params, cfg, [prompt] * _BATCH.value, max_new_tokens=_MAX_NEW.value,
                   temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
                   seed=_SEED.value, eos_id=tok.eos_id)
  except GenerateError as e:
    cli.fail(str(e))
  for i, row in enumerate(gen.tokens):
    if _BATCH.value > 1:
      print(f"--- sample {i}")
    print(text.decode("utf-8", errors="replace") + tok.decode(row), flush=True)
  print(f"lmtrain: step {step}: {gen.speed_line()}", file=sys.stderr, flush=True)


if __name__ == "__main__":
  cli.run(main)
