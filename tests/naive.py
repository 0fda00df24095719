"""Independent float64 numpy references, written as plainly as possible (loops, no jax).

They share no code with pallas_kernels, so agreement with them checks the library's semantics,
not just its self-consistency.
"""
import math

import numpy as np


def softmax_attention(q, k, v, allowed, *, scale=None, alibi=None, causal=True):
  """allowed(b, h, t, s) -> bool. q [B, T, Hq, D], k/v [B, S, Hkv, D]."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b_, t_, hq, d = q.shape
  s_, hkv = k.shape[1], k.shape[2]
  scale = d ** -0.5 if scale is None else scale
  out = np.zeros((b_, t_, hq, v.shape[-1]))
  for b in range(b_):
    for h in range(hq):
      kh = h // (hq // hkv)
      for t in range(t_):
        keys = [s for s in range(s_) if allowed(b, h, t, s) and (s <= t or not causal)]
        if not keys:
          continue
        logits = np.array([q[b, t, h] @ k[b, s, kh] * scale for s in keys])
        if alibi is not None:
          logits -= np.array([alibi[h] * (abs(t - s)) for s in keys])
        p = np.exp(logits - logits.max())
        p /= p.sum()
        out[b, t, h] = sum(pi * v[b, s, kh] for pi, s in zip(p, keys))
  return out


def phi(x, name):
  if name == "elu1":
    return np.where(x > 0, x + 1.0, np.exp(x))
  if name == "relu":
    return np.maximum(x, 0.0)
  return x


def linear_attention(q, k, v, *, feature_map="elu1", log_gates=None, normalize=True,
                     segment_ids=None):
  """log_gates [B, T, Hq] or None. Direct double sum over s <= t."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b_, t_, hq, _ = q.shape
  hkv = k.shape[2]
  g = np.zeros((b_, t_, hq)) if log_gates is None else np.asarray(log_gates, np.float64)
  out = np.zeros((b_, t_, hq, v.shape[-1]))
  for b in range(b_):
    for h in range(hq):
      kh = h // (hq // hkv)
      for t in range(t_):
        num, den = 0.0, 0.0
        for s in range(t + 1):
          if segment_ids is not None and segment_ids[b, s] != segment_ids[b, t]:
            continue
          decay = math.exp(sum(g[b, r, h] for r in range(s + 1, t + 1)))
          a = decay * float(phi(q[b, t, h], feature_map) @ phi(k[b, s, kh], feature_map))
          num = num + a * v[b, s, kh]
          den += a
        out[b, t, h] = num / (den + 1e-6) if normalize else num
  return out


def moba_blocks(q, k, block_size, top_k):
  """chosen[b][h][t] = set of key blocks query t attends (own block + routed), by brute force."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  b_, t_, hq, _ = q.shape
  hkv = k.shape[2]
  chosen = {}
  for b in range(b_):
    for h in range(hq):
      kh = h // (hq // hkv)
      for t in range(t_):
        own = t // block_size
        scores = []
        for j in range(own):  # blocks wholly before the query's own block
          mean = k[b, j * block_size:(j + 1) * block_size, kh].mean(axis=0)
          scores.append((float(q[b, t, h] @ mean), j))
        scores.sort(key=lambda x: -x[0])
        picked = {j for _, j in scores[:top_k - 1]}
        chosen[b, h, t] = picked | {own}
  return chosen
