"""Token mixers as plug-ins: one module per attention kind, found by this registry.

A mixer module defines a subclass of `base.Mixer` decorated with `@register`. Every module of
this package (names not starting with "_") is imported on first use of the registry, so adding
a kind is adding one file: config validation, FLOP counting, sharding checks, the sweep, the
comparison and the tests all iterate over `kinds()`. README "Add your own attention" walks
through one.
"""
from __future__ import annotations

import importlib
import pkgutil

from lmtrain.model.mixers.base import Context, Mixer, MixerOptions

__all__ = ["Context", "Mixer", "MixerOptions", "get", "kinds", "register", "variants"]

_REGISTRY: dict[str, type[Mixer]] = {}
_GROUP_ORDER = ("softmax", "sparse", "linear", "other")
_discovered = False


def register(cls: type[Mixer]) -> type[Mixer]:
  """Class decorator: makes `cls.kind` selectable by model.attention.kind."""
  for attr in ("kind", "Options", "paper"):
    if not getattr(cls, attr, None):
      raise TypeError(f"mixer {cls.__name__} must set the class attribute {attr!r}")
  if cls.group not in _GROUP_ORDER:
    raise TypeError(f"mixer {cls.__name__}: group={cls.group!r} is not one of {_GROUP_ORDER}")
  if "forward_flops" not in vars(cls) and not any(
      "forward_flops" in vars(b) for b in cls.__mro__[1:] if b is not Mixer):
    raise TypeError(f"mixer {cls.__name__} must define forward_flops (its MFU count)")
  old = _REGISTRY.get(cls.kind)
  if old is not None and old.__qualname__ != cls.__qualname__:
    raise TypeError(f"attention kind {cls.kind!r} is registered twice ({old.__module__}, "
                    f"{cls.__module__})")
  _REGISTRY[cls.kind] = cls
  return cls


def _discover() -> None:
  global _discovered
  if _discovered:
    return
  _discovered = True
  for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not info.name.startswith("_") and info.name != "base":
      importlib.import_module(f"{__name__}.{info.name}")


def kinds() -> tuple[str, ...]:
  """Every registered kind: softmax first, then sparse, linear-family and other kinds."""
  _discover()
  return tuple(sorted(_REGISTRY, key=lambda k: (_GROUP_ORDER.index(_REGISTRY[k].group),
                                                k != _REGISTRY[k].group, k)))


def get(kind: str) -> type[Mixer]:
  _discover()
  if kind not in _REGISTRY:
    raise KeyError(kind)
  return _REGISTRY[kind]


def variants() -> dict[str, dict]:
  """Ready variants of the example configs (`configs/tiny.py:attention=NAME`), from every
  mixer: name -> {"kind", "layer_pattern", "options": {kind: {field: value}}}."""
  out = {}
  for kind in kinds():
    cls = get(kind)
    # A subclass registered as its own kind (a researcher's variation of softmax, say) does not
    # inherit its parent's named variants, only the default one named after itself.
    owner = next(c for c in cls.__mro__ if "ready_variants" in vars(c))
    inherited = owner is not cls and owner is not Mixer
    for name, spec in (Mixer.ready_variants.__func__(cls) if inherited
                       else cls.ready_variants()).items():
      if name in out:
        raise TypeError(f"attention variant {name!r} is defined by two mixers")
      out[name] = {"kind": spec.get("kind", kind), "layer_pattern": spec.get("layer_pattern", ""),
                   "options": spec.get("options", {})}
  return out
