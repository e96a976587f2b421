"""The GPU acceptance of issue 25: a DeepSeek-V3-architecture model at the real sizes (hidden 7168,
256 experts, top-8, moe_intermediate 2048; 3 layers, the first dense; random FP8 experts built in
memory) through transformers, with our layers vs transformers' own experts on the dequantized
weights: top-1 agreement >= 99% over >= 512 positions, mean KL <= 1e-2, prefill and decode on our
layers, the kernels logged, and a negative control that must fail. Same as
`python -m examples.generate_deepseek_v3 --size real --device cuda --check` (run_device.sh step
`e2e`); it needs more memory than an 80 GB card holds (skipped there), so it lives outside tests/gpu."""

import pytest
import torch

from examples import generate_deepseek_v3 as example

pytestmark = pytest.mark.gpu
# The run's peak is 79.7 GiB allocated (an H200, 2026-12-05): more than an H100 80GB's 79 GiB.
MIN_GPU_BYTES = 96 * 2**30


def test_real_size_deepseek_v3_through_transformers(capsys):
    total = torch.cuda.get_device_properties(0).total_memory
    if total < MIN_GPU_BYTES:
        pytest.skip(f"the real-size model needs more than an 80 GB card holds; this GPU has {total / 2**30:.0f} GiB")
    rc = example.main(["--size", "real", "--device", "cuda", "--check"])
    with capsys.disabled():
        print(capsys.readouterr().out)
    assert rc == 0
    torch.cuda.empty_cache()
