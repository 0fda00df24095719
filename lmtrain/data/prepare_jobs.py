"""The work of `python -m lmtrain.prepare`: a plan of jobs, the jobs (one shard each, run in
worker processes), and the manifest that joins them (layout: lmtrain.data.shards).

A job is consecutive units of one split, about shard_bytes of source; it writes its shard, the
shard's unit and document tables, and last a done marker (shard-NNNNN.json), so an interrupted
prepare resumes with the jobs that have no marker. plan.json records the settings: a second run
into the same directory must have the same ones.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time

import ml_collections
import numpy as np

from lmtrain.data import shards as shards_lib
from lmtrain.data.errors import DataError
from lmtrain.data.split import SPLITS

PLAN = "plan.json"


def data_settings(data_cfg) -> dict:
  """The fields of data that decide what prepare writes."""
  keys = ("source", "path", "eval_path", "text_field", "tokenizer", "heldout_percent",
          "piece_bytes", "skip_bad_records")
  return {k: data_cfg.get(k) for k in keys}


def make_plan(data_cfg, tokenizer, shard_bytes: int) -> dict:
  """Jobs: consecutive units of one split of about shard_bytes of source each."""
  from lmtrain.data.sources import raw_corpus
  jobs, total = [], 0
  for split in SPLITS:
    corpus = raw_corpus(data_cfg, split, tokenizer)
    start, size, index = 0, 0, 0
    for i, ref in enumerate(corpus.units):
      size += corpus.unit_bytes(ref)
      if size >= shard_bytes or i == len(corpus.units) - 1:
        jobs.append({"split": split, "index": index, "units": [start, i + 1], "bytes": size})
        total += size
        start, size, index = i + 1, 0, index + 1
  return {"data": data_settings(data_cfg), "tokenizer_sha256": tokenizer.sha256,
          "jobs": jobs, "bytes": total}


def shard_name(job: dict) -> str:
  return f"{job['split']}/shard-{job['index']:05d}"


_WORKER: dict = {}


def _init_worker(data: dict, out: str, counter) -> None:
  from lmtrain.data.sources import raw_corpus
  from lmtrain.data.tokenizers import get_tokenizer
  d = ml_collections.ConfigDict(data)
  tok = get_tokenizer(d.tokenizer)
  _WORKER.update(out=out, counter=counter, skip=d.skip_bad_records, tokenizer=tok,
                 corpora={s: raw_corpus(d, s, tok) for s in SPLITS})


def run_job(job: dict) -> dict:
  """Tokenizes one job's units into its shard; writes the shard's tables and its done marker.
  Returns {"tokens", "docs", "skipped"}; raises DataError for a bad record (unless skipping)."""
  w = _WORKER
  corpus, out = w["corpora"][job["split"]], w["out"]
  name = shard_name(job)
  writer = shards_lib.ShardWriter(os.path.join(out, name + ".array_record"),
                                  shards_lib.token_dtype(w["tokenizer"].vocab_size))
  tokens = skipped = 0
  lo, hi = job["units"]
  for ref in corpus.units[lo:hi]:
    unit = corpus.open(ref)
    for i in range(unit.num_docs):
      try:
        doc = unit.doc(i)
      except DataError as e:
        if not w["skip"]:
          raise
        skipped += 1
        print(f"lmtrain: warning: skipped a bad record: {e}", file=sys.stderr, flush=True)
        continue
      tokens += writer.add_doc(p.tokens for p in doc.pieces())
    writer.end_unit()
    if w["counter"] is not None:
      with w["counter"].get_lock():
        w["counter"].value += corpus.unit_bytes(ref)
  result = writer.close()
  base = os.path.join(out, name)
  np.save(base + ".units.npy", np.asarray(result["units"], np.int64).reshape(-1, 3))
  np.save(base + ".docs.npy", np.asarray(result["docs"], np.int64))
  done = {"records": result["records"], "bytes": result["bytes"], "tokens": tokens,
          "docs": len(result["docs"]), "skipped": skipped}
  with open(base + ".json.tmp", "w") as f:
    json.dump(done, f)
  os.replace(base + ".json.tmp", base + ".json")
  return done


def _done(out: str, job: dict) -> dict | None:
  path = os.path.join(out, shard_name(job) + ".json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_manifest(out: str, plan: dict, tokenizer) -> dict:
  """Joins the jobs' tables into each split's units.npy / docs.npy and writes manifest.json."""
  splits = {}
  for split in SPLITS:
    jobs = [j for j in plan["jobs"] if j["split"] == split]
    units, docs, shard_list = [], [], []
    records = ndocs = tokens = 0
    for job in jobs:
      done = _done(out, job)
      base = os.path.join(out, shard_name(job))
      u = np.load(base + ".units.npy")
      u[:, 0] += ndocs
      units.append(u)
      docs.append(np.load(base + ".docs.npy") + records)
      shard_list.append({"file": shard_name(job) + ".array_record", "records": done["records"],
                         "bytes": done["bytes"]})
      records += done["records"]
      ndocs += done["docs"]
      tokens += done["tokens"]
    os.makedirs(os.path.join(out, split), exist_ok=True)
    np.save(os.path.join(out, split, "units.npy"),
            np.concatenate(units) if units else np.zeros((0, 3), np.int64))
    np.save(os.path.join(out, split, "docs.npy"),
            np.concatenate(docs + [np.asarray([records], np.int64)]))
    splits[split] = {"shards": shard_list, "units": int(sum(len(u) for u in units)),
                     "docs": ndocs, "tokens": tokens, "records": records}
  d = plan["data"]
  manifest = {
      "format": shards_lib.FORMAT,
      "tokenizer": {"spec": d["tokenizer"], "sha256": tokenizer.sha256,
                    "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id,
                    "eos_id": tokenizer.eos_id},
      "source": {k: d[k] for k in ("source", "path", "eval_path", "text_field",
                                   "heldout_percent", "piece_bytes")},
      "dtype": shards_lib.token_dtype(tokenizer.vocab_size).str,
      "splits": splits,
      "skipped_records": sum((_done(out, j) or {}).get("skipped", 0) for j in plan["jobs"]),
  }
  tmp = os.path.join(out, shards_lib.MANIFEST + ".tmp")
  with open(tmp, "w") as f:
    json.dump(manifest, f, indent=2)
  os.replace(tmp, os.path.join(out, shards_lib.MANIFEST))
  return manifest


class _Progress:
  """One updating line on stderr: done / total MiB, rate, ETA (a line per 10% off a TTY). The
  total is the source bytes of both splits' units: a JSON lines or Parquet source is read once
  per split (each keeps its own documents), a file source once."""

  def __init__(self, total: int, already: int):
    self.total, self.start, self.t0 = max(total, 1), already, time.time()
    self.tty = sys.stderr.isatty()
    self._last_decile = -1

  def show(self, done: int, final: bool = False) -> None:
    frac = min(done / self.total, 1.0)
    rate = (done - self.start) / max(time.time() - self.t0, 1e-9)
    eta = f"{(self.total - done) / rate:.0f}s" if rate > 0 else "?"
    bar = "#" * int(frac * 30) + "." * (30 - int(frac * 30))
    line = (f"prepare: [{bar}] {frac:6.1%} {done / 2**20:,.0f}/{self.total / 2**20:,.0f} MiB "
            f"read, {rate / 2**20:.1f} MiB/s, ETA {eta}")
    if self.tty:
      print("\r" + line, end="\n" if final else "", file=sys.stderr, flush=True)
    elif int(frac * 10) > self._last_decile:  # off a terminal: a line per 10%
      self._last_decile = int(frac * 10)
      print(line, file=sys.stderr, flush=True)


def prepare(cfg, out: str, *, workers: int = 0, shard_mb: int = 64,
            progress: bool = True) -> dict:
  """Tokenizes cfg.data's source into shards in `out`; returns the manifest."""
  from lmtrain.data.tokenizers import get_tokenizer
  if cfg.data.source not in ("stdlib", "text", "jsonl", "parquet"):
    raise DataError(f"data.source={cfg.data.source!r} cannot be prepared (stdlib, text, jsonl "
                    "or parquet)")
  tok = get_tokenizer(cfg.data.tokenizer)
  os.makedirs(out, exist_ok=True)
  plan = make_plan(cfg.data, tok, shard_mb << 20)
  plan_path = os.path.join(out, PLAN)
  if os.path.isfile(plan_path):
    with open(plan_path) as f:
      old = json.load(f)
    if old != json.loads(json.dumps(plan)):
      raise DataError(f"{out} holds a prepare of other data or settings ({PLAN} differs); "
                      "use another --out or remove it")
  else:
    with open(plan_path, "w") as f:
      json.dump(plan, f, indent=2)
  for split in SPLITS:
    os.makedirs(os.path.join(out, split), exist_ok=True)
  todo = [j for j in plan["jobs"] if _done(out, j) is None]
  already = plan["bytes"] - sum(j["bytes"] for j in todo)
  bar = _Progress(plan["bytes"], already) if progress else None
  workers = max(1, min(workers or os.cpu_count() or 1, len(todo) or 1))
  data = cfg.data.to_dict()
  if workers == 1:
    _init_worker(data, out, None)
    done = already
    for job in todo:
      run_job(job)
      done += job["bytes"]
      if bar:
        bar.show(done)
  else:
    ctx = multiprocessing.get_context("spawn")  # no fork of a process with threads
    counter = ctx.Value("q", already)
    with ctx.Pool(workers, initializer=_init_worker, initargs=(data, out, counter)) as pool:
      pending = pool.map_async(run_job, todo, chunksize=1)
      while not pending.ready():
        pending.wait(0.5)
        if bar:
          bar.show(counter.value)
      pending.get()  # re-raises a worker's error
  if bar:
    bar.show(plan["bytes"], final=True)
  return write_manifest(out, plan, tok)


