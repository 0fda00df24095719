"""Tokenize a source once into ArrayRecord shards (lmtrain.data.shards):

  python -m lmtrain.prepare --config configs/tiny.py --config.data.source=jsonl \\
      --config.data.path=corpus.jsonl --out data/corpus-byte [--workers 8]

then train from them with --config.data.source=arrayrecord --config.data.path=data/corpus-byte
(same tokenizer; the held-out split is the one prepared here, by the same stable keys).

Both splits are cut into jobs of whole units (about --shard_mb MiB of source each), one shard per
job, tokenized in parallel over --workers processes with a progress bar. It is resumable: a
finished job leaves a marker, and a second run with the same config does only the rest; the
manifest is written last, so a directory with a manifest is complete.
"""
from __future__ import annotations

import time

from absl import app, flags
from ml_collections import config_flags

from lmtrain import cli
from lmtrain.data import shards as shards_lib
from lmtrain.data.errors import DataError
from lmtrain.data.prepare_jobs import prepare

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/tiny.py",
                                          lock_config=True)
_OUT = flags.DEFINE_string("out", None, "The directory to write the shards to.")
_WORKERS = flags.DEFINE_integer("workers", 0, "Processes (default: the CPU count).")
_SHARD_MB = flags.DEFINE_integer("shard_mb", 64, "Source MiB per job and shard.")


def main(argv):
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  cfg = cli.load_config(_CONFIG)
  if not _OUT.value:
    cli.fail("--out is required (the directory for the shards)")
  if _SHARD_MB.value < 1:
    cli.fail(f"--shard_mb={_SHARD_MB.value} must be at least 1")
  t0 = time.time()
  try:
    manifest = prepare(cfg, _OUT.value, workers=_WORKERS.value, shard_mb=_SHARD_MB.value)
  except DataError as e:
    cli.fail(str(e))
  for split, s in manifest["splits"].items():
    print(f"lmtrain: {split}: {s['docs']:,} documents, {s['tokens']:,} tokens in "
          f"{len(s['shards'])} shard(s)", flush=True)
  print(f"lmtrain: prepared {_OUT.value} in {time.time() - t0:.1f}s (manifest "
        f"{shards_lib.manifest_hash(_OUT.value)}); train with --config.data.source=arrayrecord "
        f"--config.data.path={_OUT.value}", flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags_or_exit)
