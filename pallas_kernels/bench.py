"""Side-by-side attention benchmarks: python -m pallas_kernels.bench --family blockwise|linear|sparse

Times forward and forward+backward (median of --iters runs after a warm-up compile) of our
implementations and the peers that are importable here, at a fixed number of tokens per batch
(batch = tokens / length), and prints one table per family with milliseconds, TFLOP/s (softmax
kinds) or tokens/s (linear), and our ratio to the best peer. --json writes the rows.

FLOPs are the useful work: causal softmax forward 2 * B * H * T^2 * D (half of the full
4 * B * H * T^2 * D), forward+backward 3.5x that (FlashAttention-2's count); sparse kinds count
their kept query-key pairs.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def _time(fn, args, iters: int) -> float:
  out = fn(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times) * 1e3


def _fwd_bwd(attn):
  def loss(q, k, v, cot):
    return jnp.sum(attn(q, k, v).astype(jnp.float32) * cot)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _inputs(b, t, h, hkv, d, dtype, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (b, t, h, d), dtype)
  k = jax.random.normal(keys[1], (b, t, hkv, d), dtype)
  v = jax.random.normal(keys[2], (b, t, hkv, d), dtype)
  cot = jax.random.normal(keys[3], (b, t, h, d), jnp.float32)
  return q, k, v, cot


def _blockwise_impls():
  from pallas_kernels import blockwise_attention
  from pallas_kernels.blockwise.api import kernel_for
  impls = {}
  if kernel_for("pallas") is not None:
    impls["ours (pallas)"] = functools.partial(blockwise_attention, impl="pallas")
  else:
    impls["ours (reference)"] = functools.partial(blockwise_attention, impl="reference")
  if jax.default_backend() == "gpu":
    impls["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                  implementation="cudnn")
  impls["xla"] = functools.partial(blockwise_attention, impl="xla")
  try:
    import tokamax
    impls["tokamax (mosaic)"] = lambda q, k, v: tokamax.dot_product_attention(
        q, k, v, is_causal=True, implementation="mosaic")
  except Exception:  # not installed, or no such implementation here
    pass
  return impls


def _run(family_impls, shapes, flops_fn, iters, skip_errors=True):
  rows = []
  for (b, t, h, hkv, d, dtype) in shapes:
    q, k, v, cot = _inputs(b, t, h, hkv, d, dtype)
    for name, attn in family_impls.items():
      row = {"impl": name, "batch": b, "length": t, "heads": h, "kv_heads": hkv, "head_dim": d,
             "dtype": jnp.dtype(dtype).name}
      try:
        row["fwd_ms"] = _time(jax.jit(attn), (q, k, v), iters)
        row["fwd_bwd_ms"] = _time(_fwd_bwd(attn), (q, k, v, cot), iters)
      except Exception as e:  # noqa: BLE001 - a peer that cannot run a shape is reported
        if not skip_errors:
          raise
        row["error"] = " ".join(str(e).split())[:160]
      fl = flops_fn(b, t, h, d)
      if fl and "fwd_ms" in row:
        row["fwd_tflops"] = fl / row["fwd_ms"] / 1e9
        row["fwd_bwd_tflops"] = 3.5 * fl / row["fwd_bwd_ms"] / 1e9
      if "fwd_bwd_ms" in row:
        row["tokens_per_s"] = b * t / row["fwd_bwd_ms"] * 1e3
      rows.append(row)
  return rows


def _ratios(rows):
  """Our fwd / fwd+bwd speed over the best peer's, per length."""
  out = []
  for t in sorted({r["length"] for r in rows}):
    at = [r for r in rows if r["length"] == t and "fwd_ms" in r]
    ours = [r for r in at if r["impl"].startswith("ours")]
    peers = [r for r in at if not r["impl"].startswith("ours")]
    if ours and peers:
      best_f = min(p["fwd_ms"] for p in peers)
      best_fb = min(p["fwd_bwd_ms"] for p in peers)
      out.append({"length": t, "fwd_ratio": best_f / ours[0]["fwd_ms"],
                  "fwd_bwd_ratio": best_fb / ours[0]["fwd_bwd_ms"]})
  return out


def _print(rows, ratios, title):
  print(f"\n## {title} ({jax.devices()[0].device_kind}, jax {jax.__version__})")
  print("| impl | B x T | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | tokens/s |")
  print("|---|---|---|---|---|---|---|")
  fmt = lambda x, s=".2f": "-" if x is None else format(x, s)
  for r in rows:
    if "error" in r:
      print(f"| {r['impl']} | {r['batch']} x {r['length']} | error: {r['error']} |||||")
      continue
    print(f"| {r['impl']} | {r['batch']} x {r['length']} | {fmt(r['fwd_ms'])} | "
          f"{fmt(r.get('fwd_tflops'), '.1f')} | {fmt(r['fwd_bwd_ms'])} | "
          f"{fmt(r.get('fwd_bwd_tflops'), '.1f')} | {fmt(r['tokens_per_s'], ',.0f')} |")
  for x in ratios:
    print(f"ours / best peer at T={x['length']}: forward {x['fwd_ratio']:.2f}x, "
          f"forward+backward {x['fwd_bwd_ratio']:.2f}x")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m pallas_kernels.bench", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--family", choices=["blockwise", "linear", "sparse"], required=True)
  parser.add_argument("--lengths", default="2048,8192,32768")
  parser.add_argument("--tokens", type=int, default=32768, help="tokens per batch")
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--kv-heads", type=int, default=None)
  parser.add_argument("--head-dim", type=int, default=128)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--json", default=None, help="write the rows here")
  args = parser.parse_args(argv)
  dtype = jnp.dtype(args.dtype)
  hkv = args.kv_heads or args.heads
  shapes = [(max(args.tokens // t, 1), t, args.heads, hkv, args.head_dim, dtype)
            for t in (int(x) for x in args.lengths.split(","))]
  if args.family == "blockwise":
    rows = _run(_blockwise_impls(), shapes, lambda b, t, h, d: 2.0 * b * h * t * t * d,
                args.iters)
  elif args.family == "linear":
    from pallas_kernels import linear_attention
    from pallas_kernels.linear.api import kernel_for
    decay = -jnp.linspace(0.01, 0.1, args.heads)
    impls = {"ours (xla chunked)": functools.partial(linear_attention, decay=decay, impl="xla")}
    if kernel_for("pallas") is not None:
      impls = {"ours (pallas)": functools.partial(linear_attention, decay=decay, impl="pallas"),
               "xla chunked": impls["ours (xla chunked)"]}
    rows = _run(impls, shapes, lambda *a: None, args.iters)
  else:
    from pallas_kernels import MoBA, SlidingWindow, sparse_attention
    impls = {
        "ours sliding window 1024": functools.partial(sparse_attention,
                                                      pattern=SlidingWindow(1024)),
        "ours MoBA 512/top4": functools.partial(sparse_attention, pattern=MoBA(512, 4)),
    }
    if jax.default_backend() == "gpu":
      impls["cudnn sliding window 1024"] = lambda q, k, v: jax.nn.dot_product_attention(
          q, k, v, is_causal=True, local_window_size=(1023, 0), implementation="cudnn")
      impls["cudnn full causal"] = lambda q, k, v: jax.nn.dot_product_attention(
          q, k, v, is_causal=True, implementation="cudnn")
    rows = _run(impls, shapes, lambda *a: None, args.iters)
  ratios = _ratios(rows)
  _print(rows, ratios, f"{args.family} attention, {args.tokens} tokens per batch, "
                       f"{args.heads} heads, head dim {args.head_dim}, {args.dtype}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                 "family": args.family, "rows": rows, "ratios": ratios}, f, indent=2)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
