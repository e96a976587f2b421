"""Run a callback right after a named module finishes importing (or now, if it already has).

Why: both engines load plugins in every process (API server, tokenizer, detokenizer, workers).
Importing their MoE / FP8 modules eagerly from `register()` would add 1-3 s to processes that
never build a layer; hooking those modules' import costs nothing there. Shared by the vLLM and
SGLang plugins.
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
# name -> [(callback, persistent)]; persistent callbacks also run on every re-import (a reload).
_pending: dict[str, list[tuple[Callable[[ModuleType], None], bool]]] = {}
_finder: "_PostImportFinder | None" = None


def when_imported(name: str, callback: Callable[[ModuleType], None], *, persistent: bool = False) -> None:
    """Calls `callback(module)` once `name` is fully imported: now if it is, else after its import.
    persistent=True keeps watching, so a reload of the module (fresh functions) is handled again."""
    global _finder
    with _lock:
        module = sys.modules.get(name)
        if module is None or persistent:
            _pending.setdefault(name, []).append((callback, persistent))
            if _finder is None:
                _finder = _PostImportFinder()
                sys.meta_path.insert(0, _finder)
    if module is not None:
        callback(module)


def _fire(name: str, module: ModuleType) -> None:
    with _lock:
        entries = _pending.pop(name, [])
        kept = [entry for entry in entries if entry[1]]
        if kept:
            _pending[name] = kept
    for callback, _ in entries:
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
