"""Run a callback right after a named module finishes importing (or now, if it already has).

Why: SGLang loads plugins in every process (API server, tokenizer, detokenizer, scheduler).
Importing the MoE runner and FP8 quantization modules eagerly from `register()` would add
~2-3 s to processes that never build a layer; hooking their import costs nothing there.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
from types import ModuleType
from typing import Callable

__all__ = ["when_imported"]

_lock = threading.RLock()
_pending: dict[str, list[Callable[[ModuleType], None]]] = {}
_finder: "_PostImportFinder | None" = None


def when_imported(name: str, callback: Callable[[ModuleType], None]) -> None:
    """Calls `callback(module)` once `name` is fully imported: now if it is, else after its import."""
    global _finder
    with _lock:
        module = sys.modules.get(name)
        if module is None:
            _pending.setdefault(name, []).append(callback)
            if _finder is None:
                _finder = _PostImportFinder()
                sys.meta_path.insert(0, _finder)
            return
    callback(module)


def _fire(name: str, module: ModuleType) -> None:
    with _lock:
        callbacks = _pending.pop(name, [])
    for callback in callbacks:
        callback(module)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: asks the finders after it and wraps the loader of watched names."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _NotifyingLoader(spec.loader)
        return spec


class _NotifyingLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        # The module is complete (and in sys.modules) here, before its importer resumes.
        _fire(module.__name__, module)

    def __getattr__(self, attr):  # get_source, get_resource_reader, is_package, ...
        return getattr(self._loader, attr)
