"""Side-by-side attention benchmarks: python -m pallas_kernels.bench --family blockwise|linear|sparse

Times forward and forward+backward (median of --iters runs after a warm-up compile) of our
implementations and the peers that are importable here, at a fixed number of tokens per batch
(batch = tokens / length), and prints one table per family with milliseconds, TFLOP/s (softmax
kinds) or tokens/s (linear), and our ratio to the best peer. --json writes the rows.

FLOPs are the useful work: causal softmax forward 2 * B * H * T^2 * D (half of the full
4 * B * H * T^2 * D), forward+backward 3.5x that (FlashAttention-2's count); sparse rows count
only the causal query-key pairs their pattern keeps (the "kept" column; MoBA's from its routing
on the benchmark's inputs).
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np


DEFAULT_LENGTHS = {"blockwise": "2048,8192,32768",
                   "linear": "2048,4096,8192,16384,32768,65536",
                   "sparse": "8192,16384,32768,65536"}


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


DENSE_SCORE_BYTES = 16e9  # XLA's dense attention keeps B x H x T x T scores: skip beyond this


def _dense_within(attn):
  """attn, refusing (as a reported row error, not an out-of-memory minutes later) shapes whose
  dense fp32 score matrix alone exceeds DENSE_SCORE_BYTES."""
  def run(q, k, v):
    need = 4.0 * q.shape[0] * q.shape[2] * q.shape[1] * k.shape[1]
    if need > DENSE_SCORE_BYTES:
      raise ValueError(f"skipped: dense scores would take {need / 1e9:.0f} GB")
    return attn(q, k, v)
  return run


def _blockwise_impls():
  """Peers first, then ours: rows print as they are measured, so a kernel of ours that failed
  or hung on a new machine cannot cost the peers' rows."""
  from pallas_kernels import blockwise_attention
  from pallas_kernels.blockwise.api import kernel_for
  impls = {}
  if jax.default_backend() == "gpu":
    impls["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                  implementation="cudnn")
  impls["xla"] = _dense_within(functools.partial(blockwise_attention, impl="xla"))
  try:
    import tokamax
    impls["tokamax (mosaic)"] = lambda q, k, v: tokamax.dot_product_attention(
        q, k, v, is_causal=True, implementation="mosaic")
  except Exception:  # not installed, or no such implementation here
    pass
  if kernel_for("pallas") is not None:
    impls["ours (pallas)"] = functools.partial(blockwise_attention, impl="pallas")
    if jax.default_backend() == "gpu":  # both backwards and both schedules side by side
      from pallas_kernels.blockwise.pallas_gpu import flash_attention_gpu
      impls["ours (pallas, fused backward)"] = functools.partial(
          flash_attention_gpu, backward="fused")
      impls["ours (pallas, one warpgroup)"] = functools.partial(
          flash_attention_gpu, schedule="one_warpgroup")
  else:
    impls["ours (reference)"] = functools.partial(blockwise_attention, impl="reference")
  return impls


def _linear_impls(heads: int, decay_kind: str, chunk: int = 64):
  """Ours as flash-linear-attention's simple_gla computes it (identity features, no
  normalisation), with the decay type asked for; the XLA chunked form beside it."""
  from pallas_kernels import linear_attention
  from pallas_kernels.linear.api import kernel_for
  gamma = -jnp.linspace(0.01, 0.1, heads)

  def make(impl):
    def attn(q, k, v):
      decay = {"none": None, "constant": gamma,
               "gates": jax.nn.log_sigmoid(q[..., 0].astype(jnp.float32)) / 16}[decay_kind]
      return linear_attention(q * q.shape[-1] ** -0.5, k, v, feature_map="identity",
                              normalize=False, decay=decay, chunk_size=chunk, impl=impl)
    return attn

  if kernel_for("pallas") is not None:  # the peer first (see _blockwise_impls)
    return {"xla chunked": make("xla"), "ours (pallas)": make("pallas")}
  return {"ours (xla chunked)": make("xla")}


def _run_fla(shapes, decay_kind: str, iters: int):
  """flash-linear-attention's chunk_simple_gla (PyTorch + Triton) on the same shapes and decay
  type, when torch with CUDA and fla are importable; [] otherwise."""
  try:
    import torch
    from fla.ops.simple_gla import chunk_simple_gla
    if not torch.cuda.is_available():
      return []
  except Exception:  # noqa: BLE001 - not installed here
    return []
  rows = []
  for (b, t, h, hkv, d, dtype) in shapes:
    row = {"impl": "fla chunk_simple_gla", "batch": b, "length": t, "heads": h, "kv_heads": hkv,
           "head_dim": d, "dtype": jnp.dtype(dtype).name}
    tdtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(row["dtype"],
                                                                         torch.float32)
    q, k, v, cot = (torch.randn(b, t, h, d, device="cuda", dtype=tdtype) for _ in range(4))
    kw = {}
    if decay_kind == "constant":
      kw["g_gamma"] = -torch.linspace(0.01, 0.1, h, device="cuda")
    elif decay_kind == "gates":
      kw["g"] = torch.nn.functional.logsigmoid(q[..., 0].float()) / 16

    def fwd():
      with torch.no_grad():
        return chunk_simple_gla(q, k, v, **kw)[0]

    def fwd_bwd():
      qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
      out = chunk_simple_gla(qq, kk, vv, **kw)[0]
      return torch.autograd.grad((out.float() * cot.float()).sum(), (qq, kk, vv))

    try:
      row["fwd_ms"] = _time_torch(fwd, iters)
      row["fwd_bwd_ms"] = _time_torch(fwd_bwd, iters)
      row["tokens_per_s"] = b * t / row["fwd_bwd_ms"] * 1e3
    except Exception as e:  # noqa: BLE001 - e.g. a Triton that refuses this GPU
      row["error"] = " ".join(str(e).split())[:160]
    rows.append(row)
    _progress(row)
  return rows


def _time_torch(fn, iters: int) -> float:
  import torch
  fn()
  torch.cuda.synchronize()
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    times.append(time.perf_counter() - start)
  return statistics.median(times) * 1e3


def _run(family_impls, shapes, flops_fn, iters, skip_errors=True, kept=None):
  """kept: {impl: pattern or None} for sparse rows (adds kept_fraction). Implementation-major
  (every length of one impl, then the next; peers come first in family_impls): a kernel of ours
  that fails or hangs on a new machine then costs only its own rows and those after it, never a
  peer's or another length's."""
  rows = []
  inputs = {}
  for name, attn in family_impls.items():
    for shape in shapes:
      if shape not in inputs:
        inputs[shape] = _inputs(*shape)
      q, k, v, cot = inputs[shape]
      b, t, h, hkv, d, dtype = shape
      row = {"impl": name, "batch": b, "length": t, "heads": h, "kv_heads": hkv, "head_dim": d,
             "dtype": jnp.dtype(dtype).name}
      if kept is not None:
        row["kept_fraction"] = kept_fraction(kept[name], q, k)
      try:
        row["fwd_ms"] = _time(jax.jit(attn), (q, k, v), iters)
        row["fwd_bwd_ms"] = _time(_fwd_bwd(attn), (q, k, v, cot), iters)
      except Exception as e:  # noqa: BLE001 - a peer that cannot run a shape is reported
        if not skip_errors:
          raise
        row["error"] = " ".join(str(e).split())[:160]
      fl = flops_fn(b, t, h, d)
      if fl and kept is not None:  # useful work only: the pairs the pattern keeps
        fl *= row["kept_fraction"]
      if fl and "fwd_ms" in row:
        row["fwd_tflops"] = fl / row["fwd_ms"] / 1e9
        row["fwd_bwd_tflops"] = 3.5 * fl / row["fwd_bwd_ms"] / 1e9
      if "fwd_bwd_ms" in row:
        row["tokens_per_s"] = b * t / row["fwd_bwd_ms"] * 1e3
      rows.append(row)
      _progress(row)
  return rows


def _progress(row):
  """Each row as soon as it is measured (stderr), so a run cut short by a timeout still says
  what it measured."""
  print("row " + json.dumps(row), file=sys.stderr, flush=True)


def _ratios(rows, pairs=None):
  """Our fwd / fwd+bwd speed over a peer's, per length: over the best peer, or, with pairs
  [(ours impl, peer impl)], over each named peer (the sparse family compares like with like)."""
  out = []
  for t in sorted({r["length"] for r in rows}):
    at = {r["impl"]: r for r in rows if r["length"] == t and "fwd_ms" in r}
    if pairs is None:
      peers = [r for name, r in at.items() if not name.startswith("ours")]
      for mine in (r for name, r in at.items() if name.startswith("ours") and peers):
        out.append({"length": t, "ours": mine["impl"], "peer": "best peer",
                    "fwd_ratio": min(p["fwd_ms"] for p in peers) / mine["fwd_ms"],
                    "fwd_bwd_ratio": min(p["fwd_bwd_ms"] for p in peers) / mine["fwd_bwd_ms"]})
      continue
    for ours, peer in pairs:
      if ours in at and peer in at:
        out.append({"length": t, "ours": ours, "peer": peer,
                    "fwd_ratio": at[peer]["fwd_ms"] / at[ours]["fwd_ms"],
                    "fwd_bwd_ratio": at[peer]["fwd_bwd_ms"] / at[ours]["fwd_bwd_ms"]})
  return out


def kept_fraction(pattern, q, k) -> float:
  """The fraction of causal query-key pairs a pattern keeps (1.0 for full causal), on the
  inputs given (MoBA's depends on its routing): the work a kernel that skips the rest does,
  relative to full causal attention."""
  from pallas_kernels import MoBA, SlidingWindow
  from pallas_kernels.sparse.routing import moba_routing
  t = q.shape[1]
  causal_pairs = t * (t + 1) / 2
  if pattern is None:
    return 1.0
  if isinstance(pattern, SlidingWindow):
    w = min(pattern.window, t)
    return (w * (w + 1) / 2 + (t - w) * w) / causal_pairs
  if isinstance(pattern, MoBA):  # own block causally + block_size keys per routed past block
    routes = moba_routing(q[:1], k[:1], block_size=pattern.block_size, top_k=pattern.top_k)
    own = (jnp.arange(t) % pattern.block_size + 1).sum() * q.shape[2]
    routed = jnp.sum(routes >= 0) * pattern.block_size
    return float((own + routed) / (causal_pairs * q.shape[2]))
  raise ValueError(f"kept_fraction: no count for {pattern!r}")


def _print(rows, ratios, title):
  print(f"\n## {title} ({jax.devices()[0].device_kind}, jax {jax.__version__})")
  sparse = any("kept_fraction" in r for r in rows)
  extra_head, extra_rule = (" kept |", "---|") if sparse else ("", "")
  print(f"| impl | B x T | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | tokens/s |"
        f"{extra_head}")
  print(f"|---|---|---|---|---|---|---|{extra_rule}")
  fmt = lambda x, s=".2f": "-" if x is None else format(x, s)
  for r in rows:
    kept = f" {r['kept_fraction']:.3f} |" if sparse else ""
    if "error" in r:
      print(f"| {r['impl']} | {r['batch']} x {r['length']} | error: {r['error']} |||||{kept}")
      continue
    print(f"| {r['impl']} | {r['batch']} x {r['length']} | {fmt(r['fwd_ms'])} | "
          f"{fmt(r.get('fwd_tflops'), '.1f')} | {fmt(r['fwd_bwd_ms'])} | "
          f"{fmt(r.get('fwd_bwd_tflops'), '.1f')} | {fmt(r['tokens_per_s'], ',.0f')} |{kept}")
  for x in ratios:
    print(f"{x['ours']} / {x['peer']} at T={x['length']}: forward {x['fwd_ratio']:.2f}x, "
          f"forward+backward {x['fwd_bwd_ratio']:.2f}x")


def _causal_flops(b, t, h, d):
  return 2.0 * b * h * t * t * d


def _run_sparse(shapes, iters):
  """Sliding window 1024 beside cuDNN's; MoBA 512/top 4 beside cuDNN full causal and our
  blockwise kernel; each row with the fraction of causal pairs its pattern keeps."""
  from pallas_kernels import MoBA, SlidingWindow, blockwise_attention, sparse_attention
  from pallas_kernels.blockwise.api import kernel_for as blockwise_kernel_for
  from pallas_kernels.sparse.api import kernel_for
  impl = "pallas" if kernel_for("pallas") is not None else "auto"
  window, moba = SlidingWindow(1024), MoBA(512, 4)
  full_impl = "pallas" if blockwise_kernel_for("pallas") is not None else "reference"
  names = {"window": f"ours sliding window 1024 ({impl})", "moba": f"ours MoBA 512/top4 ({impl})",
           "full": f"ours full causal ({full_impl})"}
  impls, kept = {}, {}
  pairs = [(names["moba"], names["full"])]
  if jax.default_backend() == "gpu":  # the peers first (see _blockwise_impls)
    impls["cudnn sliding window 1024"] = lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, local_window_size=(1023, 0), implementation="cudnn")
    impls["cudnn full causal"] = lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="cudnn")
    kept.update({"cudnn sliding window 1024": window, "cudnn full causal": None})
    pairs = [(names["window"], "cudnn sliding window 1024"),
             (names["moba"], "cudnn full causal")] + pairs
  impls.update({
      names["window"]: functools.partial(sparse_attention, pattern=window, impl=impl),
      names["moba"]: functools.partial(sparse_attention, pattern=moba, impl=impl),
      names["full"]: functools.partial(blockwise_attention, impl=full_impl)})
  kept.update({names["window"]: window, names["moba"]: moba, names["full"]: None})
  rows = _run(impls, shapes, _causal_flops, iters, kept=kept)
  return rows, _ratios(rows, pairs)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m pallas_kernels.bench", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--family", choices=["blockwise", "linear", "sparse"], required=True)
  parser.add_argument("--lengths", default=None,
                      help="comma-separated; default per family: " + "; ".join(
                          f"{k} {v}" for k, v in DEFAULT_LENGTHS.items()))
  parser.add_argument("--tokens", type=int, default=32768, help="tokens per batch")
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--kv-heads", type=int, default=None)
  parser.add_argument("--head-dim", type=int, default=128)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--decay", choices=["none", "constant", "gates"], default="constant",
                      help="linear family: the decay type (fla runs the same one)")
  parser.add_argument("--chunk", type=int, default=64, choices=[64, 128],
                      help="linear family: our chunk size (fla's is 64)")
  parser.add_argument("--json", default=None, help="write the rows here")
  args = parser.parse_args(argv)
  dtype = jnp.dtype(args.dtype)
  hkv = args.kv_heads or args.heads
  shapes = [(max(args.tokens // t, 1), t, args.heads, hkv, args.head_dim, dtype)
            for t in (int(x) for x in (args.lengths or DEFAULT_LENGTHS[args.family]).split(","))]
  if args.family == "blockwise":
    rows = _run(_blockwise_impls(), shapes, _causal_flops, args.iters)
  elif args.family == "linear":
    rows = _run(_linear_impls(args.heads, args.decay, args.chunk), shapes, lambda *a: None,
                args.iters)
    rows += _run_fla(shapes, args.decay, args.iters)
  else:
    rows, ratios = _run_sparse(shapes, args.iters)
  if args.family != "sparse":
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
