"""Fixtures of the CUDA tests: a private JIT cache directory per test."""

from __future__ import annotations

import pytest


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "jit-cache"
    monkeypatch.setenv("MOE_BACKEND_CACHE_DIR", str(root))
    return root
