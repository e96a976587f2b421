"""Runs Python in a fresh process under the Triton interpreter (TRITON_INTERPRET=1 must be set
before Triton is imported, so a test that needs it starts a subprocess), with the checkout on
PYTHONPATH."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_interpreted(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python ARGS` (e.g. "-c", CODE or "-m", MODULE, ...) from the checkout's root, output captured."""
    env = dict(
        os.environ,
        TRITON_INTERPRET="1",
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
    )
    return subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def interpreted_json(code: str):
    """Runs `python -c code` under the interpreter, asserts it succeeded and returns the JSON its
    last line of output holds."""
    import json

    proc = run_interpreted("-c", code)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
