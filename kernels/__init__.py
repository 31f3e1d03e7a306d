"""vidaccel.kernels — the attention kernel family (Triton) and its pure-PyTorch references.

The references and the block planner import without Triton; the Triton launchers
(``vidaccel.kernels.attention.attention_fwd``, ``vidaccel.kernels.merge.merge_attention_fwd``) are
imported where used, so that ``TRITON_INTERPRET`` can be set before Triton loads. This package never
imports diffusers.
"""

from .plan import BlockPlan, plan_blocks
from .reference import attention_reference, merge_attention_reference

__all__ = ["BlockPlan", "plan_blocks", "attention_reference", "merge_attention_reference"]
