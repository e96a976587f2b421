import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (Hopper, e.g. H100 or H200, for the FP8 kernels)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # Lets a module-scoped fixture count its own failed tests (tests/test_properties.py's report).
    outcome = yield
    if call.when == "call" and outcome.get_result().failed:
        item.moe_backend_failed = True


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    # Figures some tests report (e.g. the hypothesis case counts of tests/test_properties.py).
    for line in getattr(config, "moe_backend_summary", []):
        terminalreporter.write_line(line)


@pytest.fixture
def tiny_config():
    from moe_backend import MoEConfig

    # DeepSeek-V3's structure at toy size: 16 experts in 4 groups, top-4 from the best 2 groups.
    return MoEConfig(
        hidden_size=256,
        moe_intermediate_size=256,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        n_shared_experts=1,
    )
