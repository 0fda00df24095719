"""Shared command-line plumbing: absl flags with ml_collections config files, and bad input
turned into one line on stderr and exit code 2 before anything compiles."""
from __future__ import annotations

import os
import sys

from absl import flags
from ml_collections import config_flags

from lmtrain import config as config_lib

# The flags every entry point shares, defined once so that train, evaluate and generate can be
# imported into one process (absl refuses a flag defined twice).
CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/tiny.py",
                                         lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "The run's directory (checkpoints, logs).")
STEP = flags.DEFINE_integer("step", None, "evaluate/generate: the checkpoint step (default: the "
                            "latest).")
_ALLOW_MISMATCH = flags.DEFINE_bool(
    "allow_config_mismatch", False,
    "Use a checkpoint whose saved model config differs from --config (results record both).")


def allow_config_mismatch() -> bool:
  return _ALLOW_MISMATCH.value


def fail(message: str, code: int = 2):
  print(f"lmtrain: error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def parse_flags_or_exit(argv):
  """absl's parser, with any flag or config-file error reported in one line (exit 2)."""
  try:
    return flags.FLAGS(argv)
  except config_lib.ConfigError as e:
    fail(str(e))
  except Exception as e:  # flag errors, and errors raised while loading a config file
    fail(_one_line(e))


def one_line(error: Exception) -> str:
  """The first line of an error's message."""
  text = str(error).strip()
  return text.splitlines()[0] if text else ""


def _one_line(error: Exception) -> str:
  """The useful line of an error: for a wrapped traceback, its last line without the type."""
  text = str(error).strip()
  if isinstance(error, (KeyError, AttributeError)):  # ml_collections: an unknown override
    return f"a --config.* override names a field that does not exist: {text.strip(chr(34))}"
  if "Traceback (most recent call last)" in text:
    last = text.splitlines()[-1]
    name, _, message = last.partition(": ")
    return message if message and " " not in name else last
  return " ".join(text.split())


def load_config(config_flag_holder, *, required: bool = True):
  """The parsed, resolved --config (ml_collections loads the file lazily), or exit 2 with one
  line; None when it was not given and is not required."""
  given = flags.FLAGS["config"].present
  filename = str(flags.FLAGS["config"].config_filename or "").split(":")[0] if given else ""
  if not filename:
    if not required:
      return None
    fail("--config is required (e.g. --config configs/tiny.py)")
  if not os.path.isfile(filename):
    fail(f"--config file {filename!r} does not exist")
  try:
    cfg = config_flag_holder.value
  except config_lib.ConfigError as e:
    fail(str(e))
  except (AttributeError, KeyError) as e:
    fail(f"--config override names a field that does not exist: {e}")
  except Exception as e:
    fail(f"--config: {_one_line(e)}")
  if cfg is None:
    if not required:
      return None
    fail("--config is required (e.g. --config configs/tiny.py)")
  return validated(cfg)


def validated(cfg):
  """The resolved config (lmtrain.config.finalize), or exit 2 with one line."""
  try:
    return config_lib.finalize(cfg)
  except config_lib.ConfigError as e:
    fail(str(e))


def start(argv, config_holder, workdir_flag, *, config_required: bool = True):
  """The common start of the entry points: quiet logs, no stray arguments, a valid config and a
  workdir. Returns (cfg, workdir) or exits 2 with one line."""
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])}")
  cfg = load_config(config_holder, required=config_required)
  if not workdir_flag.value:
    fail("--workdir is required")
  return cfg, workdir_flag.value


def run(main) -> None:
  """app.run(main) with one-line flag errors, and Ctrl-C at any moment (the compile included)
  ending quietly with exit code 130."""
  from absl import app
  try:
    app.run(main, flags_parser=parse_flags_or_exit)
  except KeyboardInterrupt:
    print("lmtrain: interrupted", file=sys.stderr, flush=True)
    sys.exit(130)
