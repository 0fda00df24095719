"""Input pipeline benchmarks (docs/benchmarks.md has the results and commands):

  python scripts/data_bench.py prepare --size_gb 1 --dir /tmp/bench
      a generated JSON lines corpus -> python -m lmtrain.prepare (progress bar) -> tokens/s of
      the input pipeline alone (prepared shards, and the raw file) beside the tiny model's
      training tokens/s on this machine
  python scripts/data_bench.py first_step --size_gb 10 --dir /tmp/bench
      seconds from launching python -m lmtrain.train on a generated JSON lines file to its
      first step
  python scripts/data_bench.py big_document --size_mb 50 --dir /tmp/bench
      peak RSS and step time of the tiny model on a one-document corpus of that size, beside
      the embedded corpus

Generated corpora are JSON lines of text cut from the standard library's sources (documents of
200 B to 20 KB), each with an id so that every line is distinct. Everything generated is
deleted at the end unless --keep. Run from the repository root.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _stdlib_text() -> bytes:
  from lmtrain.data.sources import stdlib_files
  out = []
  for _, path in stdlib_files():
    with open(path, "rb") as f:
      out.append(f.read())
  return b"".join(out)


def generate_jsonl(path: str, size_bytes: int, seed: int = 0) -> int:
  """Writes JSON lines of about size_bytes; returns the number of documents."""
  text = _stdlib_text().decode("utf-8", errors="replace")
  rng = np.random.default_rng(seed)
  pool = []
  for _ in range(4096):  # JSON-encoded slices, reused with distinct ids
    n = int(np.exp(rng.uniform(np.log(200), np.log(20000))))
    start = int(rng.integers(0, len(text) - n))
    pool.append(json.dumps(text[start:start + n]).encode())
  written = docs = 0
  with open(path, "wb", buffering=1 << 24) as f:
    while written < size_bytes:
      for i in rng.integers(0, len(pool), size=4096):
        line = b'{"id": %d, "text": %s}\n' % (docs, pool[i])
        f.write(line)
        written += len(line)
        docs += 1
  return docs


def _tiny_cfg(**data):
  from configs import tiny
  from lmtrain import config as config_lib
  cfg = tiny.get_config()
  cfg.data.update(data)
  return config_lib.finalize(cfg)


def pipeline_rate(cfg, batches: int) -> float:
  """Tokens/s of the input pipeline alone (train_dataset), after a warm-up batch."""
  from lmtrain.data import train_dataset
  it = iter(train_dataset(cfg))
  next(it)
  t0 = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * cfg.data.batch_size * cfg.data.seq_len / (time.perf_counter() - t0)


def train_rate(cfg, steps: int = 10) -> float:
  """Tokens/s of the tiny model's jitted train step alone (compiled and warmed up first)."""
  import jax
  from lmtrain.data import train_dataset
  from lmtrain.trainer import Trainer
  trainer = Trainer.from_config(cfg)
  state = jax.jit(trainer.init_state, static_argnums=0)(0)
  step = jax.jit(trainer.train_step, donate_argnums=0)
  batch = jax.device_put(next(iter(train_dataset(cfg))))
  for _ in range(2):
    state, m = step(state, batch)
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, m = step(state, batch)
  jax.block_until_ready(m)
  return steps * cfg.data.batch_size * cfg.data.seq_len / (time.perf_counter() - t0)


def cmd_prepare(args) -> None:
  os.makedirs(args.dir, exist_ok=True)
  corpus, shards = os.path.join(args.dir, "corpus.jsonl"), os.path.join(args.dir, "shards")
  t0 = time.time()
  docs = generate_jsonl(corpus, int(args.size_gb * 2 ** 30))
  size = os.path.getsize(corpus)
  print(f"generated {corpus}: {size / 2**30:.2f} GiB, {docs:,} documents in "
        f"{time.time() - t0:.0f}s", flush=True)
  t0 = time.time()
  subprocess.run([sys.executable, "-m", "lmtrain.prepare", "--config", "configs/tiny.py",
                  "--config.data.source=jsonl", f"--config.data.path={corpus}", "--out", shards,
                  f"--workers={args.workers}"], cwd=REPO, check=True)
  took = time.time() - t0
  with open(os.path.join(shards, "manifest.json")) as f:
    tokens = sum(s["tokens"] for s in json.load(f)["splits"].values())
  print(f"prepare: {took:.0f}s for {size / 2**30:.2f} GiB: {size / 2**20 / took:.1f} MiB/s, "
        f"{tokens / took / 1e6:.2f}M tokens/s over {args.workers} processes", flush=True)
  prepared = pipeline_rate(_tiny_cfg(source="arrayrecord", path=shards), args.batches)
  raw = pipeline_rate(_tiny_cfg(source="jsonl", path=corpus), args.batches)
  model = train_rate(_tiny_cfg())
  print(f"input pipeline, prepared shards: {prepared:,.0f} tokens/s", flush=True)
  print(f"input pipeline, raw JSON lines:  {raw:,.0f} tokens/s", flush=True)
  print(f"tiny model training step:        {model:,.0f} tokens/s", flush=True)
  print(f"prepared shards feed {prepared / model:.0f}x the training speed "
        f"(raw JSON lines {raw / model:.0f}x)", flush=True)


def _first_step_seconds(extra: list[str], workdir: str) -> float:
  """Seconds from launching python -m lmtrain.train (tiny, one step) to its first step line."""
  shutil.rmtree(workdir, ignore_errors=True)
  cmd = [sys.executable, "-m", "lmtrain.train", "--config", "configs/tiny.py", *extra,
         "--config.train.steps=1", "--config.train.warmup_steps=0",
         "--config.train.log_every=1", "--workdir", workdir]
  t0 = time.time()
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  first = float("nan")
  for line in proc.stdout:
    print("  | " + line.rstrip(), flush=True)
    if first != first and line.startswith("step 1/"):
      first = time.time() - t0
  if proc.wait():
    raise SystemExit(f"lmtrain.train exited with {proc.returncode}")
  return first


def cmd_first_step(args) -> None:
  os.makedirs(args.dir, exist_ok=True)
  corpus = os.path.join(args.dir, "corpus.jsonl")
  t0 = time.time()
  docs = generate_jsonl(corpus, int(args.size_gb * 2 ** 30))
  size = os.path.getsize(corpus) / 2 ** 30
  print(f"generated {corpus}: {size:.2f} GiB, {docs:,} documents in {time.time() - t0:.0f}s",
        flush=True)
  subprocess.run(["sync"], check=False)
  # The data part alone, in this process: the training stream's first batch and the held-out
  # batches (what the trainer reads before compiling).
  from lmtrain.data import heldout_batches, train_dataset
  cfg = _tiny_cfg(source="jsonl", path=corpus)
  t0 = time.time()
  next(iter(train_dataset(cfg)))
  first_batch = time.time() - t0
  heldout_batches(cfg)
  data = time.time() - t0
  print(f"data alone: first training batch {first_batch:.2f}s, with the held-out batches "
        f"{data:.2f}s", flush=True)
  jsonl = _first_step_seconds(["--config.data.source=jsonl", f"--config.data.path={corpus}"],
                              os.path.join(args.dir, "run-jsonl"))
  embedded = _first_step_seconds([], os.path.join(args.dir, "run-embedded"))
  print(f"first step after launch: {jsonl:.1f}s on {size:.1f} GiB of JSON lines, {embedded:.1f}s "
        f"on the embedded corpus (the rest is Python and JAX start-up and the compile)",
        flush=True)


def _run_measured(cmd) -> tuple[float, list[str]]:
  """Runs a command; returns (its peak RSS in MiB, its output lines)."""
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  out = proc.stdout.read().splitlines()
  _, status, usage = os.wait4(proc.pid, 0)
  proc.returncode = os.waitstatus_to_exitcode(status)
  if proc.returncode:
    raise SystemExit("\n".join(out[-20:]))
  return usage.ru_maxrss / 1024, out


def _step_ms(lines: list[str]) -> float:
  """Median step time of the progress lines after the first (compile and warm-up)."""
  times = [float(m.group(1)) for l in lines if (m := re.search(r"\| ([\d.]+) ms/step", l))]
  return float(np.median(times[1:] if len(times) > 1 else times))


def cmd_big_document(args) -> None:
  os.makedirs(args.dir, exist_ok=True)
  text = _stdlib_text()
  doc, held = os.path.join(args.dir, "one_document.txt"), os.path.join(args.dir, "heldout.txt")
  with open(doc, "wb") as f:
    for _ in range(int(args.size_mb * 2 ** 20) // len(text) + 1):
      f.write(text)
    f.truncate(int(args.size_mb * 2 ** 20))
  with open(held, "wb") as f:
    f.write(text[:2 ** 20])
  base = [sys.executable, "-m", "lmtrain.train", "--config", "configs/tiny.py",
          f"--config.train.steps={args.steps}", "--config.train.log_every=5",
          f"--config.train.eval_every={args.steps}",
          f"--config.train.checkpoint_every={args.steps}"]
  results = {}
  for name, extra in (("embedded corpus", []),
                      (f"one {args.size_mb} MB document", [
                          "--config.data.source=text", f"--config.data.path={doc}",
                          f"--config.data.eval_path={held}"])):
    workdir = os.path.join(args.dir, "run-" + name.split()[0])
    shutil.rmtree(workdir, ignore_errors=True)
    rss, lines = _run_measured(base + extra + ["--workdir", workdir])
    results[name] = (rss, _step_ms(lines))
    print(f"{name}: peak RSS {rss:,.0f} MiB, median step {results[name][1]:.0f} ms", flush=True)
  (r0, s0), (r1, s1) = results.values()
  print(f"one document / embedded corpus: peak RSS {r1 / r0:.2f}x, step time {s1 / s0:.2f}x",
        flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(prog="python scripts/data_bench.py")
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("prepare")
  p.add_argument("--size_gb", type=float, default=1.0)
  p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
  p.add_argument("--batches", type=int, default=300)
  f = sub.add_parser("first_step")
  f.add_argument("--size_gb", type=float, default=10.0)
  b = sub.add_parser("big_document")
  b.add_argument("--size_mb", type=float, default=50.0)
  b.add_argument("--steps", type=int, default=60)
  for s in (p, f, b):
    s.add_argument("--dir", required=True,
                   help="where to generate, in DIR/lmtrain-data-bench (deleted afterwards)")
    s.add_argument("--keep", action="store_true", help="keep what was generated")
  args = parser.parse_args()
  args.dir = os.path.join(os.path.abspath(args.dir), "lmtrain-data-bench")  # all that is made
  try:
    {"prepare": cmd_prepare, "first_step": cmd_first_step,
     "big_document": cmd_big_document}[args.command](args)
  finally:
    if not args.keep:
      shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
  main()
