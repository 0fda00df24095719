"""What a token mixer declares: its options, parameters, forward, FLOPs, sharding support, ready
variants and decoding interface. Each kind subclasses `Mixer` in its own module.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, ClassVar

from flax import nnx

from lmtrain.config_error import ConfigError


@dataclasses.dataclass(frozen=True)
class Context:
  """What validation may look at besides the options: the model's sizes, the training length
  and the implementation asked for."""
  kind: str
  dims: Any  # lmtrain.model.dims.ModelDims
  seq_len: int
  impl: str
  dtype: str = "float32"  # model.dtype, the compute dtype the kernels see

  @property
  def backend(self) -> str:
    """The JAX backend an explicit impl would run on (asked only when it matters)."""
    import jax
    return jax.default_backend()

  def fail(self, field: str, value, message: str) -> typing.NoReturn:
    raise ConfigError(f"model.attention.{self.kind}.{field}={value!r} {message}")

  def positive(self, options, *fields: str, allow_zero: bool = False) -> None:
    for field in fields:
      value = getattr(options, field)
      if not isinstance(value, int) or isinstance(value, bool) or value < (0 if allow_zero else 1):
        self.fail(field, value, f"must be an integer {'>= 0' if allow_zero else '> 0'}")

  def one_of(self, options, field: str, allowed) -> None:
    value = getattr(options, field)
    if value not in allowed:
      self.fail(field, value, f"is not one of {', '.join(map(str, allowed))}")


@dataclasses.dataclass(frozen=True)
class MixerOptions:
  """Base of every kind's options (a frozen dataclass: hashable, so jit treats it as static).

  A field whose default is None and whose type is `int | None` is a size derived from the
  training length: `resolve(seq_len)` fills it after the command-line overrides, and the
  resolved value is what the run's config records.
  """

  def resolve(self, seq_len: int) -> "MixerOptions":
    del seq_len
    return self

  def validate(self, ctx: Context) -> None:
    del ctx

  @classmethod
  def config_fields(cls) -> dict[str, Any]:
    """field -> default for the config schema; derived sizes as typed placeholders."""
    from ml_collections import config_dict
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
      if f.default is None:
        out[f.name] = config_dict.placeholder(_base_type(hints[f.name]))
      else:
        out[f.name] = f.default
    return out

  @classmethod
  def from_config(cls, sub) -> "MixerOptions":
    """From the config sub-dict `model.attention.<kind>` (missing fields take defaults)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {} if sub is None else {k: v for k, v in dict(sub).items() if k in names}
    return cls(**values)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _base_type(hint):
  """int | None -> int (the type a placeholder checks overrides against)."""
  if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0]
  return hint


class Mixer(nnx.Module):
  """A token mixer: x [B, T, D] -> [B, T, D], with the model's positions and segment ids.

  Subclasses set the class attributes and implement `__call__` and `forward_flops`; the
  decoding methods are the interface `lmtrain.generate` uses.
  """
  kind: ClassVar[str] = ""
  Options: ClassVar[type[MixerOptions]] = MixerOptions
  paper: ClassVar[str] = ""  # the citation the README and the compare table show
  group: ClassVar[str] = "other"  # softmax | sparse | linear | other (ordering and summaries)
  kernel_families: ClassVar[tuple[str, ...]] = ()  # pallas_kernels families it calls

  def __init__(self, dims, options: MixerOptions, *, layer: int, impl: str, out_std: float,
               rngs: nnx.Rngs):
    raise NotImplementedError

  def __call__(self, x_BTD, positions_BT, segment_ids_BT):
    raise NotImplementedError

  def at_layer(self, layer) -> None:
    """Called before each forward with the index of the layer being computed: an int, or a
    traced int32 scalar when train.scan_layers runs one module's code for every layer at its
    place in the layer pattern (with that layer's parameters). A mixer whose computation
    depends on its layer index beyond its parameters (diff's lambda_init) reads it here,
    never from a value fixed at construction; the others ignore it."""
    del layer

  # -- declarations read by config validation, FLOP counting, sharding and the sweep ----------

  @classmethod
  def forward_flops(cls, options, dims, seq_len: int) -> float:
    """Forward FLOPs of the token mixing of one layer for one sequence of `seq_len` tokens,
    beyond the parameter matmuls (which lmtrain.flops counts from the parameters)."""
    raise NotImplementedError

  @classmethod
  def check(cls, options, ctx: Context) -> None:
    """Every check of the options in this model; raises ConfigError (one line). An explicit impl
    must take the call (`capability`), so it fails here rather than inside a trace."""
    options.validate(ctx)
    if ctx.impl in ("auto", "reference", "xla"):
      return
    why = cls.capability(options, ctx)
    if why:
      raise ConfigError(f"model.attention.impl={ctx.impl!r} cannot run attention kind "
                        f"{cls.kind!r}: {why}")

  @classmethod
  def capability(cls, options, ctx: Context) -> str | None:
    """None when ctx.impl takes this kind's calls, else why not. Default: the impl must exist
    in every pallas_kernels family the kind calls (`kernel_families`); the families' mixers
    ask pallas_kernels.capabilities with the exact call."""
    import importlib
    if ctx.impl == "cudnn":
      return None if "cudnn" in cls.extra_impls() else "cuDNN runs softmax attention only"
    if not cls.kernel_families:
      return "it has no Pallas kernel (impl auto, xla or reference run it)"
    for family in cls.kernel_families:
      api = importlib.import_module(f"pallas_kernels.{family}.api")
      if api.kernel_for(ctx.impl) is None:
        return f"pallas_kernels.{family} has no such kernel for backend {ctx.backend!r} yet"
    return None

  @classmethod
  def extra_impls(cls) -> tuple[str, ...]:
    """Implementations beyond auto/reference/xla/pallas/interpret* (softmax: cudnn)."""
    return ()

  @classmethod
  def sequence_parallel_error(cls, options) -> str | None:
    """None when mesh.sequence > 1 (context parallelism) runs this kind, else why not."""
    del options
    return f"attention kind {cls.kind!r} has no sequence-parallel form"

  @classmethod
  def ready_variants(cls) -> dict[str, dict]:
    """Named variants for configs/tiny.py:attention=NAME: name -> {"options": {kind: {...}}}
    (and optionally "kind" and "layer_pattern" for hybrids). Default: the kind itself."""
    return {cls.kind: {}}

  # -- decoding (lmtrain.generate) ------------------------------------------------------------

  def init_cache(self, batch: int, max_len: int):
    """The decoding state of this layer for `batch` rows of at most `max_len` tokens."""
    raise NotImplementedError(f"attention kind {self.kind!r} has no decoding cache")

  def prefill(self, x_BTD, positions_BT, segment_ids_BT, lengths_B, cache):
    """The forward pass over right-padded prompts (row b holds lengths_B[b] tokens) that also
    fills `cache` with their state: (y_BTD, cache)."""
    raise NotImplementedError(f"attention kind {self.kind!r} has no prefill")

  def decode(self, x_BD, position_B, cache):
    """One token per row at `position_B`, reading and updating `cache`: (y_BD, cache)."""
    raise NotImplementedError(f"attention kind {self.kind!r} has no decode step")
