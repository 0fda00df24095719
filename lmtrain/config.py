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
DATA_SOURCES = ("stdlib", "text", "jsonl")
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
      shuffle_window=1024,
  )
  c.train = dict(
      steps=300, lr=3e-3, warmup_steps=30, end_lr_ratio=0.1, b1=0.9, b2=0.95,
      weight_decay=0.1, grad_clip=1.0, grad_accum=1, seed=0, log_every=10, eval_every=100,
      checkpoint_every=50, keep_checkpoints=3, async_checkpoints=True,
  )
  c.mesh = dict(data=-1, fsdp=1, tensor=1, sequence=1)
  c.eval = dict(evals="", lengths="")
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
  """Hook for the attention kinds' own fields (filled in with the attention zoo)."""
  del cfg, kinds


def validate(cfg) -> None:
  """Raises ConfigError (one line) for the first bad value of a whole training config."""
  validate_model(cfg)
  d, t = cfg.data, cfg.train
  _one_of(cfg, "data.source", DATA_SOURCES)
  _one_of(cfg, "data.tokenizer", TOKENIZERS)
  if d.source == "stdlib":
    if d.path is not None:
      _fail(f"data.path={d.path!r} is not used by data.source='stdlib' (the embedded corpus)")
  else:
    if d.path is None:
      _fail(f"data.path must be set for data.source={d.source!r}")
    _check_path_exists("data.path", d.path)
  if d.eval_path is not None:
    if d.source == "stdlib":
      _fail(f"data.eval_path={d.eval_path!r} is not used by data.source='stdlib'")
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
  for axis in MESH_AXES:
    size = cfg.mesh[axis]
    if size == 0 or size < -1:
      _fail(f"mesh.{axis}={size} must be a positive size or -1 (the rest)")
  if sum(cfg.mesh[a] == -1 for a in MESH_AXES) > 1:
    _fail("mesh: at most one axis may be -1, got " +
          ", ".join(f"{a}={cfg.mesh[a]}" for a in MESH_AXES))


def _check_path_exists(name: str, path: str) -> None:
  import glob
  if not (os.path.exists(path) or glob.glob(path)):
    _fail(f"{name}={path!r} does not exist")


def apply_attention_variant(c, name: str) -> None:
  """Sets model.attention for a named variant used by the example configs."""
  a = c.model.attention
  if name == "softmax":
    a.kind = "softmax"
  else:
    raise ConfigError(f"attention variant {name!r} is not one of softmax")
