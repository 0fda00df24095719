"""The config schema: defaults, variant parsing, and validation that fails before compiling.

Configs are Python files with `get_config(arg=None)` returning an ml_collections.ConfigDict built
on `base_config()`. `validate(cfg)` raises ConfigError with one line naming the bad value; the
command-line entry points turn it into exit code 2.
"""
from __future__ import annotations

import os

import ml_collections
from ml_collections import config_dict

ATTENTION_KINDS = ("softmax", "linear", "sliding_window", "block_sparse", "moba")
ATTENTION_IMPLS = ("auto", "reference", "xla", "cudnn", "pallas", "interpret", "interpret_gpu")
POSITIONS = ("rope", "alibi", "none")
DTYPES = ("float32", "bfloat16", "float16")
DATA_SOURCES = ("stdlib", "text", "jsonl", "mqar")
TOKENIZERS = ("byte",)
MESH_AXES = ("data", "fsdp", "tensor", "sequence")

# Fields of model.attention that only some kinds read; setting one for another kind is an error.
KIND_FIELDS = {
    "window": ("sliding_window",),
    "block_size": ("block_sparse", "moba"),
    "top_k": ("moba",),
    "local_blocks": ("block_sparse",),
    "global_blocks": ("block_sparse",),
    "stride": ("block_sparse",),
    "feature_map": ("linear",),
    "decay": ("linear",),
    "normalize": ("linear",),
    "chunk_size": ("linear",),
}


# Defaults of the kind-specific fields, applied when a kind that reads them leaves them unset
# (None means the field has no default and must be set).
KIND_DEFAULTS = {
    "window": None, "block_size": None, "top_k": None,
    "local_blocks": 1, "global_blocks": 0, "stride": 0,
    "feature_map": "elu1", "decay": "none", "normalize": True, "chunk_size": 64,
}
FEATURE_MAPS = ("elu1", "relu", "identity")
LINEAR_DECAYS = ("none", "constant", "data_dependent")
# Which kernel family runs each kind (pallas_kernels.<family>).
KIND_FAMILY = {"softmax": "blockwise", "linear": "linear", "sliding_window": "sparse",
               "block_sparse": "sparse", "moba": "sparse"}


def attention_option(attn, field: str):
  """A kind-specific field with its default applied."""
  value = attn[field]
  return KIND_DEFAULTS[field] if value is None else value


class ConfigError(ValueError):
  """A bad config value; the message is one line and names the value."""


def placeholder(kind):
  return config_dict.placeholder(kind)


def base_config() -> ml_collections.ConfigDict:
  """Every field of the schema with its default (names are part of the DESIGN.md contract)."""
  c = ml_collections.ConfigDict()
  c.model = dict(
      vocab_size=258, num_layers=4, d_model=128, num_heads=2, num_kv_heads=1,
      head_dim=placeholder(int), mlp_dim=384, position="rope", rope_theta=10000.0,
      tie_embeddings=False, dtype="float32", dropout_rate=0.0,
      attention=dict(
          kind="softmax", impl="auto", layer_pattern="",
          window=placeholder(int), block_size=placeholder(int), top_k=placeholder(int),
          local_blocks=placeholder(int), global_blocks=placeholder(int), stride=placeholder(int),
          feature_map=placeholder(str), decay=placeholder(str), normalize=placeholder(bool),
          chunk_size=placeholder(int)),
  )
  c.data = dict(
      source="stdlib", path=placeholder(str), eval_path=placeholder(str), text_field="text",
      tokenizer="byte", seq_len=256, batch_size=16, heldout_percent=5, eval_batches=8,
      shuffle_window=1024, mqar_num_pairs=placeholder(int),
  )
  c.train = dict(
      steps=300, lr=3e-3, warmup_steps=30, end_lr_ratio=0.1, b1=0.9, b2=0.95,
      weight_decay=0.1, grad_clip=1.0, grad_accum=1, seed=0, log_every=10, eval_every=100,
      checkpoint_every=50, keep_checkpoints=3, async_checkpoints=True,
  )
  c.mesh = dict(data=-1, fsdp=1, tensor=1, sequence=1)
  c.eval = dict(
      evals="",  # evals also run inside training at train.eval_every, e.g. "ppl,niah"
      lengths="",  # NIAH context lengths, e.g. "128,256,512"; "" = T/2, T, 2T
      ppl_window=0, ppl_stride=0, ppl_tokens=32768,  # 0 = seq_len, window // 2
      niah_depths="0,0.25,0.5,0.75,1", niah_samples=4, niah_fillers="synthetic,natural",
      niah_threshold=0.5,
      extrapolation_factors="0.25,0.5,1,2,4,8,16", extrapolation_tokens=16384, max_length=0,
      mqar_pairs="4,8,16", mqar_lengths="", mqar_samples=64,
      batch_tokens=16384, seed=0,
  )
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
  """Checks the `model` subtree (also used by evaluation and tests)."""
  m = cfg.model
  for f in ("vocab_size", "num_layers", "d_model", "num_heads", "num_kv_heads", "mlp_dim"):
    _positive(cfg, f"model.{f}")
  if m.head_dim is None and m.d_model % m.num_heads:
    _fail(f"model.num_heads={m.num_heads} does not divide model.d_model={m.d_model} "
          "(set model.head_dim to decouple them)")
  if m.head_dim is not None:
    _positive(cfg, "model.head_dim")
  head_dim = m.head_dim or m.d_model // m.num_heads
  if m.num_heads % m.num_kv_heads:
    _fail(f"model.num_kv_heads={m.num_kv_heads} does not divide model.num_heads={m.num_heads}")
  _one_of(cfg, "model.position", POSITIONS)
  if m.position == "rope" and head_dim % 2:
    _fail(f"model.position='rope' needs an even head dim; got {head_dim}")
  _one_of(cfg, "model.dtype", DTYPES)
  if not 0.0 <= m.dropout_rate < 1.0:
    _fail(f"model.dropout_rate={m.dropout_rate!r} must be in [0, 1)")
  a = m.attention
  _one_of(cfg, "model.attention.kind", ATTENTION_KINDS)
  _one_of(cfg, "model.attention.impl", ATTENTION_IMPLS)
  kinds = layer_pattern_kinds(a)
  for kind in kinds:
    if kind not in ATTENTION_KINDS:
      _fail(f"model.attention.layer_pattern={a.layer_pattern!r} has unknown kind {kind!r} "
            f"(kinds: {', '.join(ATTENTION_KINDS)})")
  if a.kind not in kinds:
    _fail(f"model.attention.kind={a.kind!r} is not in layer_pattern={a.layer_pattern!r}")
  for field, users in KIND_FIELDS.items():
    if a[field] is not None and not set(users) & set(kinds):
      _fail(f"model.attention.{field}={a[field]!r} is not used by attention kind "
            f"{'/'.join(kinds)} (only by {', '.join(users)})")
  _validate_kind_fields(cfg, kinds)


def _validate_kind_fields(cfg, kinds) -> None:
  """The fields each kind in use reads: required ones set, values in range."""
  a = cfg.model.attention

  def opt(field):
    return attention_option(a, field)

  def need(field, kind):
    if opt(field) is None:
      _fail(f"model.attention.{field} must be set for attention kind {kind!r}")

  def positive(field):
    if not isinstance(opt(field), int) or opt(field) <= 0:
      _fail(f"model.attention.{field}={opt(field)!r} must be a positive integer")
  if "sliding_window" in kinds:
    need("window", "sliding_window")
    positive("window")
  if "block_sparse" in kinds or "moba" in kinds:
    need("block_size", "block_sparse" if "block_sparse" in kinds else "moba")
    positive("block_size")
  if "block_sparse" in kinds:
    positive("local_blocks")
    for f in ("global_blocks", "stride"):
      if not isinstance(opt(f), int) or opt(f) < 0:
        _fail(f"model.attention.{f}={opt(f)!r} must be an integer >= 0")
  if "moba" in kinds:
    need("top_k", "moba")
    positive("top_k")
  if "linear" in kinds:
    if opt("feature_map") not in FEATURE_MAPS:
      _fail(f"model.attention.feature_map={opt('feature_map')!r} is not one of "
            f"{', '.join(FEATURE_MAPS)}")
    if opt("decay") not in LINEAR_DECAYS:
      _fail(f"model.attention.decay={opt('decay')!r} is not one of {', '.join(LINEAR_DECAYS)}")
    positive("chunk_size")
    if opt("feature_map") == "identity" and opt("normalize"):
      _fail("model.attention.feature_map='identity' with normalize=True divides by a sum that "
            "can be zero or negative; use elu1/relu or set model.attention.normalize=False")
    if cfg.model.position == "alibi":
      _fail("model.position='alibi' does not apply to attention kind 'linear' (use decay)")
  impl = a.impl
  if impl == "cudnn" and set(kinds) - {"softmax"}:
    _fail(f"model.attention.impl='cudnn' only runs kind 'softmax', not "
          f"{', '.join(sorted(set(kinds) - {'softmax'}))}")
  if impl in ("pallas", "interpret", "interpret_gpu"):
    import importlib
    for kind in kinds:
      family = KIND_FAMILY[kind]
      api = importlib.import_module(f"pallas_kernels.{family}.api")
      if api.kernel_for(impl) is None:
        import jax
        _fail(f"model.attention.impl={impl!r}: pallas_kernels.{family} has no such kernel for "
              f"backend {jax.default_backend()!r} yet (needed by attention kind {kind!r})")
      if family != "linear" and cfg.model.position == "alibi":
        _fail(f"model.attention.impl={impl!r}: the Pallas attention kernel does not take "
              "model.position='alibi' yet")


def validate(cfg) -> None:
  """Raises ConfigError (one line) for the first bad value of a whole training config."""
  validate_model(cfg)
  d, t = cfg.data, cfg.train
  _one_of(cfg, "data.source", DATA_SOURCES)
  _one_of(cfg, "data.tokenizer", TOKENIZERS)
  if d.source in ("stdlib", "mqar"):
    if d.path is not None:
      _fail(f"data.path={d.path!r} is not used by data.source={d.source!r} (no files)")
  else:
    if d.path is None:
      _fail(f"data.path must be set for data.source={d.source!r}")
    _check_path_exists("data.path", d.path)
  if d.source == "mqar":
    from lmtrain.data.mqar import max_pairs
    if d.mqar_num_pairs is None:
      _fail("data.mqar_num_pairs must be set for data.source='mqar'")
    if not 1 <= d.mqar_num_pairs <= min(max_pairs(d.seq_len), 128):
      _fail(f"data.mqar_num_pairs={d.mqar_num_pairs} does not fit data.seq_len={d.seq_len} "
            f"(1..{min(max_pairs(d.seq_len), 128)})")
  elif d.mqar_num_pairs is not None:
    _fail(f"data.mqar_num_pairs={d.mqar_num_pairs} is only used by data.source='mqar'")
  if d.eval_path is not None:
    if d.source in ("stdlib", "mqar"):
      _fail(f"data.eval_path={d.eval_path!r} is not used by data.source={d.source!r}")
    _check_path_exists("data.eval_path", d.eval_path)
  if cfg.model.vocab_size < 258 and d.tokenizer == "byte":
    _fail(f"model.vocab_size={cfg.model.vocab_size} is smaller than the byte tokenizer's 258")
  for f in ("seq_len", "batch_size", "eval_batches", "shuffle_window"):
    _positive(cfg, f"data.{f}")
  if not 0 < d.heldout_percent < 100:
    _fail(f"data.heldout_percent={d.heldout_percent!r} must be in (0, 100)")
  for f in ("steps", "lr", "grad_accum", "log_every", "eval_every", "checkpoint_every",
            "keep_checkpoints"):
    _positive(cfg, f"train.{f}")
  for f in ("warmup_steps", "weight_decay", "grad_clip", "end_lr_ratio"):
    _positive(cfg, f"train.{f}", allow_zero=True)
  if t.warmup_steps > t.steps:
    _fail(f"train.warmup_steps={t.warmup_steps} exceeds train.steps={t.steps}")
  if d.batch_size % t.grad_accum:
    _fail(f"train.grad_accum={t.grad_accum} does not divide data.batch_size={d.batch_size}")
  validate_eval(cfg)
  for axis in MESH_AXES:
    size = cfg.mesh[axis]
    if size == 0 or size < -1:
      _fail(f"mesh.{axis}={size} must be a positive size or -1 (the rest)")
  if sum(cfg.mesh[a] == -1 for a in MESH_AXES) > 1:
    _fail("mesh: at most one axis may be -1, got " +
          ", ".join(f"{a}={cfg.mesh[a]}" for a in MESH_AXES))


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


def validate_eval(cfg) -> None:
  e = cfg.eval
  names = [x.strip() for x in e.evals.split(",") if x.strip()]
  for name in names:
    if name not in EVAL_NAMES and name != "all":
      _fail(f"eval.evals={e.evals!r} has {name!r}, not one of {', '.join(EVAL_NAMES)} (or all)")
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
  if not 0.0 <= e.niah_threshold <= 1.0:
    _fail(f"eval.niah_threshold={e.niah_threshold} must be in [0, 1]")


def _check_path_exists(name: str, path: str) -> None:
  import glob
  if not (os.path.exists(path) or glob.glob(path)):
    _fail(f"{name}={path!r} does not exist")


ATTENTION_VARIANTS = ("softmax", "linear", "gla", "sliding_window", "block_sparse", "moba",
                      "hybrid")


def apply_attention_variant(c, name: str) -> None:
  """Sets model.attention for a named variant of the example configs, with fields sized for
  data.seq_len (set seq_len first)."""
  a = c.model.attention
  t = c.data.seq_len
  if name == "softmax":
    a.kind = "softmax"
  elif name == "linear":  # elu(x)+1 features, RetNet-style fixed per-head decay
    a.update(kind="linear", feature_map="elu1", decay="constant")
  elif name == "gla":  # data-dependent gates from a learned projection
    a.update(kind="linear", feature_map="elu1", decay="data_dependent")
  elif name == "sliding_window":
    a.update(kind="sliding_window", window=max(t // 4, 1))
  elif name == "block_sparse":  # local + sink + strided blocks
    a.update(kind="block_sparse", block_size=max(t // 8, 1), local_blocks=2, global_blocks=1,
             stride=4)
  elif name == "moba":
    a.update(kind="moba", block_size=max(t // 8, 1), top_k=3)
  elif name == "hybrid":  # three linear layers to one softmax layer
    a.update(kind="linear", layer_pattern="linear,linear,linear,softmax", feature_map="elu1",
             decay="constant")
  else:
    raise ConfigError(f"attention variant {name!r} is not one of {', '.join(ATTENTION_VARIANTS)}")
