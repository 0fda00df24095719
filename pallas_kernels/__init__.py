"""pallas_kernels: attention functions with jnp references and Pallas kernels (GPU and TPU).

Standalone: depends on jax and numpy only. Layout: q [B, T, Hq, D], k/v [B, S, Hkv, D].
"""
from pallas_kernels.blockwise import blockwise_attention
from pallas_kernels.delta import delta_rule, delta_rule_init_state, delta_rule_step
from pallas_kernels.linear import (linear_attention, linear_attention_init_state,
                                   linear_attention_state, linear_attention_step)
from pallas_kernels.sparse import (BlockMask, MoBA, SlidingWindow, block_mask,
                                   local_global_strided, sparse_attention)

__all__ = ["BlockMask", "MoBA", "SlidingWindow", "block_mask", "blockwise_attention",
           "delta_rule", "delta_rule_init_state", "delta_rule_step",
           "linear_attention", "linear_attention_init_state", "linear_attention_state",
           "linear_attention_step",
           "local_global_strided", "sparse_attention"]
