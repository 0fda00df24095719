"""Shape checks and backend choice shared by every kernel family.

Layout everywhere: q [B, T, Hq, D], k and v [B, S, Hkv, D], Hq % Hkv == 0. Query head h reads
key/value head h // (Hq // Hkv), the grouping of jax.nn.dot_product_attention.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLS = ("auto", "reference", "xla", "cudnn", "pallas", "interpret", "interpret_gpu")
HEAD_DIMS = (64, 128, 256)


def check_qkv(q, k, v, *, name: str) -> None:
  """Raises a one-line ValueError naming the bad shape."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"{name}: q, k, v must be [B, T, H, D]; got q{q.shape} k{k.shape} v{v.shape}")
  b, _, hq, d = q.shape
  bk, s, hkv, dk = k.shape
  if k.shape != v.shape:
    raise ValueError(f"{name}: k{k.shape} and v{v.shape} must have the same shape")
  if bk != b:
    raise ValueError(f"{name}: batch of q ({b}) and k/v ({bk}) differ")
  if dk != d:
    raise ValueError(f"{name}: head dim of q ({d}) and k/v ({dk}) differ")
  if hkv == 0 or hq % hkv:
    raise ValueError(f"{name}: query heads {hq} are not a multiple of key/value heads {hkv}")
  if s == 0 or q.shape[1] == 0:
    raise ValueError(f"{name}: empty sequence: q{q.shape} k{k.shape}")


def check_segment_ids(segment_ids, q, k, *, name: str) -> None:
  if segment_ids is None:
    return
  if segment_ids.shape != q.shape[:2]:
    raise ValueError(f"{name}: segment_ids{segment_ids.shape} must be [B, T] = {q.shape[:2]}")
  if q.shape[1] != k.shape[1]:
    raise ValueError(f"{name}: segment_ids need T == S (self-attention); got T={q.shape[1]} S={k.shape[1]}")


def check_impl(impl: str, allowed: tuple[str, ...], *, name: str) -> None:
  if impl not in allowed:
    raise ValueError(f"{name}: impl={impl!r} is not one of {', '.join(allowed)}")


def backend() -> str:
  return jax.default_backend()


def group_queries(x_BTHD, num_kv_heads: int):
  """[B, T, Hq, D] -> [B, T, Hkv, G, D] with G = Hq // Hkv (query head h -> kv head h // G)."""
  b, t, hq, d = x_BTHD.shape
  return x_BTHD.reshape(b, t, num_kv_heads, hq // num_kv_heads, d)


def ungroup_queries(x_BTKGD):
  b, t, kv, g, d = x_BTKGD.shape
  return x_BTKGD.reshape(b, t, kv * g, d)


def tied_to(indices, data):
  """`indices` (e.g. a loop's block numbers) made to depend on `data` through an optimization
  barrier. A value computed from indices alone inside a loop body looks invariant to JAX when an
  enclosing lax.scan is differentiated (a scan over layers), and JAX then hoists it out of that
  scan with every iteration's value stacked: for attention, the keep masks of all key blocks
  at once, T x S per head. Tied to the data, it is computed per iteration as written."""
  return jax.lax.optimization_barrier((indices, data))[0]


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def pad_for_tiles(q, k, v, segment_ids, bq: int, bk: int):
  """q padded along T to a multiple of bq, k and v along S to a multiple of bk ([B, T, H, D]
  layout kept), and int32 segment ids q_seg [B, Tp], k_seg [B, Sp] whose padding (-1 for
  queries, -2 for keys) matches no real token and no padding of the other side."""
  b, t = q.shape[:2]
  s = k.shape[1]
  tp, sp = cdiv(t, bq) * bq, cdiv(s, bk) * bk
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))
  seg_q = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  seg_k = jnp.zeros((b, s), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  q_seg = jnp.pad(seg_q, ((0, 0), (0, tp - t)), constant_values=-1)
  k_seg = jnp.pad(seg_k, ((0, 0), (0, sp - s)), constant_values=-2)
  return pad(q, tp), pad(k, sp), pad(v, sp), q_seg, k_seg


def segment_start_mask(segment_ids_BT):
  """True where a token starts a new segment (the first token, and each change of id): [B, T]."""
  first = jnp.ones_like(segment_ids_BT[:, :1], bool)
  return jnp.concatenate([first, segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)


def segment_starts(segment_ids_BT):
  """Index of the first token of each token's segment: [B, T] (segments are contiguous runs)."""
  idx = jnp.arange(segment_ids_BT.shape[1], dtype=jnp.int32)[None, :]
  return jax.lax.cummax(jnp.where(segment_start_mask(segment_ids_BT), idx, 0), axis=1)


@jax.jit  # one compiled scan, also when called eagerly (tests): not dozens of small ops
def gate_cumsum(log_gates_BTH, segment_ids=None):
  """c [B, T, H]: the running sum of the log forget gates over time, restarting at each
  segment's first token, in fp32 (fp64 for fp64 gates). The FoX bias of query i and key j <= i
  of one segment is c_i - c_j = sum_{l=j+1..i} log_gates_l. A scan that resets (not differences
  of one global sum), so a packed batch's later documents keep fp32's precision; autodiff of it
  gives the gates' gradient as reverse running sums within each segment."""
  x = log_gates_BTH.astype(jnp.promote_types(log_gates_BTH.dtype, jnp.float32))
  if segment_ids is None:
    return jnp.cumsum(x, axis=1)
  reset = jnp.broadcast_to(segment_start_mask(segment_ids)[..., None], x.shape)

  def combine(a, b):  # (sum since the last reset, whether a reset was seen)
    return jnp.where(b[1], b[0], a[0] + b[0]), a[1] | b[1]

  return jax.lax.associative_scan(combine, (x, reset), axis=1)[0]


def alibi_log_gates(alibi_slopes, batch: int, length: int):
  """ALiBi as FoX's constant gates: log_gates [B, T, Hq] = -slope of each query head, so that
  c_i - c_j = -slope * (i - j)."""
  return jnp.broadcast_to(-alibi_slopes, (batch, length, alibi_slopes.shape[0]))


def check_gates(log_gates, alibi_slopes, q, k, *, causal: bool, name: str) -> None:
  """One-line ValueErrors for log_gates [B, T, Hq] (causal self-attention only) and
  alibi_slopes [Hq]."""
  hq = q.shape[2]
  if alibi_slopes is not None and alibi_slopes.shape != (hq,):
    raise ValueError(f"{name}: alibi_slopes{alibi_slopes.shape} must be [Hq] = ({hq},)")
  if log_gates is None:
    return
  want = q.shape[:2] + (hq,)
  if log_gates.shape != want:
    raise ValueError(f"{name}: log_gates{log_gates.shape} must be [B, T, Hq] = {want}")
  if not jnp.issubdtype(log_gates.dtype, jnp.floating):
    raise ValueError(f"{name}: log_gates must be floating point; got {log_gates.dtype}")
  if not causal:
    raise ValueError(f"{name}: log_gates need causal=True (the forget-gate bias is causal)")
  if q.shape[1] != k.shape[1]:
    raise ValueError(f"{name}: log_gates need T == S; got T={q.shape[1]} S={k.shape[1]}")


class StaticConfig:
  """Base of the kernels' static configs (the nondiff argument of their custom_vjp): equal and
  hashed by `self.key`, which subclasses set (interpret params enter by identity)."""
  key: tuple = ()

  def __hash__(self):
    return hash((type(self), self.key))

  def __eq__(self, other):
    return type(other) is type(self) and self.key == other.key


def kernel_for(kernels: dict, impl: str, on: str | None = None):
  """From a family's table impl -> backend -> kernel ("any": every backend): the kernel for
  impl on backend `on` (default: this one), or None."""
  table = kernels.get(impl, {})
  return table.get(on or backend()) or table.get("any")


def call_kernel(kernels: dict, impl: str, name: str, *args, **kwargs):
  """Runs the registered kernel for impl on this backend, or says in one line that there is none."""
  kernel = kernel_for(kernels, impl)
  if kernel is None:
    raise ValueError(f"{name}: impl={impl!r} has no kernel for backend {backend()!r} yet "
                     "(impl='reference' and 'xla' run everywhere)")
  if impl == "pallas" and backend() == "gpu":
    check_hopper(name)
  return kernel(*args, **kwargs)


def check_hopper(name: str) -> None:
  """The Mosaic GPU kernels use Hopper's wgmma and TMA (sm_90a): on any other GPU, one line
  that says so before anything is compiled."""
  device = jax.devices()[0]
  capability = str(getattr(device, "compute_capability", ""))
  if not capability.startswith("9."):
    raise ValueError(f"{name}: impl='pallas' on a GPU runs Mosaic GPU kernels for Hopper "
                     f"(compute capability 9.x); this GPU is {device.device_kind!r} (compute "
                     f"capability {capability or 'unknown'}): use impl='xla' (softmax: 'cudnn')")


def tpu_interpret(kernel):
  """The TPU kernel under TPU interpret mode (runs on any backend, the CPU included)."""
  def run(q, k, v, **kwargs):
    from jax.experimental.pallas import tpu as pltpu
    return kernel(q, k, v, interpret=pltpu.InterpretParams(), **kwargs)
  return run


def gpu_interpret(kernel):
  """The Mosaic GPU kernel under GPU interpret mode (runs on any backend, the CPU included)."""
  def run(q, k, v, **kwargs):
    from jax.experimental.pallas import mosaic_gpu as plgpu
    return kernel(q, k, v, interpret=plgpu.InterpretGPUParams(), **kwargs)
  return run
