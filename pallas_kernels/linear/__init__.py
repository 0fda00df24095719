"""Causal linear attention: reference.py (parallel, chunked, recurrent jnp forms), api.py."""
from pallas_kernels.linear.api import (linear_attention, linear_attention_init_state,
                                       linear_attention_state, linear_attention_step)
from pallas_kernels.linear.reference import linear_chunked, linear_parallel, linear_recurrent

__all__ = ["linear_attention", "linear_attention_init_state", "linear_attention_state",
           "linear_attention_step", "linear_chunked", "linear_parallel", "linear_recurrent"]
