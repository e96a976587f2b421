"""The patches behind `register()`. vLLM 0.33 has no registry for out-of-tree MoE backends, so
the name and the FP8 oracle entries are added to vLLM's private symbols; `PATCHES.md` lists each.

Two steps:
1. `extend_moe_backend_literal`, at plugin load: `phasemoe` joins the `MoEBackend` Literal on
   `KernelConfig.moe_backend` (and `SpeculativeConfig.moe_backend`), the pydantic validators are
   rebuilt and the argparse helper's cache is cleared, so the parser, `KernelConfig(...)` and
   `--kernel-config` accept the name. Only these config modules (already imported) are touched.
2. `patch_fp8_oracle`, when vLLM first imports `fused_moe.oracle.fp8` (an import hook; the
   oracle pulls in ~1 s of kernels that the API server never needs): an `Fp8MoeBackend` member
   and three wrapped functions that answer for `phasemoe` and defer to vLLM for every other name.

On a vLLM release other than 0.33.x the name is still registered (so the flag parses) but the
oracle only refuses it, with `UnsupportedVLLMError`, and users who do not pass the flag get one
warning at load.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
import threading
import typing
from typing import Any, Callable, Literal

from moe_backend_integrations._post_import import when_imported
from moe_backend_integrations.vllm import BACKEND_NAME, SUPPORTED_VLLM

__all__ = [
    "UnsupportedVLLMError",
    "ENUM_MEMBER",
    "ORACLE_MODULE",
    "install",
    "extend_moe_backend_literal",
    "patch_fp8_oracle",
    "patch_fp8_oracle_or_log",
]

ORACLE_MODULE = "vllm.model_executor.layers.fused_moe.oracle.fp8"
ENUM_MEMBER = "PHASEMOE"
# The oracle functions we wrap; modules that imported them by name are rebound too.
WRAPPED = ("map_fp8_backend", "backend_to_kernel_cls", "convert_to_fp8_moe_kernel_format")

logger = logging.getLogger("vllm.phasemoe")  # under vLLM's logger: its handlers and levels apply
_lock = threading.Lock()
_installed = False


class UnsupportedVLLMError(RuntimeError):
    """`--moe-backend phasemoe` on a vLLM release the plugin was not built for."""


def vllm_version() -> str:
    import vllm

    return str(vllm.__version__)


def is_supported_version(version: str) -> bool:
    return version.startswith(SUPPORTED_VLLM)


def unsupported_message(version: str) -> str:
    return (
        f"--moe-backend {BACKEND_NAME}: this moe-backend release supports vLLM "
        f"{SUPPORTED_VLLM}x only (it patches private vLLM symbols, see "
        f"moe_backend_integrations/vllm/PATCHES.md); found vLLM {version}. Install "
        f"vllm=={SUPPORTED_VLLM}* or a moe-backend release built for vLLM {version}, or pick "
        f"another --moe-backend."
    )


def install(version: str | None = None) -> None:
    """Apply both steps once per process. `version` overrides the detected vLLM version (tests)."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
    version = version or vllm_version()
    supported = is_supported_version(version)
    if not supported:
        logger.warning(
            "moe-backend: vLLM %s is not supported by the %r plugin (built for %sx); --moe-backend %s will be refused.",
            version,
            BACKEND_NAME,
            SUPPORTED_VLLM,
            BACKEND_NAME,
        )
        try:
            extend_moe_backend_literal()
        except Exception:  # the config classes changed shape: the parser will reject the name
            logger.warning("moe-backend: could not register %r with vLLM %s", BACKEND_NAME, version, exc_info=True)
            return
    else:
        # The tested release: a failure here is a bug of ours and must not pass silently.
        extend_moe_backend_literal()
    _hook_oracle(functools.partial(patch_fp8_oracle_or_log, supported=supported, version=version))


# ---- step 1: the name ----


def _set_field_type(cls: type, name: str, tp: Any) -> None:
    cls.__dataclass_fields__[name].type = tp
    cls.__annotations__[name] = tp


def extend_moe_backend_literal() -> None:
    from pydantic.dataclasses import rebuild_dataclass
    from vllm.config.kernel import KernelConfig
    from vllm.config.speculative import SpeculativeConfig
    from vllm.config.vllm import VllmConfig

    values = typing.get_args(KernelConfig.__dataclass_fields__["moe_backend"].type)
    if not values:
        raise TypeError(
            f"KernelConfig.moe_backend is not a Literal ({KernelConfig.__dataclass_fields__['moe_backend'].type!r})"
        )
    if BACKEND_NAME not in values:
        extended = Literal[(*values, BACKEND_NAME)]  # type: ignore[valid-type]
        _set_field_type(KernelConfig, "moe_backend", extended)
        rebuild_dataclass(KernelConfig, force=True)
        _set_field_type(SpeculativeConfig, "moe_backend", typing.Optional[extended])
        rebuild_dataclass(SpeculativeConfig, force=True)
        # VllmConfig holds a copy of the nested schemas: rebuild it after its fields.
        rebuild_dataclass(VllmConfig, force=True)
    arg_utils = sys.modules.get("vllm.engine.arg_utils")
    if arg_utils is not None:
        # The --moe-backend choices come from this cached helper.
        arg_utils._compute_kwargs.cache_clear()


# ---- step 2: the FP8 oracle ----


def _hook_oracle(on_loaded: Callable[[Any], None]) -> None:
    # Persistent: a reload of the oracle (fresh functions, fresh Enum) is patched again.
    when_imported(ORACLE_MODULE, on_loaded, persistent=True)


def add_enum_member(cls: type, name: str) -> Any:
    """Add `name` (value `name`) to the Enum `cls`: lookup by name, by value, iteration, pickling.

    Relies on CPython's Enum internals (`_member_map_`, `_value2member_map_`, `_member_names_`),
    checked on 3.11-3.13.
    """
    if name in cls.__members__:
        return cls[name]
    member = object.__new__(cls)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = cls
    if hasattr(cls, "_sort_order_"):
        member._sort_order_ = len(cls._member_names_)
    # type.__setattr__: EnumType.__setattr__ forbids (re)binding member names.
    type.__setattr__(cls, name, member)
    cls._member_map_[name] = member
    cls._value2member_map_[name] = member
    cls._member_names_.append(name)
    return member


def _rebind(originals: dict[str, Any], replacements: dict[str, Any], skip: Any) -> None:
    """Point modules that did `from oracle.fp8 import f` at the wrapper of `f`."""
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if module is skip or not isinstance(namespace, dict):
            continue
        for name, replacement in replacements.items():
            if namespace.get(name) is originals[name]:
                setattr(module, name, replacement)


def patch_fp8_oracle_or_log(oracle, *, supported: bool = True, version: str = "") -> None:
    """The import hook's callback. It runs inside vLLM's import of the oracle, so an exception here
    would fail that import, and with it every FP8 MoE model whatever its --moe-backend: a failure is
    logged instead, and only `phasemoe` is left unusable (vLLM then rejects the name itself)."""
    try:
        patch_fp8_oracle(oracle, supported=supported, version=version)
    except Exception:
        logger.error(
            "moe-backend: could not hook vLLM %s's FP8 MoE oracle; --moe-backend %s is unavailable, "
            "every other backend is unaffected",
            version,
            BACKEND_NAME,
            exc_info=True,
        )


def patch_fp8_oracle(oracle, *, supported: bool = True, version: str = "") -> None:
    """Teach `vllm.model_executor.layers.fused_moe.oracle.fp8` the `phasemoe` backend. Idempotent.
    On an unsupported vLLM only `map_fp8_backend` is looked up and wrapped (to refuse the name):
    the other private functions may have been renamed there."""
    # Checked on the function itself, so that a reloaded oracle (fresh functions) is patched again.
    if hasattr(oracle.map_fp8_backend, "__phasemoe_original__"):
        return
    originals = {name: getattr(oracle, name) for name in (WRAPPED if supported else WRAPPED[:1])}
    if supported:
        member = add_enum_member(oracle.Fp8MoeBackend, ENUM_MEMBER)
        replacements = {
            "map_fp8_backend": _wrap_map(originals["map_fp8_backend"], lambda: member),
            "backend_to_kernel_cls": _wrap_kernel_cls(originals["backend_to_kernel_cls"], member),
            "convert_to_fp8_moe_kernel_format": _wrap_convert(originals["convert_to_fp8_moe_kernel_format"], member),
        }
    else:
        replacements = {"map_fp8_backend": _wrap_map(originals["map_fp8_backend"], _refuse(version))}
    for name, replacement in replacements.items():
        setattr(oracle, name, replacement)
    _rebind(originals, replacements, skip=oracle)


def _wrap_map(original: Callable, ours: Callable[[], Any]) -> Callable:
    """vLLM's fp8 backend mapping, answering `ours()` for our name (the enum member, or a raise
    on an unsupported vLLM) and deferring to the original for every other name."""

    @functools.wraps(original)
    def map_fp8_backend(runner_backend):
        if runner_backend == BACKEND_NAME:
            return ours()
        return original(runner_backend)

    map_fp8_backend.__phasemoe_original__ = original
    return map_fp8_backend


def _refuse(version: str) -> Callable[[], Any]:
    def refuse():
        raise UnsupportedVLLMError(unsupported_message(version))

    return refuse


def _wrap_kernel_cls(original: Callable, member: Any) -> Callable:
    @functools.wraps(original)
    def backend_to_kernel_cls(backend):
        if backend is member:
            from moe_backend_integrations.vllm.experts import (
                PhaseMoEBatchedExperts,
                PhaseMoEExperts,
            )

            # The oracle keeps the first class whose activation format matches the deployment.
            return [PhaseMoEExperts, PhaseMoEBatchedExperts]
        return original(backend)

    backend_to_kernel_cls.__phasemoe_original__ = original
    return backend_to_kernel_cls


def _wrap_convert(original: Callable, member: Any) -> Callable:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def convert_to_fp8_moe_kernel_format(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        if bound.arguments["fp8_backend"] is not member:
            return original(*args, **kwargs)
        layer = bound.arguments["layer"]
        block = getattr(layer, "weight_block_size", None)
        if block is None or list(block) != [128, 128]:
            raise ValueError(
                f"--moe-backend {BACKEND_NAME} runs FP8 MoE layers with 128x128 "
                f"block-quantized weights (DeepSeek-V3 style); this layer has "
                f"weight_block_size={block}. Pick another --moe-backend."
            )
        # vLLM's layout is ours: w13 [E, 2I, H] (gate rows, then up), w2 [E, H, I], fp32
        # multiplier block scales `*_weight_scale_inv`. Nothing to convert.
        return tuple(bound.arguments[name].contiguous() for name in ("w13", "w2", "w13_scale", "w2_scale"))

    convert_to_fp8_moe_kernel_format.__phasemoe_original__ = original
    return convert_to_fp8_moe_kernel_format
