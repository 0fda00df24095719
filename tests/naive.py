"""Independent float64 numpy references, written as plainly as possible (loops, no jax).

They share no code with pallas_kernels, so agreement with them checks the library's semantics,
not just its self-consistency.
"""
import math

import numpy as np


def softmax_attention(q, k, v, allowed, *, scale=None, alibi=None, causal=True, softcap=None,
                      sinks=None):
  """allowed(b, h, t, s) -> bool. q [B, T, Hq, D], k/v [B, S, Hkv, D]. softcap: logits become
  softcap * tanh(logit / softcap) before the ALiBi bias; sinks [Hq]: exp(sink) joins every
  row's denominator."""
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
        if softcap:
          logits = softcap * np.tanh(logits / softcap)
        if alibi is not None:
          logits -= np.array([alibi[h] * (abs(t - s)) for s in keys])
        top = logits.max() if sinks is None else max(logits.max(), sinks[h])
        p = np.exp(logits - top)
        p /= p.sum() + (0.0 if sinks is None else math.exp(sinks[h] - top))
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


def moba_blocks(q, k, block_size, top_k, seg=None):
  """chosen[b][h][t] = set of key blocks query t attends (own block + routed), by brute force.
  With segment ids, a block's mean is over the keys of the query's own document, and blocks
  without any are not candidates."""
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
          keys = [s for s in range(j * block_size, min((j + 1) * block_size, k.shape[1]))
                  if seg is None or seg[b, s] == seg[b, t]]
          if not keys:
            continue
          mean = np.mean([k[b, s, kh] for s in keys], axis=0)
          scores.append((float(q[b, t, h] @ mean), j))
        scores.sort(key=lambda x: -x[0])
        picked = {j for _, j in scores[:top_k - 1]}
        chosen[b, h, t] = picked | {own}
  return chosen


# ---- whole token-mixer layers (params as nested dicts of float64 arrays) ----------------------

def sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def silu(x):
  return x * sigmoid(x)


def log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def rope(x, positions, theta):
  """x [T, H, D]: pairs (i, i + D/2) rotated by positions[t] * theta^(-2i/D), one at a time."""
  out = np.array(x, np.float64)
  d = x.shape[-1]
  for t in range(x.shape[0]):
    for i in range(d // 2):
      angle = positions[t] * theta ** (-2.0 * i / d)
      c, s = math.cos(angle), math.sin(angle)
      a, b = x[t, :, i], x[t, :, i + d // 2]
      out[t, :, i], out[t, :, i + d // 2] = a * c - b * s, b * c + a * s
  return out


def alibi_slopes(num_heads):
  """Press et al.: 2^(-8 (h + 1) / H) for a power-of-two head count."""
  assert num_heads & (num_heads - 1) == 0
  return np.array([2.0 ** (-8.0 * (h + 1) / num_heads) for h in range(num_heads)])


def project(x, kernel):
  """x [B, T, D] times kernel [D, *out] -> [B, T, *out]."""
  return np.tensordot(x, kernel, axes=([2], [0]))


def unproject(o, kernel):
  """o [B, T, H, Dv] times kernel [H, Dv, D] -> [B, T, D]."""
  return np.tensordot(o, kernel, axes=([2, 3], [0, 1]))


def block_mask_allows(i, j, local, global_blocks, stride):
  """The local + global/sink + strided rule of a block-sparse mask, for one block pair."""
  return ((i - local < j <= i) or (global_blocks > 0 and (j < global_blocks or i < global_blocks))
          or (stride > 0 and (i - j) % stride == 0))


def softmax_family_qkv(p, x, positions, options, shift=None):
  """q, k, v of a softmax-family layer: projections, QK-norm and RoPE when the options say so.
  shift(k, v) -> (k, v), if given, acts on the projections before QK-norm (FoX Pro)."""
  q, k, v = (project(x, p[n]["kernel"]) for n in ("q_proj", "k_proj", "v_proj"))
  if shift is not None:
    k, v = shift(k, v)
  if options.qk_norm:
    q = head_rms_norm(q, p["q_norm"]["scale"], eps=1e-6)
    k = head_rms_norm(k, p["k_norm"]["scale"], eps=1e-6)
  if options.position == "rope":
    q = np.stack([rope(q[b], positions[b], options.rope_theta) for b in range(len(q))])
    k = np.stack([rope(k[b], positions[b], options.rope_theta) for b in range(len(k))])
  return q, k, v


def softmax_family_layer(kind, p, x, seg, positions, options, layer=None):
  """softmax / sliding_window / block_sparse / moba: projections, positions, the kind's pattern
  within each packed document, output projection."""
  q, k, v = softmax_family_qkv(p, x, positions, options)
  chosen = None
  if kind == "moba":
    chosen = moba_blocks(q, k, options.block_size, options.top_k, seg)

  def allowed(b, h, t, s):
    if seg[b, t] != seg[b, s]:
      return False
    if kind == "sliding_window":
      return t - options.window < s
    if kind == "block_sparse":
      return block_mask_allows(t // options.block_size, s // options.block_size,
                               options.local_blocks, options.global_blocks, options.stride)
    if kind == "moba":
      return s // options.block_size in chosen[b, h, t]
    return True

  alibi = alibi_slopes(q.shape[2]) if options.position == "alibi" else None
  o = softmax_attention(q, k, v, allowed, alibi=alibi, softcap=options.softcap,
                        sinks=p["sink_logits"] if options.sinks else None)
  if options.output_gate:
    o = o * sigmoid(project(x, p["g_proj"]["kernel"]))
  return unproject(o, p["o_proj"]["kernel"])


def short_conv(x, kernel, seg):
  """x [B, T, H, D], kernel [K, H, D]: y_t = silu(sum_j kernel[K-1-j] x_{t-j}) within a document."""
  out = np.zeros_like(x)
  size = kernel.shape[0]
  for b in range(x.shape[0]):
    for t in range(x.shape[1]):
      acc = np.zeros(x.shape[2:])
      for j in range(size):
        if t - j >= 0 and seg[b, t - j] == seg[b, t]:
          acc = acc + kernel[size - 1 - j] * x[b, t - j]
      out[b, t] = silu(acc)
  return out


def gated_recurrence(q, k, v, log_a, seg, *, normalize):
  """S_t = diag(a_t) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t, one token at a time; a_t [B, T, H, Dk]
  (broadcast from a scalar per head), reset at each document start. normalize divides by
  q_t . z_t with z_t = diag(a_t) z_{t-1} + k_t (+ 1e-6)."""
  b_, t_, hq, dk = q.shape
  hkv, dv = k.shape[2], v.shape[-1]
  out = np.zeros((b_, t_, hq, dv))
  for b in range(b_):
    for h in range(hq):
      kh = h // (hq // hkv)
      S, z = np.zeros((dk, dv)), np.zeros(dk)
      for t in range(t_):
        if t > 0 and seg[b, t] != seg[b, t - 1]:
          S, z = np.zeros((dk, dv)), np.zeros(dk)
        a = np.exp(np.broadcast_to(log_a[b, t, h], (dk,)))
        S = a[:, None] * S + np.outer(k[b, t, kh], v[b, t, kh])
        z = a * z + k[b, t, kh]
        o = q[b, t, h] @ S
        out[b, t, h] = o / (q[b, t, h] @ z + 1e-6) if normalize else o
  return out


def head_rms_norm(o, scale, eps=1e-5):
  return o / np.sqrt(np.mean(o * o, axis=-1, keepdims=True) + eps) * scale


def linear_family_layer(kind, p, x, seg, positions, options, layer=None):
  """linear / simple_gla / gla: projections, optional short convolutions, the kind's feature
  map, scale and gates, the gated recurrence, output norm and gate, output projection."""
  del positions
  q, k, v = (project(x, p[n]["kernel"]) for n in ("q_proj", "k_proj", "v_proj"))
  if options.short_conv:
    q, k, v = (short_conv(a, p[n]["kernel"], seg) for a, n in
               ((q, "q_conv"), (k, "k_conv"), (v, "v_conv")))
  b_, t_, hq, dk = q.shape
  if kind == "linear":
    q, k = phi(q, options.feature_map), phi(k, options.feature_map)
    log_a = np.zeros((b_, t_, hq, 1))
    normalize = options.normalize
  elif kind == "simple_gla":
    logits = project(x, p["gate_proj"]["kernel"]) + p["gate_proj"]["bias"]
    log_a = (log_sigmoid(logits) / options.gate_logit_normalizer)[..., None]
    q, normalize = q / math.sqrt(dk), False
  elif kind == "gla":
    low = project(x, p["gate_down"]["kernel"])
    logits = project(low, p["gate_up"]["kernel"]) + p["gate_up"]["bias"]
    log_a = log_sigmoid(logits) / options.gate_logit_normalizer
    q, normalize = q / math.sqrt(dk), False
  else:
    raise KeyError(kind)
  o = gated_recurrence(q, k, v, log_a, seg, normalize=normalize)
  if options.output_norm:
    o = head_rms_norm(o, p["o_norm"]["scale"])
  if options.output_gate:
    o = o * silu(project(x, p["g_proj"]["kernel"]))
  return unproject(o, p["o_proj"]["kernel"])


def diff_layer(kind, p, x, seg, positions, options, layer):
  """Differential attention: per differential head i (q heads 2i, 2i + 1; its key pair and value
  head by the GQA grouping), softmax_1 V - lambda softmax_2 V, per-head RMSNorm,
  (1 - lambda_init), output projection."""
  q, k, v = (project(x, p[n]["kernel"]) for n in ("q_proj", "k_proj", "v_proj"))
  if options.position == "rope":
    q = np.stack([rope(q[b], positions[b], options.rope_theta) for b in range(len(q))])
    k = np.stack([rope(k[b], positions[b], options.rope_theta) for b in range(len(k))])
  h, hkv = q.shape[2], k.shape[2]  # hkv: key heads, two per pair
  init = 0.8 - 0.6 * math.exp(-0.3 * layer)
  lam = (math.exp(float(p["lambda_q1"] @ p["lambda_k1"]))
         - math.exp(float(p["lambda_q2"] @ p["lambda_k2"])) + init)
  same = lambda b, hh, t, s: seg[b, t] == seg[b, s]
  heads = []
  for i in range(h // 2):
    g = i // (h // hkv)  # the key pair / value head of differential head i
    vg = v[:, :, g:g + 1]
    a1 = softmax_attention(q[:, :, 2 * i:2 * i + 1], k[:, :, 2 * g:2 * g + 1], vg, same)
    a2 = softmax_attention(q[:, :, 2 * i + 1:2 * i + 2], k[:, :, 2 * g + 1:2 * g + 2], vg, same)
    heads.append(head_rms_norm(a1 - lam * a2, p["subln"]["scale"]) * (1 - init))
  return unproject(np.concatenate(heads, axis=2), p["o_proj"]["kernel"])


def selective_layer(kind, p, x, seg, positions, options, layer=None):
  """Selective attention by loops: S[k][j] = ReLU(head 0's logit) except at a document's first
  key and the diagonal; every head's logit of (i, j) minus sum_{k<i} S[k][j]."""
  q, k, v = softmax_family_qkv(p, x, positions, options)
  b_, t_, hq, d = q.shape
  hkv = k.shape[2]
  slopes = alibi_slopes(hq) if options.position == "alibi" else np.zeros(hq)
  out = np.zeros((b_, t_, hq, v.shape[-1]))
  for b in range(b_):
    start = [min(s for s in range(t_) if seg[b, s] == seg[b, t]) for t in range(t_)]
    seen = lambda i, j: j <= i and seg[b, i] == seg[b, j]
    capped = lambda x: options.softcap * math.tanh(x / options.softcap) if options.softcap else x
    logit = lambda h, i, j: (capped(q[b, i, h] @ k[b, j, h // (hq // hkv)] / math.sqrt(d))
                             - slopes[h] * (i - j))
    sel = np.zeros((t_, t_))
    for i in range(t_):
      for j in range(t_):
        if seen(i, j) and j != start[i] and j != i:
          sel[i, j] = max(logit(0, i, j), 0.0)
    for h in range(hq):
      for i in range(t_):
        keys = [j for j in range(t_) if seen(i, j)]
        z = np.array([logit(h, i, j) - sum(sel[kk, j] for kk in range(i)) for j in keys])
        sink = p["sink_logits"][h] if options.sinks else -np.inf
        top = max(z.max(), sink)
        w = np.exp(z - top)
        w /= w.sum() + math.exp(sink - top)
        out[b, i, h] = sum(wi * v[b, j, h // (hq // hkv)] for wi, j in zip(w, keys))
  if options.output_gate:
    out = out * sigmoid(project(x, p["g_proj"]["kernel"]))
  return unproject(out, p["o_proj"]["kernel"])


# kind -> oracle(kind, params, x [B, T, D], segment_ids [B, T], positions [B, T], options, layer)
LAYERS = {
    "softmax": softmax_family_layer, "sliding_window": softmax_family_layer,
    "block_sparse": softmax_family_layer, "moba": softmax_family_layer,
    "linear": linear_family_layer, "simple_gla": linear_family_layer,
    "gla": linear_family_layer, "diff": diff_layer, "selective": selective_layer,
}


# ---- the delta rule (DeltaNet / Gated DeltaNet) ------------------------------------------------

def delta_rule(q, k, v, beta, *, log_gates=None, segment_ids=None, initial_state=None):
  """One token at a time, in the papers' orientation M [Dv, Dk] (the library's state is M^T):
  M_t = a_t M_{t-1} (I - b_t k_t k_t^T) + b_t v_t k_t^T and o_t = M_t q_t, a_t = exp(g_t).
  q [B, T, Hq, Dk], k [B, T, Hkv, Dk], v [B, T, Hkv, Dv], beta and log_gates [B, T, Hkv]. M is
  emptied wherever the segment id changes; initial_state (M^T, [B, Hkv, Dk, Dv]) starts the row.
  Returns (o [B, T, Hq, Dv], final M^T [B, Hkv, Dk, Dv])."""
  q, k, v, beta = (np.asarray(x, np.float64) for x in (q, k, v, beta))
  b_, t_, hq, dk = q.shape
  hkv, dv = k.shape[2], v.shape[-1]
  group = hq // hkv
  g = np.zeros((b_, t_, hkv)) if log_gates is None else np.asarray(log_gates, np.float64)
  out = np.zeros((b_, t_, hq, dv))
  final = np.zeros((b_, hkv, dk, dv))
  for b in range(b_):
    for h in range(hkv):
      m = np.zeros((dv, dk)) if initial_state is None else np.array(initial_state[b, h]).T
      for t in range(t_):
        if t > 0 and segment_ids is not None and segment_ids[b, t] != segment_ids[b, t - 1]:
          m = np.zeros((dv, dk))
        kt, bt = k[b, t, h], beta[b, t, h]
        m = (math.exp(g[b, t, h]) * m @ (np.eye(dk) - bt * np.outer(kt, kt))
             + bt * np.outer(v[b, t, h], kt))
        for hq_ in range(h * group, (h + 1) * group):  # the query heads reading kv head h
          out[b, t, hq_] = m @ q[b, t, hq_]
      final[b, h] = m.T
  return out, final


def l2_normalize(x, eps=1e-6):
  return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + eps)


def softplus(x):
  return np.logaddexp(0.0, x)


def delta_layer(kind, p, x, seg, positions, options, layer=None):
  """deltanet / gated_deltanet: projections, SiLU short convolutions (or SiLU alone), L2-
  normalised q and k, q / sqrt(Dk), beta = sigmoid(x w_b), Mamba-2 decay for the gated rule,
  the delta rule token by token, output RMSNorm (and swish gate), output projection."""
  del positions
  q, k, v = (project(x, p[n]["kernel"]) for n in ("q_proj", "k_proj", "v_proj"))
  if options.short_conv:
    q, k, v = (short_conv(a, p[n]["kernel"], seg) for a, n in
               ((q, "q_conv"), (k, "k_conv"), (v, "v_conv")))
  else:
    q, k, v = silu(q), silu(k), silu(v)
  q = l2_normalize(q) / math.sqrt(q.shape[-1])
  k = l2_normalize(k)
  beta = sigmoid(project(x, p["b_proj"]["kernel"]))
  gates = None
  if kind == "gated_deltanet":
    a = project(x, p["a_proj"]["kernel"])
    gates = -np.exp(p["A_log"]) * softplus(a + p["dt_bias"])
  o, _ = delta_rule(q, k, v, beta, log_gates=gates, segment_ids=seg)
  if options.output_norm:
    o = head_rms_norm(o, p["o_norm"]["scale"])
  if options.output_gate:
    o = o * silu(project(x, p["g_proj"]["kernel"]))
  return unproject(o, p["o_proj"]["kernel"])


LAYERS.update({"deltanet": delta_layer, "gated_deltanet": delta_layer})


def fox_attention(q, k, v, log_gates, *, segment_ids=None, scale=None, softcap=None, sinks=None):
  """Causal softmax attention with the Forgetting Transformer's forget-gate bias (Lin et al.,
  2025), by loops in float64. log_gates [B, T, Hq] (log f_t). Per segment, c is the running sum
  of log_gates from the segment's first token; query t and key s <= t of the same segment get
  logit q.k * scale + c[t] - c[s] (= sum of log f over s+1..t). q [B, T, Hq, D], k/v
  [B, T, Hkv, D]; segment_ids [B, T] or None."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  g = np.asarray(log_gates, np.float64)
  b_, t_, hq, d = q.shape
  hkv = k.shape[2]
  scale = d ** -0.5 if scale is None else scale
  seg = np.zeros((b_, t_), np.int64) if segment_ids is None else np.asarray(segment_ids)
  out = np.zeros((b_, t_, hq, v.shape[-1]))
  for b in range(b_):
    for h in range(hq):
      c = np.zeros(t_)
      for t in range(t_):
        restart = t == 0 or seg[b, t] != seg[b, t - 1]
        c[t] = g[b, t, h] + (0.0 if restart else c[t - 1])
      kh = h // (hq // hkv)
      for t in range(t_):
        keys = [s for s in range(t + 1) if seg[b, s] == seg[b, t]]
        raw = np.array([q[b, t, h] @ k[b, s, kh] * scale for s in keys])
        if softcap:
          raw = softcap * np.tanh(raw / softcap)
        logits = raw + np.array([c[t] - c[s] for s in keys])
        top = logits.max() if sinks is None else max(logits.max(), sinks[h])
        p = np.exp(logits - top)
        p /= p.sum() + (0.0 if sinks is None else math.exp(sinks[h] - top))
        out[b, t, h] = sum(pi * v[b, s, kh] for pi, s in zip(p, keys))
  return out


def token_shift(x, logits, seg):
  """FoX Pro's shift, token by token: y_t = a_t x_{t-1} + (1 - a_t) x_t, a_t = sigmoid(logits_t)
  per head; x_{t-1} = 0 at a row's or a document's first token. x [B, T, H, D], logits [B, T, H]."""
  y = np.zeros_like(x)
  for b in range(x.shape[0]):
    for t in range(x.shape[1]):
      starts = t == 0 or (seg is not None and seg[b, t] != seg[b, t - 1])
      prev = np.zeros_like(x[b, t]) if starts else x[b, t - 1]
      a = sigmoid(logits[b, t])[:, None]
      y[b, t] = a * prev + (1 - a) * x[b, t]
  return y


def fox_layer(kind, p, x, seg, positions, options, layer=None):
  """FoX: projections (the key/value shift, QK-norm, RoPE when on), forget gates log f =
  log sigmoid(x w + b) per head, fox_attention, output norm (a scale per head and channel) and
  gate, output projection."""
  shift = None
  if options.kv_shift:
    shift = lambda k, v: (token_shift(k, project(x, p["k_shift_proj"]["kernel"]), seg),
                          token_shift(v, project(x, p["v_shift_proj"]["kernel"]), seg))
  q, k, v = softmax_family_qkv(p, x, positions, options, shift)
  log_f = log_sigmoid(project(x, p["f_proj"]["kernel"]) + p["f_proj"]["bias"])
  o = fox_attention(q, k, v, log_f, segment_ids=seg, softcap=options.softcap,
                    sinks=p["sink_logits"] if options.sinks else None)
  if options.output_norm:
    o = head_rms_norm(o, p["o_norm_scale"], eps=1e-6)
  if options.output_gate:
    o = o * sigmoid(project(x, p["g_proj"]["kernel"]))
  return unproject(o, p["o_proj"]["kernel"])


LAYERS["fox"] = fox_layer


def layer_oracle(kind):
  """The float64 loop of a kind's whole layer, (kind, params, x, seg, positions, options,
  layer) -> y: the one above, or `layer_oracle` in the kind's own test module
  tests/test_<kind>.py, so that a new kind ships its oracle with its test. None if neither."""
  import importlib
  if kind in LAYERS:
    return LAYERS[kind]
  try:
    module = importlib.import_module(f"tests.test_{kind}")
  except ModuleNotFoundError:
    return None
  return getattr(module, "layer_oracle", None)
