"""vLLM plugin tests: they need vLLM installed (`.ci/engine_vllm.sh` builds that venv); elsewhere
each module skips. The plugin patches process-wide state, so most facts come from `_probe.py` run
in fresh processes, as vLLM's own processes would load the plugin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# vLLM picks its platform at import; this machine and CI have no GPU.
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

PROBE = Path(__file__).with_name("_probe.py")
_cache: dict[tuple, dict] = {}


def run_probe(*flags: str, vllm_plugins: str | None = None) -> dict:
    """The probe's JSON report for these flags; VLLM_PLUGINS unset (None) or set to the string."""
    key = (flags, vllm_plugins)
    if key not in _cache:
        env = dict(os.environ, VLLM_TARGET_DEVICE="cpu")
        env.pop("VLLM_PLUGINS", None)
        if vllm_plugins is not None:
            env["VLLM_PLUGINS"] = vllm_plugins
        proc = subprocess.run(
            [sys.executable, str(PROBE), *flags], env=env, capture_output=True, text=True, timeout=600
        )
        if proc.returncode != 0:
            raise AssertionError(
                f"probe {flags} VLLM_PLUGINS={vllm_plugins!r} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
            )
        _cache[key] = json.loads(proc.stdout.strip().splitlines()[-1])
    return _cache[key]


@pytest.fixture(scope="session")
def probe():
    return run_probe


@pytest.fixture(scope="session")
def on():
    """The probe's report with the plugin loaded (VLLM_PLUGINS unset)."""
    return run_probe()


@pytest.fixture(scope="session")
def off():
    """The probe's report with every plugin excluded (VLLM_PLUGINS="")."""
    return run_probe(vllm_plugins="")
