"""Blockwise (flash) softmax attention: reference.py (jnp), api.py (the entry point)."""
from pallas_kernels.blockwise.api import blockwise_attention
from pallas_kernels.blockwise.reference import blockwise_reference, dense_attention

__all__ = ["blockwise_attention", "blockwise_reference", "dense_attention"]
