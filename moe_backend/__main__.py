"""`python -m moe_backend {info,demo,tune,compare,ab-serve}`.

Each subcommand is registered by one `add_<name>(subparsers)` function that builds its parser and
sets `run` (a function of the parsed arguments and that parser, returning the exit status).
The layer and the kernels are imported inside `run`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

from moe_backend._cli import add_subcommand, int_range, new_parser
from moe_backend._install import extra_install_command
from moe_backend.ab.cli import add_ab_parsers


def _version(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    try:
        from importlib.metadata import version

        dist = {"deep_gemm": "sgl-deep-gemm"}.get(module, module)
        return version(dist)
    except Exception:  # noqa: BLE001 - a module without distribution metadata is still present
        return "present"


def _kernel_families(torch) -> list[tuple[str, str]]:
    """Every kernel family the plans can pick, each with whether it runs here and, if not, why."""
    gpu = torch.cuda.is_available()
    hopper = gpu and torch.cuda.get_device_capability(0) == (9, 0)
    triton = _version("triton")
    if not gpu:
        triton_why = "not here (needs a CUDA GPU; FP8 tensor cores from sm_89)"
    elif triton is None:
        triton_why = "not here (pip install triton)"
    else:
        triton_why = f"available (triton {triton}): grouped GEMMs, layout builders, quant, combine"
    if not hopper:
        cuda_why = "not here (needs a Hopper GPU, sm_90a)"
    elif importlib.util.find_spec("cuda") is None or importlib.util.find_spec("cuda.bindings") is None:
        cuda_why = "not here (pip install cuda-bindings: the JIT loads cubins through the driver API)"
    else:
        from moe_backend.cuda import jit

        try:
            cuda_why = f"available (nvcc {jit.find_nvcc()}, cache {jit.cache_dir()})"
        except jit.JITError as exc:
            cuda_why = f"not here ({exc})"
    deepgemm = _version("deep_gemm")
    deepgemm_why = (
        f"not installed ({extra_install_command('deepgemm')})"
        if deepgemm is None
        else f"installed ({deepgemm})" + ("" if hopper else ", but needs a Hopper GPU")
    )
    return [
        ("reference (torch)", "available: the oracle, and every GEMM without a GPU"),
        ("Triton (ours)", triton_why),
        ("CUDA C++ grouped GEMM (ours, JIT)", cuda_why),
        ("DeepGEMM (optional peer provider)", deepgemm_why),
    ]


def run_info(_: argparse.Namespace, __: argparse.ArgumentParser) -> int:
    import torch

    from moe_backend import __version__
    from moe_backend.dispatch.policy import Policy
    from moe_backend.env import VARIABLES

    print(f"moe-backend {__version__}")
    print(f"python      {sys.version.split()[0]}")
    print(f"torch       {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    print(f"triton      {_version('triton') or 'not installed'}")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        print(
            f"GPU         {props.name}, sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
            f"{props.total_memory / 2**30:.0f} GiB"
        )
    else:
        print("GPU         none (the layer runs on the torch reference path)")
    for i, (family, why) in enumerate(_kernel_families(torch)):
        print(f"{'kernels' if i == 0 else '':<11} {family}: {why}")
    print(
        "peers       "
        + ", ".join(
            f"{name}: {_version(mod) or 'not installed'}"
            for name, mod in (("DeepGEMM", "deep_gemm"), ("vLLM", "vllm"), ("SGLang", "sglang"))
        )
    )
    policy = Policy.from_env()
    print(f"policy      {policy.to_dict()}")
    if not torch.cuda.is_available():
        for key, name in policy.cuda_only_keys():
            print(f"{'':<11} {key}={name!r} runs on CUDA tensors only: a forward here refuses it")
    set_here = [f"{v.name}={os.environ[v.name]!r}" for v in VARIABLES if v.name in os.environ]
    print(f"environment {', '.join(set_here) or 'no MOE_BACKEND_* variable set'} (README's table)")
    return 0


def add_info(subparsers) -> None:
    parser = add_subcommand(subparsers, "info", "versions, GPU, available kernels and peers, the active policy")
    parser.set_defaults(run=run_info)


def run_demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from moe_backend import demo

    return demo.run(args, parser)


def add_demo(subparsers) -> None:
    parser = add_subcommand(
        subparsers,
        "demo",
        "run a DeepSeek-V3-shaped MoE layer and check it against the reference",
        description="Runs one DeepSeek-V3 MoE layer (random FP8 weights, or a layer of a checkpoint), times "
        "it, checks it against the torch reference and prints which policy kernel and which "
        "GEMM provider ran. On CPU the default is a reduced layer (DeepSeek-V3's router, a "
        "smaller expert MLP); on a GPU the full size.",
    )
    parser.add_argument(
        "--checkpoint", metavar="PATH", help="a DeepSeek-V3-format FP8 checkpoint folder (default: random weights)"
    )
    parser.add_argument(
        "--layer", type=int_range(0), default=None, help="MoE layer of the checkpoint (default: its first MoE layer)"
    )
    parser.add_argument(
        "--size",
        choices=("reduced", "full"),
        default=None,
        help="random weights' dimensions: reduced (hidden 512, intermediate 128) or full "
        "(DeepSeek-V3's 7168, 2048); default: full on a GPU, reduced on CPU",
    )
    parser.add_argument(
        "--tokens",
        type=int_range(0, 65536),
        default=64,
        help="tokens in the batch, 0..65536 (default 64; 0 = an empty batch)",
    )
    parser.add_argument(
        "--ep-size",
        type=int_range(1, 1024),
        default=None,
        help="hold 1/EP of the routed experts; must divide their count (default: all, "
        "or 1/8 of a full-size layer on CPU)",
    )
    parser.add_argument("--reps", type=int_range(1, 10000), default=3, help="timed repetitions, 1..10000 (default 3)")
    parser.add_argument("--seed", type=int_range(0, 2**31 - 1), default=0, help="random seed (default 0)")
    parser.add_argument(
        "--threads",
        type=int_range(0, 1024),
        default=1,
        help="CPU threads for torch, 0 = torch's default (default 1: the reference path's "
        "small GEMMs gain little from more, and on a busy machine spinning OpenMP "
        "threads slow it down several-fold)",
    )
    parser.add_argument("--cpu", action="store_true", help="use the reference path even when a GPU is present")
    parser.set_defaults(run=run_demo)


def run_tune(args: argparse.Namespace, _: argparse.ArgumentParser) -> int:
    from moe_backend import tune

    return tune.run(args)


def add_tune(subparsers) -> None:
    from moe_backend import tune

    parser = add_subcommand(subparsers, "tune", "regenerate the kernels' tuned configs on this GPU")
    tune.add_arguments(parser)
    parser.set_defaults(run=run_tune)


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("python -m moe_backend", __doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_info(subparsers)
    add_demo(subparsers)
    add_tune(subparsers)
    add_ab_parsers(subparsers)
    return parser


# The subcommands that build layers in this process: a bad MOE_BACKEND_POLICY / MOE_BACKEND_SHADOW
# would otherwise surface as a traceback at their first forward, after the setup's wait.
_RUNS_LAYERS = ("info", "demo", "tune", "compare")


def environment_problem() -> str | None:
    """What is wrong with the MOE_BACKEND_* settings a layer reads per call, or None."""
    from moe_backend.ab.shadow_spec import parse_shadow_spec
    from moe_backend.dispatch.policy import Policy
    from moe_backend.env import ENV

    try:
        Policy.from_env()
    except (ValueError, TypeError) as exc:
        text = str(exc)
        return text if text.startswith("MOE_BACKEND_POLICY") else f"MOE_BACKEND_POLICY: {text}"
    try:
        if ENV.shadow:
            parse_shadow_spec(ENV.shadow)
            ENV.shadow_seed  # noqa: B018 (parsing it is the check)
    except (ValueError, TypeError) as exc:
        return str(exc)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # The subcommand's parser reports it, so the usage shown is that subcommand's.
        args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command in _RUNS_LAYERS:
        problem = environment_problem()
        if problem:
            args.parser.error(problem)
    return args.run(args, args.parser)


if __name__ == "__main__":
    sys.exit(main())
