"""The DeepSeek-V3 MoE module and its router."""

from moe_backend.layers.deepseek_v3_moe import DeepseekV3MoE
from moe_backend.layers.router import noaux_tc_route

__all__ = ["DeepseekV3MoE", "noaux_tc_route"]
