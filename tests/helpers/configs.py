"""Model shapes the GPU tests share."""

from moe_backend import MoEConfig

# DeepSeek-V3's routing at a size that builds in seconds (256 experts of 7168 x 2048 would not):
# 64 experts in 8 groups, top-4 groups, top-8 experts, one shared expert; hidden and intermediate
# sizes multiples of 128 with more than one scale group each.
SMALL_V3 = MoEConfig(
    hidden_size=1024,
    moe_intermediate_size=384,
    n_routed_experts=64,
    num_experts_per_tok=8,
    n_group=8,
    topk_group=4,
    routed_scaling_factor=2.5,
    n_shared_experts=1,
)
