"""Sparse softmax attention: patterns.py, routing.py (MoBA), reference.py (dense masked and
block-skipping jnp), api.py."""
from pallas_kernels.sparse.api import sparse_attention
from pallas_kernels.sparse.patterns import (BlockMask, MoBA, SlidingWindow, block_mask,
                                            local_global_strided)
from pallas_kernels.sparse.reference import block_lists, sparse_blockwise, sparse_reference
from pallas_kernels.sparse.routing import moba_routing

__all__ = ["BlockMask", "MoBA", "SlidingWindow", "block_lists", "block_mask",
           "local_global_strided", "moba_routing", "sparse_attention", "sparse_blockwise",
           "sparse_reference"]
