"""pallas_kernels: attention functions with jnp references and Pallas kernels (GPU and TPU).

Standalone: depends on jax and numpy only. Layout: q [B, T, Hq, D], k/v [B, S, Hkv, D].
"""
from pallas_kernels.blockwise import blockwise_attention

__all__ = ["blockwise_attention"]
