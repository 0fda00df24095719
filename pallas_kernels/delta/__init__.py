"""The delta rule (DeltaNet, Gated DeltaNet): reference.py (recurrent and chunked WY / UT jnp
forms), api.py. No Pallas kernel yet."""
from pallas_kernels.delta.api import delta_rule, delta_rule_init_state, delta_rule_step
from pallas_kernels.delta.reference import delta_chunked, delta_recurrent

__all__ = ["delta_chunked", "delta_recurrent", "delta_rule", "delta_rule_init_state",
           "delta_rule_step"]
