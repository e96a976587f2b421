"""Every in-process cache of moe_backend, by name -> entries, for the no-growth tests: the
functools caches of every loaded moe_backend module (functions and classmethods) and the
module-level dicts that memoize kernels, buffers and contexts."""

from __future__ import annotations

import gc
import sys

# Module-level dicts that memoize per kernel / device / stream (named so a new one is seen here).
_DICTS = {
    "moe_backend.cuda.jit": ("_fallback_roots",),
    "moe_backend.cuda.driver": ("_loaded", "_primary_contexts"),
    "moe_backend.eager_graphs": ("_graphs", "_static", "_pools", "_eager_once"),
    "moe_backend.kernels._launch_utils": ("_resident_grids",),
}


def _functools_caches(module) -> dict[str, object]:
    found = {}
    for name, value in vars(module).items():
        candidates = [(name, value)]
        if isinstance(value, type) and value.__module__ == module.__name__:
            candidates += [(f"{name}.{attr}", getattr(value, attr, None)) for attr in vars(value)]
        for label, obj in candidates:
            if callable(getattr(obj, "cache_info", None)):
                found[f"{module.__name__}.{label}"] = obj
    return found


def cache_sizes() -> dict[str, tuple[int, int | None]]:
    """name -> (entries, maxsize or None for unbounded)."""
    sizes: dict[str, tuple[int, int | None]] = {}
    for mod_name, module in sorted(sys.modules.items()):
        if not mod_name.startswith("moe_backend") or module is None:
            continue
        for name, fn in _functools_caches(module).items():
            info = fn.cache_info()
            sizes[name] = (info.currsize, info.maxsize)
        for attr in _DICTS.get(mod_name, ()):
            sizes[f"{mod_name}.{attr}"] = (len(getattr(module, attr)), None)
    return sizes


def triton_kernel_variants() -> dict[str, int]:
    """Compiled variants per Triton kernel (its specializations: a leak here is a recompile per
    distinct token count)."""
    out = {}
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        return out
    for obj in gc.get_objects():
        if isinstance(obj, JITFunction) and obj.__module__.startswith("moe_backend"):
            cache = getattr(obj, "device_caches", None) or getattr(obj, "cache", None) or {}
            count = 0
            for per_device in cache.values():
                kernels = per_device[0] if isinstance(per_device, tuple) else per_device
                count += len(kernels) if hasattr(kernels, "__len__") else 1
            out[f"{obj.__module__}.{obj.__name__}"] = count
    return out
