"""The config schema: defaults, variant parsing, and validation that fails before compiling.

Configs are Python files with `get_config(arg=None)` returning an ml_collections.ConfigDict built
on `base_config()`. `finalize(cfg)` rejects unknown fields, resolves every attention option
(sizes derived from data.seq_len, after the command-line overrides) and validates, raising
ConfigError with one line naming the bad value; the command-line entry points turn it into exit
code 2 and use the resolved config from then on.
"""
from __future__ import annotations

import os

import ml_collections
from ml_collections import config_dict

from lmtrain.config_error import ConfigError  # re-exported: lmtrain.config.ConfigError

ATTENTION_IMPLS = ("auto", "reference", "xla", "cudnn", "pallas", "interpret", "interpret_gpu")
DTYPES = ("float32", "bfloat16", "float16")
DATA_SOURCES = ("stdlib", "text", "jsonl", "parquet", "arrayrecord", "mqar")
MESH_AXES = ("data", "fsdp", "tensor", "sequence")
# Fields that moved; a config that still sets one is told where it went.
MOVED_FIELDS = {
    "model.position": "model.attention.<kind>.position (an option of each softmax-family kind)",
    "model.rope_theta": "model.attention.<kind>.rope_theta (an option of each softmax-family kind)",
}


def placeholder(kind):
  return config_dict.placeholder(kind)


def base_config() -> ml_collections.ConfigDict:
  """Every field of the schema with its default (names are part of the DESIGN.md contract)."""
  from lmtrain.model import mixers
  c = ml_collections.ConfigDict()
  c.model = dict(
      # vocab_size 0: the tokenizer's vocabulary padded up to a multiple of 128
      vocab_size=0, num_layers=4, d_model=128, num_heads=2, num_kv_heads=1,
      head_dim=placeholder(int), mlp_dim=384, tie_embeddings=False, dtype="float32",
      dropout_rate=0.0,
      # kind: the token mixer of every layer (or layer_pattern, kinds repeated over the depth);
      # one sub-dict of options per registered kind (lmtrain/model/mixers), e.g.
      # --config.model.attention.moba.top_k=4
      attention=dict(kind="softmax", impl="auto", layer_pattern="",
                     **{kind: mixers.get(kind).Options.config_fields()
                        for kind in mixers.kinds()}),
  )
  c.data = dict(
      source="stdlib", path=placeholder(str), eval_path=placeholder(str), text_field="text",
      # tokenizer: byte, or a tokenizer.json / SentencePiece .model file (lmtrain/data/tokenizers)
      tokenizer="byte", seq_len=256, batch_size=16, heldout_percent=5.0, eval_batches=8,
      shuffle_window=1024,
      # documents are read, tokenized and packed in pieces of this many bytes (bounded memory)
      piece_bytes=1 << 20,
      align_documents=0,  # N > 0: every document starts at a multiple of N tokens in its row
      skip_bad_records=False,  # count and log bad records (a malformed JSON line) and go on
      # MQAR (data.source=mqar and eval mqar): Zoology's generator, lmtrain/data/mqar.py
      mqar_num_pairs=placeholder(str), mqar_vocab_size=256, mqar_power_a=0.01,
      mqar_random_non_queries=True,
  )
  c.train = dict(
      steps=300, lr=3e-3, warmup_steps=30, end_lr_ratio=0.1, b1=0.9, b2=0.95,
      weight_decay=0.1, grad_clip=1.0, grad_accum=1, seed=0, log_every=10, eval_every=100,
      checkpoint_every=50, keep_checkpoints=3, async_checkpoints=True,
      # memory (README "Training memory"): what each block keeps for the backward pass (none,
      # full, dots), the block stack as one scan over stacked layers, the tokens per chunk of
      # the MLP's recompute under remat=full, and of the vocabulary-chunked loss (0 = auto:
      # unchunked when the logits are small)
      remat="none", scan_layers=False, mlp_chunk=2048, loss_chunk=0,
      profile_steps="",  # "N:M": a jax.profiler trace of steps N+1..M in the workdir
  )
  c.mesh = dict(data=-1, fsdp=1, tensor=1, sequence=1)
  c.eval = dict(
      evals="",  # evals also run inside training at train.eval_every, e.g. "ppl,niah"
      lengths="",  # NIAH context lengths, e.g. "128,256,512"; "" = T/2, T, 2T
      ppl_window=0, ppl_stride=0, ppl_tokens=32768,  # 0 = seq_len, window // 2
      niah_depths="0,0.25,0.5,0.75,1", niah_samples=4, niah_fillers="synthetic,natural",
      niah_threshold=0.5,
      niah_mode="teacher_forced",  # or "generate": the answer generated with the decoding cache
      extrapolation_factors="0.25,0.5,1,2,4,8,16", extrapolation_tokens=16384, max_length=0,
      mqar_pairs="4,8,16", mqar_lengths="", mqar_samples=64,
      batch_tokens=16384, seed=0,
  )
  return c


def from_saved(saved: dict) -> ml_collections.ConfigDict:
  """A raw config from a resolved one saved with a checkpoint or run (config.json): the saved
  values over base_config(), so that a run written before a field existed gets its default."""
  c = base_config()

  def merge(node, src):
    for key, value in src.items():
      if isinstance(value, dict) and isinstance(node.get(key), ml_collections.ConfigDict):
        merge(node[key], value)
      else:
        node[key] = value
  with c.unlocked():
    merge(c, saved)
  return c


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """big_vision-style variant string "k=v,k2=v2" -> ConfigDict over `defaults` (typed by them)."""
  out = ml_collections.ConfigDict(dict(defaults))
  if not arg:
    return out
  for item in arg.split(","):
    if "=" not in item:
      raise ConfigError(f"config variant {item!r} is not of the form key=value")
    key, value = (s.strip() for s in item.split("=", 1))
    if key not in defaults:
      raise ConfigError(f"config variant key {key!r} is not one of {', '.join(defaults)}")
    default = defaults[key]
    if isinstance(default, bool):
      out[key] = value.lower() in ("1", "true", "yes")
    elif isinstance(default, int):
      out[key] = int(value)
    elif isinstance(default, float):
      out[key] = float(value)
    else:
      out[key] = value
  return out


def _fail(msg: str):
  raise ConfigError(msg)


def _positive(cfg, path: str, *, allow_zero=False):
  value = _get(cfg, path)
  if not isinstance(value, (int, float)) or isinstance(value, bool) or (
      value < 0 if allow_zero else value <= 0):
    _fail(f"{path}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


def _one_of(cfg, path: str, allowed):
  value = _get(cfg, path)
  if value not in allowed:
    _fail(f"{path}={value!r} is not one of {', '.join(map(str, allowed))}")


def _get(cfg, path: str):
  node = cfg
  for part in path.split("."):
    node = node[part]
  return node


def layer_pattern_kinds(attn) -> tuple[str, ...]:
  if not attn.layer_pattern:
    return (attn.kind,)
  return tuple(p.strip() for p in attn.layer_pattern.split(","))


def validate_model(cfg) -> None:
  """Checks the `model` subtree of a resolved config (also used by evaluation and tests)."""
  from lmtrain.model import mixers
  from lmtrain.model.dims import ModelDims
  m = cfg.model
  for f in ("vocab_size", "num_layers", "d_model", "num_heads", "num_kv_heads", "mlp_dim"):
    _positive(cfg, f"model.{f}")
  if m.head_dim is None and m.d_model % m.num_heads:
    _fail(f"model.num_heads={m.num_heads} does not divide model.d_model={m.d_model} "
          "(set model.head_dim to decouple them)")
  if m.head_dim is not None:
    _positive(cfg, "model.head_dim")
  if m.num_heads % m.num_kv_heads:
    _fail(f"model.num_kv_heads={m.num_kv_heads} does not divide model.num_heads={m.num_heads}")
  _one_of(cfg, "model.dtype", DTYPES)
  if not 0.0 <= m.dropout_rate < 1.0:
    _fail(f"model.dropout_rate={m.dropout_rate!r} must be in [0, 1)")
  a = m.attention
  _one_of(cfg, "model.attention.kind", mixers.kinds())
  _one_of(cfg, "model.attention.impl", ATTENTION_IMPLS)
  kinds = layer_pattern_kinds(a)
  for kind in kinds:
    if kind not in mixers.kinds():
      _fail(f"model.attention.layer_pattern={a.layer_pattern!r} has unknown kind {kind!r} "
            f"(kinds: {', '.join(mixers.kinds())})")
  if a.kind not in kinds:
    _fail(f"model.attention.kind={a.kind!r} is not in layer_pattern={a.layer_pattern!r}")
  dims = ModelDims.from_config(m)
  for kind in dict.fromkeys(kinds):
    mixer = mixers.get(kind)
    ctx = mixers.Context(kind=kind, dims=dims, seq_len=cfg.data.seq_len, impl=a.impl,
                         dtype=m.dtype)
    mixer.check(mixer.Options.from_config(a.get(kind)), ctx)


def resolve_attention(cfg) -> None:
  """In place: each used kind's options with every default applied and the sizes derived from
  data.seq_len filled in; options of kinds no layer uses must be left at their defaults (a
  comparison never silently differs in an ignored knob) and are dropped from the record."""
  from lmtrain.model import mixers
  a = cfg.model.attention
  kinds = layer_pattern_kinds(a)
  for kind in [k for k in mixers.kinds() if k in a]:
    Options = mixers.get(kind).Options
    if kind in kinds:
      continue
    given = {k: v for k, v in a[kind].items() if v != getattr(Options(), k, v)}
    if given:
      field, value = next(iter(given.items()))
      _fail(f"model.attention.{kind}.{field}={value!r} is set, but no layer uses attention kind "
            f"{kind!r} (model.attention.kind={a.kind!r}"
            + (f", layer_pattern={a.layer_pattern!r})" if a.layer_pattern else ")"))
    del a[kind]
  for kind in dict.fromkeys(kinds):
    if kind not in mixers.kinds():
      continue  # validate_model names it
    Options = mixers.get(kind).Options
    try:
      options = Options.from_config(a.get(kind)).resolve(cfg.data.seq_len)
    except TypeError as e:
      _fail(f"model.attention.{kind}: {e}")
    a[kind] = ml_collections.ConfigDict(options.to_dict())


def check_fields(cfg, schema=None, path: str = "") -> None:
  """Every field of cfg exists in the schema (base_config); a misspelled or moved one fails in
  one line naming the nearest valid field."""
  import difflib
  schema = base_config() if schema is None else schema
  for key in cfg.keys():
    full = f"{path}{key}"
    if key in schema:
      if isinstance(schema[key], ml_collections.ConfigDict):
        if not isinstance(cfg[key], (ml_collections.ConfigDict, dict)):
          _fail(f"{full}={cfg[key]!r} must be a group of fields ({', '.join(schema[key].keys())})")
        check_fields(cfg[key], schema[key], full + ".")
      continue
    if full in MOVED_FIELDS:
      _fail(f"{full} is not a field any more; it is now {MOVED_FIELDS[full]}")
    candidates = {k: f"{path}{k}" for k in schema.keys()}
    if path == "model.attention.":  # options live per kind: window -> sliding_window.window
      for kind in schema.keys():
        if isinstance(schema[kind], ml_collections.ConfigDict):
          for f in schema[kind].keys():
            candidates.setdefault(f, f"{path}{kind}.{f}")
    near = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    hint = f" (did you mean {candidates[near[0]]}?)" if near else ""
    _fail(f"config field {full} does not exist{hint}")


def finalize(cfg) -> ml_collections.ConfigDict:
  """The resolved config of a run: unknown fields rejected, every attention option filled in
  (sizes derived from data.seq_len after the command-line overrides), everything validated.
  This is what the run, its logs, checkpoints and eval results record."""
  check_fields(cfg)
  resolved = ml_collections.ConfigDict(cfg.to_dict())
  resolve_attention(resolved)
  resolve_vocab(resolved)
  _validate_resolved(resolved)
  if resolved.model.head_dim is None:
    resolved.model.head_dim = resolved.model.d_model // resolved.model.num_heads
  return resolved


def tokenizer_of(cfg):
  """The tokenizer of data.tokenizer, or ConfigError in one line."""
  from lmtrain.data.tokenizers import TokenizerError, get_tokenizer
  try:
    return get_tokenizer(cfg.data.tokenizer)
  except TokenizerError as e:
    _fail(f"data.tokenizer={cfg.data.tokenizer!r}: {e}")


def resolve_vocab(cfg) -> None:
  """In place: model.vocab_size 0 becomes the tokenizer's vocabulary padded up to a multiple of
  128; a given one must hold every id of the tokenizer."""
  from lmtrain.data.tokenizers import VOCAB_MULTIPLE, padded_vocab_size
  tok = tokenizer_of(cfg)
  v = cfg.model.vocab_size
  if v == 0:
    cfg.model.vocab_size = padded_vocab_size(tok.vocab_size)
  elif isinstance(v, int) and 0 < v < tok.vocab_size:
    _fail(f"model.vocab_size={v} is smaller than the tokenizer's {tok.vocab_size} ids "
          f"(data.tokenizer={cfg.data.tokenizer!r}); set model.vocab_size=0 to use the "
          f"tokenizer's, padded to a multiple of {VOCAB_MULTIPLE}")


def validate(cfg) -> ml_collections.ConfigDict:
  """Raises ConfigError (one line) for the first bad value of a whole training config; returns
  the resolved config (see `finalize`)."""
  return finalize(cfg)


def _validate_resolved(cfg) -> None:
  validate_model(cfg)
  d, t = cfg.data, cfg.train
  _one_of(cfg, "data.source", DATA_SOURCES)
  _validate_data_reading(cfg)
  if d.source in ("stdlib", "mqar"):
    if d.path is not None:
      _fail(f"data.path={d.path!r} is not used by data.source={d.source!r} (no files)")
  else:
    if d.path is None:
      _fail(f"data.path must be set for data.source={d.source!r}")
    _check_path_exists("data.path", d.path)
  if d.mqar_vocab_size < 4 or d.mqar_vocab_size > cfg.model.vocab_size:
    _fail(f"data.mqar_vocab_size={d.mqar_vocab_size} must be in [4, model.vocab_size="
          f"{cfg.model.vocab_size}]")
  if not d.mqar_power_a > 0:
    _fail(f"data.mqar_power_a={d.mqar_power_a} must be > 0")
  if d.source == "mqar":
    from lmtrain.data.mqar import max_pairs
    if d.mqar_num_pairs is None:
      _fail("data.mqar_num_pairs must be set for data.source='mqar' (a count or a comma list)")
    if d.seq_len % 2:
      _fail(f"data.seq_len={d.seq_len} must be even for data.source='mqar'")
    most = max_pairs(d.seq_len, d.mqar_vocab_size)
    for n in _number_list(cfg, "data.mqar_num_pairs", int) or [0]:
      if not 1 <= n <= most:
        _fail(f"data.mqar_num_pairs={d.mqar_num_pairs!r} has {n}, which does not fit "
              f"data.seq_len={d.seq_len} and data.mqar_vocab_size={d.mqar_vocab_size} "
              f"(1..{most})")
  elif d.mqar_num_pairs is not None:
    _fail(f"data.mqar_num_pairs={d.mqar_num_pairs} is only used by data.source='mqar'")
  if d.eval_path is not None:
    if d.source in ("stdlib", "mqar", "arrayrecord"):
      _fail(f"data.eval_path={d.eval_path!r} is not used by data.source={d.source!r}")
    _check_path_exists("data.eval_path", d.eval_path)
  for f in ("seq_len", "batch_size", "eval_batches", "shuffle_window"):
    _positive(cfg, f"data.{f}")
  if not isinstance(d.heldout_percent, (int, float)) or not 0 < d.heldout_percent < 100:
    _fail(f"data.heldout_percent={d.heldout_percent!r} must be in (0, 100)")
  for f in ("steps", "lr", "grad_accum", "log_every", "eval_every", "checkpoint_every",
            "keep_checkpoints"):
    _positive(cfg, f"train.{f}")
  for f in ("warmup_steps", "weight_decay", "grad_clip", "end_lr_ratio"):
    _positive(cfg, f"train.{f}", allow_zero=True)
  if t.warmup_steps > t.steps:
    _fail(f"train.warmup_steps={t.warmup_steps} exceeds train.steps={t.steps}")
  profile_window(cfg)
  if d.batch_size % t.grad_accum:
    _fail(f"train.grad_accum={t.grad_accum} does not divide data.batch_size={d.batch_size}")
  validate_memory(cfg)
  validate_eval(cfg)
  for axis in MESH_AXES:
    size = cfg.mesh[axis]
    if size == 0 or size < -1:
      _fail(f"mesh.{axis}={size} must be a positive size or -1 (the rest)")
  if sum(cfg.mesh[a] == -1 for a in MESH_AXES) > 1:
    _fail("mesh: at most one axis may be -1, got " +
          ", ".join(f"{a}={cfg.mesh[a]}" for a in MESH_AXES))


def validate_memory(cfg) -> None:
  """train.remat, train.scan_layers, train.mlp_chunk and train.loss_chunk."""
  from lmtrain.model import stack
  t = cfg.train
  _one_of(cfg, "train.remat", tuple(stack.REMAT_POLICIES))
  if not isinstance(t.scan_layers, bool):
    _fail(f"train.scan_layers={t.scan_layers!r} must be True or False")
  for field, zero in (("loss_chunk", "auto"), ("mlp_chunk", "the whole sequence")):
    value = t[field]
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
      _fail(f"train.{field}={value!r} must be an integer >= 0 (0 = {zero})")
  if t.scan_layers:
    from lmtrain.model.transformer import stacking_error
    why = stacking_error(cfg.model)
    if why:
      _fail(f"train.scan_layers=True: {why}")
def _validate_data_reading(cfg) -> None:
  """The fields of how documents are read: pieces, alignment, prepared shards."""
  d = cfg.data
  if not isinstance(d.piece_bytes, int) or d.piece_bytes < 256:
    _fail(f"data.piece_bytes={d.piece_bytes!r} must be at least 256")
  a = d.align_documents
  if not isinstance(a, int) or a < 0 or a > d.seq_len or (a and d.seq_len % a):
    _fail(f"data.align_documents={a!r} must be 0 (off) or divide data.seq_len={d.seq_len}")
  if d.source == "arrayrecord" and d.path is not None and os.path.isdir(d.path):
    from lmtrain.data.errors import DataError
    from lmtrain.data.shards import read_manifest
    try:
      manifest = read_manifest(d.path)
    except DataError as e:
      _fail(str(e))
    made = manifest["tokenizer"]
    if made["sha256"] != tokenizer_of(cfg).sha256:
      _fail(f"data.tokenizer={d.tokenizer!r} is not the tokenizer the shards in {d.path!r} were "
            f"prepared with ({made['spec']!r}, sha256 {made['sha256'][:12]})")
    pct = manifest["source"]["heldout_percent"]
    if d.heldout_percent != pct and not manifest["source"].get("eval_path"):
      _fail(f"data.heldout_percent={d.heldout_percent} differs from the split the shards in "
            f"{d.path!r} were prepared with ({pct})")


def profile_window(cfg) -> tuple[int, int] | None:
  """train.profile_steps "N:M" as (N, M) with 0 <= N < M <= train.steps; None when unset."""
  text = str(cfg.train.profile_steps).strip()
  if not text:
    return None
  try:
    start, stop = (int(x) for x in text.split(":"))
  except ValueError:
    _fail(f"train.profile_steps={text!r} is not of the form N:M (e.g. 10:15)")
  if not 0 <= start < stop <= cfg.train.steps:
    _fail(f"train.profile_steps={text!r} must have 0 <= N < M <= train.steps={cfg.train.steps}")
  return start, stop


EVAL_NAMES = ("ppl", "niah", "extrapolation", "mqar")


def _number_list(cfg, path: str, kind, *, low=None, high=None):
  text = _get(cfg, path)
  try:
    values = [kind(x) for x in str(text).split(",") if x.strip()]
  except ValueError:
    _fail(f"{path}={text!r} is not a comma-separated list of {kind.__name__}s")
  for v in values:
    if (low is not None and v < low) or (high is not None and v > high):
      _fail(f"{path}={text!r} has {v}, outside [{low}, {high if high is not None else 'inf'}]")
  return values


TEXT_EVALS = ("ppl", "niah", "extrapolation")  # evals that read the data source's documents


def check_evals(cfg, names, where: str = "eval.evals") -> None:
  """The evals `names` can run on this config: fails before anything compiles when one cannot."""
  for name in names:
    if name not in EVAL_NAMES:
      _fail(f"{where} has {name!r}, not one of {', '.join(EVAL_NAMES)} (or all)")
    if name in TEXT_EVALS and cfg.data.source == "mqar":
      _fail(f"{where} has {name!r}, which needs text documents, but data.source='mqar' (a "
            "synthetic task; its eval is mqar)")
  if "niah" in names:
    from lmtrain.data.tokenizers import get_tokenizer
    from lmtrain.evals import needle
    shortest = needle.prompt_tokens(get_tokenizer(cfg.data.tokenizer)) + 16
    lengths = _number_list(cfg, "eval.lengths", int, low=1)
    if lengths and min(lengths) < shortest:
      _fail(f"eval.lengths={cfg.eval.lengths!r}: NIAH contexts need at least {shortest} tokens "
            f"(its prompt takes {shortest - 16})")
    if not lengths and 2 * cfg.data.seq_len < shortest:
      _fail(f"data.seq_len={cfg.data.seq_len}: the default NIAH lengths (up to 2 x seq_len) are "
            f"shorter than its {shortest}-token minimum; set eval.lengths")


def eval_list(text: str) -> list[str]:
  names = [x.strip() for x in str(text).split(",") if x.strip()]
  return list(EVAL_NAMES) if names == ["all"] else names


def validate_eval(cfg) -> None:
  e = cfg.eval
  check_evals(cfg, eval_list(e.evals))
  _number_list(cfg, "eval.lengths", int, low=1)
  _number_list(cfg, "eval.niah_depths", float, low=0.0, high=1.0)
  _number_list(cfg, "eval.extrapolation_factors", float, low=1e-9)
  _number_list(cfg, "eval.mqar_pairs", int, low=1, high=128)
  _number_list(cfg, "eval.mqar_lengths", int, low=4)
  for f in ("ppl_tokens", "niah_samples", "extrapolation_tokens", "mqar_samples",
            "batch_tokens"):
    _positive(cfg, f"eval.{f}")
  for f in ("ppl_window", "ppl_stride", "max_length"):
    _positive(cfg, f"eval.{f}", allow_zero=True)
  window = e.ppl_window or cfg.data.seq_len
  if e.ppl_stride > window:
    _fail(f"eval.ppl_stride={e.ppl_stride} exceeds the window ({window})")
  for filler in [f.strip() for f in e.niah_fillers.split(",") if f.strip()]:
    if filler not in ("synthetic", "natural"):
      _fail(f"eval.niah_fillers={e.niah_fillers!r} has {filler!r}, not synthetic or natural")
  if e.niah_mode not in ("teacher_forced", "generate"):
    _fail(f"eval.niah_mode={e.niah_mode!r} is not one of teacher_forced, generate")
  if not 0.0 <= e.niah_threshold <= 1.0:
    _fail(f"eval.niah_threshold={e.niah_threshold} must be in [0, 1]")


def _check_path_exists(name: str, path: str) -> None:
  import glob
  if not (os.path.exists(path) or glob.glob(path)):
    _fail(f"{name}={path!r} does not exist")


def attention_variants() -> tuple[str, ...]:
  from lmtrain.model import mixers
  return tuple(mixers.variants())


def apply_attention_variant(c, name: str) -> None:
  """Sets model.attention for a named variant of the example configs (each mixer declares its
  own, lmtrain/model/mixers). Sizes that derive from data.seq_len stay unset here and are
  resolved by `finalize` after the command-line overrides."""
  from lmtrain.model import mixers
  variants = mixers.variants()
  if name not in variants:
    raise ConfigError(f"attention variant {name!r} is not one of {', '.join(variants)}")
  spec = variants[name]
  a = c.model.attention
  a.kind = spec["kind"]
  a.layer_pattern = spec["layer_pattern"]
  for kind, options in spec["options"].items():
    a[kind].update(options)
