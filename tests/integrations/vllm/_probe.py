"""Run in a fresh process by the tests: load vLLM's general plugins the way vLLM does, then report
what vLLM accepts and selects, as one JSON object on the last line of stdout.

    python _probe.py [--quick] [--import-quant-first] [--install-version X.Y.Z]

--quick: plugin-loading facts only. --import-quant-first: import vLLM's FP8 quantization module
(which imports the oracle's functions by name) before the plugins load. --install-version: call
the plugin's installer with that vLLM version before vLLM's loader runs (the refusal path).
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import typing

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

ORACLE = "vllm.model_executor.layers.fused_moe.oracle.fp8"
NAME = "phasemoe"


def _try(fn):
    try:
        return {"ok": fn()}
    except SystemExit as exc:
        return {"error": f"SystemExit: {exc.code}"}
    except Exception as exc:  # the report records the failure; the tests judge it
        return {"error": f"{type(exc).__name__}: {exc}"}


def _qualname(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def loading_facts(report: dict) -> None:
    from vllm.config.kernel import KernelConfig

    report["literal"] = list(typing.get_args(KernelConfig.__dataclass_fields__["moe_backend"].type))
    report["oracle_imported"] = ORACLE in sys.modules
    report["experts_imported"] = "moe_backend_integrations.vllm.experts" in sys.modules
    patches = sys.modules.get("moe_backend_integrations.vllm._patches")
    report["installed"] = bool(patches and patches._installed)


def config_facts(report: dict) -> None:
    from vllm.config import VllmConfig
    from vllm.config.kernel import KernelConfig
    from vllm.config.speculative import SpeculativeConfig
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    values = [NAME, "PhaseMoE", "phasemo", "triton", "deep_gemm"]
    report["kernel_config"] = {v: _try(lambda v=v: KernelConfig(moe_backend=v).moe_backend) for v in values}
    report["vllm_config"] = _try(lambda: VllmConfig(kernel_config={"moe_backend": NAME}).kernel_config.moe_backend)
    report["speculative_annotation"] = repr(SpeculativeConfig.__pydantic_fields__["moe_backend"].annotation)
    report["pickle"] = _try(lambda: pickle.loads(pickle.dumps(KernelConfig(moe_backend=NAME))).moe_backend)

    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    action = next(a for a in parser._actions if "--moe-backend" in a.option_strings)
    report["parser_choices"] = list(action.choices)
    report["parser"] = {v: _try(lambda v=v: parser.parse_args(["--moe-backend", v]).moe_backend) for v in values}
    report["parser_kernel_config_json"] = _try(
        lambda: parser.parse_args(["--kernel-config", json.dumps({"moe_backend": NAME})]).kernel_config.moe_backend
    )


def _moe_config(moe_backend: str, batched: bool):
    import torch
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.config import (
        FusedMoEConfig,
        FusedMoEParallelConfig,
        RoutingMethodType,
    )

    if batched:  # DeepEP low-latency over 2 DP ranks: vLLM's batched activation format
        parallel = FusedMoEParallelConfig(
            tp_size=1,
            pcp_size=1,
            dp_size=2,
            ep_size=2,
            tp_rank=0,
            pcp_rank=0,
            dp_rank=0,
            ep_rank=0,
            sp_size=1,
            use_ep=True,
            all2all_backend="deepep_low_latency",
            enable_eplb=False,
        )
        assert parallel.use_batched_activation_format
    else:
        parallel = FusedMoEParallelConfig.make_no_parallel()
    return FusedMoEConfig(
        num_experts=8,
        experts_per_token=2,
        hidden_dim=256,
        intermediate_size=256,
        num_local_experts=8 // parallel.ep_size,
        num_logical_experts=8,
        activation=MoEActivation.SILU,
        device="cpu",
        routing_method=RoutingMethodType.DeepSeekV3,
        moe_parallel_config=parallel,
        in_dtype=torch.bfloat16,
        moe_backend=moe_backend,
    )


def oracle_facts(report: dict) -> None:
    from vllm.model_executor.layers.fused_moe.oracle import fp8 as oracle
    from vllm.model_executor.layers.quantization.utils.quant_utils import (
        kFp8Dynamic128Sym,
        kFp8DynamicTensorSym,
        kFp8Static128BlockSym,
        kFp8StaticTensorSym,
    )

    names = report["literal"]
    report["enum_members"] = [m.name for m in oracle.Fp8MoeBackend]
    report["map"] = {n: _try(lambda n=n: oracle.map_fp8_backend(n).name) for n in names}
    report["kernel_cls"] = {
        m.name: _try(lambda m=m: [_qualname(c) for c in oracle.backend_to_kernel_cls(m)]) for m in oracle.Fp8MoeBackend
    }

    from vllm.config import VllmConfig, set_current_vllm_config

    def select(name, batched, keys=(kFp8Static128BlockSym, kFp8Dynamic128Sym)):
        with set_current_vllm_config(VllmConfig()):  # `auto` reads the model config
            backend, cls = oracle.select_fp8_moe_backend(_moe_config(name, batched), *keys)
        return [backend.name, cls and _qualname(cls)]

    for batched in (False, True):
        report["select_batched" if batched else "select"] = {n: _try(lambda n=n: select(n, batched)) for n in names}
    report["select_per_tensor"] = _try(lambda: select(NAME, False, (kFp8StaticTensorSym, kFp8DynamicTensorSym)))

    # Imported after the patch when not already (--import-quant-first): both paths must rebind.
    import vllm.model_executor.layers.quantization.fp8  # noqa: F401

    rebound = {}
    for module_name, module in list(sys.modules.items()):
        if module_name.startswith("vllm.") and module is not oracle:
            fn = getattr(module, "convert_to_fp8_moe_kernel_format", None)
            if fn is not None:
                rebound[module_name] = fn is oracle.convert_to_fp8_moe_kernel_format
    report["convert_rebound"] = rebound


def main(argv: list[str]) -> None:
    report: dict = {"vllm_plugins": os.environ.get("VLLM_PLUGINS")}
    if "--import-quant-first" in argv:
        import vllm.model_executor.layers.quantization.fp8  # noqa: F401
    if "--install-version" in argv:
        from moe_backend_integrations.vllm import _patches

        _patches.install(version=argv[argv.index("--install-version") + 1])
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    loading_facts(report)
    if "--quick" not in argv:
        config_facts(report)
        oracle_facts(report)
    sys.stdout.write("\n" + json.dumps(report) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
