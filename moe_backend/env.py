"""Every `MOE_BACKEND_*` environment variable, in one table (`VARIABLES`, kept equal to README's
table by tests/test_env.py), and the one place the library reads them (`ENV`).

One truthiness rule for switches: 1/true/yes/on (any case, surrounding blanks ignored) is on,
anything else (unset, 0, false, no, off, ...) is off. Values are read at each access, not cached
at import: users and tests set them at run time, and each read is one dictionary lookup.
No imports beyond the standard library: the engines' plugins read this in every process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Variable", "VARIABLES", "ENV", "Env", "flag", "text", "TRUE_VALUES"]

TRUE_VALUES = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Variable:
    name: str
    default: str  # what unset means, as README's table shows it
    read_by: str  # "library", or the script or test suite that reads it (shell variables: ./dev, .ci)


VARIABLES: tuple[Variable, ...] = (
    Variable("MOE_BACKEND_POLICY", "the default policy", "library"),
    Variable("MOE_BACKEND_PRINT_POLICY", "0", "library"),
    Variable("MOE_BACKEND_PLAN_LOG", "none", "library"),
    Variable("MOE_BACKEND_SHADOW", "off", "library"),
    Variable("MOE_BACKEND_SHADOW_LOG", "none", "library"),
    Variable("MOE_BACKEND_SHADOW_SEED", "0", "library"),
    Variable("MOE_BACKEND_PRINT_CONFIG", "0", "library"),
    Variable("MOE_BACKEND_CHECK_FINITE", "0", "library"),
    Variable("MOE_BACKEND_CACHE_DIR", "~/.cache/moe_backend/jit", "library"),
    Variable("MOE_BACKEND_JIT_VERBOSE", "0", "library"),
    Variable("MOE_BACKEND_JIT_DEBUG", "0", "library"),
    Variable("MOE_BACKEND_SGLANG_ANY_VERSION", "0", "library"),
    Variable("MOE_BACKEND_VENV", ".venv", "./dev"),
    Variable("MOE_BACKEND_TORCH", "auto", "./dev, .ci/install_torch.sh"),
    Variable("MOE_BACKEND_VLLM_VENV", "/work/venvs/vllm", "./dev, .ci/engine_vllm.sh"),
    Variable("MOE_BACKEND_SGLANG_VENV", "/work/venvs/sglang", "./dev, .ci/engine_sglang.sh"),
    Variable("MOE_BACKEND_E2E_VLLM_VENV", "/work/venvs/e2e-vllm", ".ci/engine_e2e.sh"),
    Variable("MOE_BACKEND_E2E_SGLANG_DIR", "/work/venvs/e2e-sglang", ".ci/engine_e2e.sh"),
    Variable("MOE_BACKEND_E2E_VLLM_PYTHON", "set by .ci/engine_e2e.sh", "tests/e2e"),
    Variable("MOE_BACKEND_E2E_SGLANG_PYTHON", "set by .ci/engine_e2e.sh", "tests/e2e"),
    Variable("MOE_BACKEND_E2E_SGLANG_LIB", "set by .ci/engine_e2e.sh", "tests/e2e"),
    Variable("MOE_BACKEND_HYPOTHESIS_PROFILE", "ci", "tests/test_properties.py"),
    Variable("MOE_BACKEND_VLLM_FUSED_MOE", ".peer/fused_moe.py, else the installed vllm's", "benchmarks"),
)
_NAMES = frozenset(v.name for v in VARIABLES)


def _known(name: str) -> str:
    if name not in _NAMES:
        raise KeyError(f"{name}: not a MOE_BACKEND_* variable of moe_backend.env.VARIABLES")
    return name


def flag(name: str) -> bool:
    """The one truthiness rule of MOE_BACKEND_* switches: 1/true/yes/on (any case) is on."""
    return os.environ.get(_known(name), "").strip().lower() in TRUE_VALUES


def text(name: str) -> str:
    """The variable's value with surrounding blanks removed; "" when unset."""
    return os.environ.get(_known(name), "").strip()


class Env:
    """The library's variables, typed; each attribute reads its variable when accessed."""

    @property
    def policy(self) -> str:
        """MOE_BACKEND_POLICY: a JSON object or a path to a JSON file ("" = the default policy)."""
        return text("MOE_BACKEND_POLICY")

    @property
    def print_policy(self) -> bool:
        return flag("MOE_BACKEND_PRINT_POLICY")

    @property
    def plan_log(self) -> str | None:
        """MOE_BACKEND_PLAN_LOG: a file every process appends one line per executed plan to (tests)."""
        return text("MOE_BACKEND_PLAN_LOG") or None

    @property
    def shadow(self) -> str:
        """MOE_BACKEND_SHADOW: 'backend:rate[,backend:rate]' ("" = shadow mode off)."""
        return text("MOE_BACKEND_SHADOW")

    @property
    def shadow_log(self) -> str | None:
        return text("MOE_BACKEND_SHADOW_LOG") or None

    @property
    def shadow_seed(self) -> int:
        raw = text("MOE_BACKEND_SHADOW_SEED")
        try:
            return int(raw or 0)
        except ValueError:
            raise ValueError(f"MOE_BACKEND_SHADOW_SEED: expected an int, got {raw!r}") from None

    @property
    def print_config(self) -> bool:
        return flag("MOE_BACKEND_PRINT_CONFIG")

    @property
    def check_finite(self) -> bool:
        """MOE_BACKEND_CHECK_FINITE: the host-syncing NaN/Inf checks on the GPU too (always on CPU)."""
        return flag("MOE_BACKEND_CHECK_FINITE")

    @property
    def cache_dir(self) -> Path:
        root = text("MOE_BACKEND_CACHE_DIR")
        return Path(root).expanduser() if root else Path.home() / ".cache" / "moe_backend" / "jit"

    @property
    def jit_verbose(self) -> bool:
        return flag("MOE_BACKEND_JIT_VERBOSE")

    @property
    def jit_debug(self) -> bool:
        return flag("MOE_BACKEND_JIT_DEBUG")

    @property
    def sglang_any_version(self) -> bool:
        return flag("MOE_BACKEND_SGLANG_ANY_VERSION")

    @property
    def vllm_fused_moe(self) -> Path | None:
        """MOE_BACKEND_VLLM_FUSED_MOE: vLLM's fused_moe.py for the benchmarks' peer kernel."""
        path = text("MOE_BACKEND_VLLM_FUSED_MOE")
        return Path(path) if path else None

    def as_dict(self) -> dict[str, object]:
        """Every library setting as now read (for `info` and bug reports)."""
        return {name: getattr(self, name) for name, value in vars(Env).items() if isinstance(value, property)}


ENV = Env()
