"""SGLang plugin: serves `--moe-runner-backend phasemoe` with moe_backend's kernels.

Loaded by SGLang from the `sglang.srt.plugins` entry point (`phasemoe =
"moe_backend_integrations.sglang:register"`) in every SGLang process. `register()` is cheap: it
adds the flag's choice and arms post-import hooks; the heavy SGLang modules are touched only
when the process imports them anyway (the scheduler, while building the model). Nothing changes
for a server started without `--moe-runner-backend phasemoe`.

Pinned to `sglang==0.5.23`: the Fp8MoEMethod hooks touch private names (see PATCHES.md).
`MOE_BACKEND_SGLANG_ANY_VERSION=1` overrides the pin at your own risk.
"""

from __future__ import annotations

import logging
from importlib import metadata

from moe_backend.constants import BACKEND_NAME
from moe_backend.env import ENV
from moe_backend_integrations._post_import import when_imported

__all__ = ["register", "check", "BACKEND_NAME", "SGLANG_VERSION"]

SGLANG_VERSION = "0.5.23"
ANY_VERSION_ENV = "MOE_BACKEND_SGLANG_ANY_VERSION"  # ENV.sglang_any_version (named in messages)

logger = logging.getLogger(__name__)

_registered = False
# step name -> exception; SGLang only logs plugin exceptions, so failures are kept for `check()`.
_failures: dict[str, BaseException] = {}
_done: set[str] = set()

_MODULE_MOE_UTILS = "sglang.srt.layers.moe.utils"
_MODULE_RUNNER = "sglang.srt.layers.moe.moe_runner.runner"
_MODULE_FP8 = "sglang.srt.layers.quantization.fp8"


def register() -> None:
    """The `sglang.srt.plugins` entry point (called with no arguments). Idempotent."""
    global _registered
    if _registered:
        return
    _registered = True

    try:
        version = metadata.version("sglang")
    except metadata.PackageNotFoundError as exc:
        _fail("version", exc)
        return
    if version != SGLANG_VERSION:
        if not ENV.sglang_any_version:
            _fail(
                "version",
                RuntimeError(
                    f"moe-backend's SGLang plugin supports sglang=={SGLANG_VERSION} only (found "
                    f"{version}); `--moe-runner-backend {BACKEND_NAME}` stays unavailable. Install "
                    f"sglang=={SGLANG_VERSION}, or set {ANY_VERSION_ENV}=1 to try anyway."
                ),
            )
            return
        logger.warning(
            "%s: sglang %s is not the tested %s (%s=1 is set)", BACKEND_NAME, version, SGLANG_VERSION, ANY_VERSION_ENV
        )

    _step("choices", _add_choice)
    when_imported(_MODULE_MOE_UTILS, lambda mod: _step("backend_name", _register_backend_name, mod))
    when_imported(_MODULE_RUNNER, lambda mod: _step("runner_core", _register_runner_core, mod))
    when_imported(_MODULE_FP8, lambda mod: _step("fp8_hooks", _install_fp8_hooks, mod))
    logger.info("%s: moe-backend SGLang plugin registered (pinned to sglang==%s)", BACKEND_NAME, SGLANG_VERSION)


def check() -> None:
    """Raises if any registration step failed (the first failure is the cause)."""
    if _failures:
        step, exc = next(iter(_failures.items()))
        raise RuntimeError(f"{BACKEND_NAME}: SGLang plugin step {step!r} failed: {exc}") from exc


def _fail(step: str, exc: BaseException) -> None:
    _failures.setdefault(step, exc)
    logger.error(
        "%s: SGLang plugin step %r FAILED: %s", BACKEND_NAME, step, exc, exc_info=(type(exc), exc, exc.__traceback__)
    )


def _step(name: str, fn, *args) -> None:
    if name in _done:
        return
    _done.add(name)
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001 - recorded, logged loudly, and re-raised by check()
        _fail(name, exc)


def _add_choice() -> None:  # the choices module is light and already loaded by the plugin loader
    from sglang.srt.arg_groups import choices

    if BACKEND_NAME not in choices.MOE_RUNNER_BACKEND_CHOICES:
        choices.add_moe_runner_backend_choices([BACKEND_NAME])


def _register_backend_name(utils) -> None:
    # The scheduler resolves `--moe-runner-backend` in initialize_moe_config(); the name must be
    # known by then, which may be before the runner module has been imported.
    try:
        utils.resolve_moe_runner_backend(BACKEND_NAME)
    except ValueError:
        utils.register_moe_runner_backend_name(BACKEND_NAME)


def _make_runner_core(config):
    from moe_backend_integrations.sglang.core import PhaseMoeRunnerCore

    return PhaseMoeRunnerCore(config)


def _register_runner_core(runner) -> None:
    registered = getattr(runner, "_CUSTOM_RUNNER_CORE_FACTORIES", {}).get(BACKEND_NAME)
    if registered is _make_runner_core:
        return
    if registered is not None:
        raise RuntimeError(
            f"another plugin already registered an MoE runner core named {BACKEND_NAME!r} ({registered!r})"
        )
    runner.register_moe_runner_core(BACKEND_NAME, _make_runner_core)


def _install_fp8_hooks(fp8) -> None:
    from moe_backend_integrations.sglang.hooks import install_fp8_hooks

    install_fp8_hooks(fp8)
