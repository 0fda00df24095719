"""The Mosaic TPU kernels lower for real TPUs, forward and backward, on the CPU.

Interpret mode (the other TPU tests) runs a kernel's semantics but accepts operations and block
shapes that Mosaic TPU rejects. jax.export for platform "tpu", under an abstract mesh that names
the chip, runs the Pallas -> Mosaic lowering a TPU would run (block shapes against the (8, 128)
tiling, a lowering rule for every primitive in the kernel bodies, scalar prefetch, scratch),
without a TPU. libtpu's own compile of the Mosaic module (layouts, VMEM budget) still needs one.
"""
import jax
import jax.numpy as jnp
import pytest
from jax import export

from pallas_kernels.blockwise.pallas_tpu import flash_attention_tpu
from pallas_kernels.linear.pallas_tpu import linear_attention_tpu
from pallas_kernels.sparse.patterns import MoBA, SlidingWindow, local_global_strided
from pallas_kernels.sparse.pallas_tpu import sparse_flash_tpu

B, T, HQ, HKV = 1, 640, 4, 2  # T not a multiple of 128: the ragged tail is part of the lowering
SEG = jax.ShapeDtypeStruct((B, T), jnp.int32)
GATES = jax.ShapeDtypeStruct((B, T, HQ), jnp.float32)


def _mesh_for(device_kind):
  chip = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=1, platform="tpu")
  return jax.sharding.AbstractMesh((1,), ("x",), abstract_device=chip)


def _export_for_tpu(attn, extra, *, d=128, dtype=jnp.bfloat16, device_kind="TPU v5 lite"):
  """The MLIR of value_and_grad(sum(attn)) exported for the chip; fails if any kernel (forward,
  or one of the backward kernels) does not lower."""
  q = jax.ShapeDtypeStruct((B, T, HQ, d), dtype)
  kv = jax.ShapeDtypeStruct((B, T, HKV, d), dtype)

  def loss(q, k, v, *extra):
    return jnp.sum(attn(q, k, v, *extra).astype(jnp.float32))

  with jax.sharding.use_abstract_mesh(_mesh_for(device_kind)):
    exported = export.export(jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))),
                             platforms=("tpu",))(q, kv, kv, *extra)
  return exported.mlir_module()


CASES = {
    # name: (attention(q, k, v, *extra), extra inputs, Mosaic kernels in forward + backward)
    "flash causal segments": (
        lambda q, k, v, s: flash_attention_tpu(q, k, v, causal=True, segment_ids=s), (SEG,), 3),
    "flash full": (lambda q, k, v: flash_attention_tpu(q, k, v, causal=False), (), 3),
    "flash forget gates segments": (  # the dk/dv kernel also writes the gates' column sums
        lambda q, k, v, g, s: flash_attention_tpu(q, k, v, log_gates=g, segment_ids=s),
        (GATES, SEG), 3),
    "sliding window": (
        lambda q, k, v: sparse_flash_tpu(q, k, v, pattern=SlidingWindow(200)), (), 3),
    "sliding window alibi": (
        lambda q, k, v: sparse_flash_tpu(q, k, v, pattern=SlidingWindow(200),
                                         alibi_slopes=jnp.linspace(1 / 256, 0.5, HQ)), (), 3),
    "block mask": (
        lambda q, k, v: sparse_flash_tpu(q, k, v, pattern=local_global_strided(
            128, 5, local=2, global_blocks=1, stride=3)), (), 3),
    "moba": (lambda q, k, v, s: sparse_flash_tpu(q, k, v, pattern=MoBA(128, 3), segment_ids=s),
             (SEG,), 6),
    "linear gates normalised": (
        lambda q, k, v, g: linear_attention_tpu(q, k, v, feature_map="elu1", decay=g,
                                                normalize=True, chunk_size=64), (GATES,), 3),
    "linear constant decay chunk 128 segments": (
        lambda q, k, v, s: linear_attention_tpu(
            q, k, v, feature_map="relu", decay=-jnp.linspace(0.01, 1.0, HQ), normalize=True,
            chunk_size=128, segment_ids=s), (SEG,), 3),
    "linear no decay": (
        lambda q, k, v: linear_attention_tpu(q, k, v, feature_map="identity", decay=None,
                                             normalize=False, chunk_size=64), (), 3),
}


@pytest.mark.parametrize("name", list(CASES))
def test_lowers_for_tpu_v5e(name):
  attn, extra, kernels = CASES[name]
  text = _export_for_tpu(attn, extra)
  assert text.count("tpu_custom_call") == kernels, f"{name}: expected {kernels} Mosaic kernels"


@pytest.mark.parametrize("device_kind", ["TPU v4", "TPU v6 lite"])
@pytest.mark.parametrize("d,dtype", [(64, jnp.float32), (256, jnp.bfloat16)])
def test_lowers_on_other_chips_head_dims_and_dtypes(device_kind, d, dtype):
  for name in ("flash causal segments", "flash forget gates segments", "linear gates normalised"):
    attn, extra, kernels = CASES[name]
    text = _export_for_tpu(attn, extra, d=d, dtype=dtype, device_kind=device_kind)
    assert text.count("tpu_custom_call") == kernels, (name, device_kind, d)
