"""The plugin as SGLang loads it: entry point, `SGLANG_PLUGINS` filter, the server-argument parser,
lazy hooks, idempotence, the version pin. Each case runs in a fresh interpreter (SGLang loads
plugins once per process), as `launch_server` and the scheduler would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata

import pytest

pytest.importorskip("sglang")

ENTRY_POINT = "moe_backend_integrations.sglang:register"

PROBE = r"""
import argparse, json, sys
from sglang.srt.plugins import load_plugins
from sglang.srt.plugins.hook_registry import HookRegistry

load_plugins()
res = {"plugin_loaded": "moe_backend_integrations.sglang" in sys.modules,
       "fp8_imported_by_plugin": "sglang.srt.layers.quantization.fp8" in sys.modules}
from sglang.srt.arg_groups.choices import MOE_RUNNER_BACKEND_CHOICES
from sglang.srt.server_args import ServerArgs

parser = argparse.ArgumentParser()
ServerArgs.add_cli_args(parser)

def parses(value):
    try:
        return parser.parse_args(["--model-path", "m", "--moe-runner-backend", value]).moe_runner_backend == value
    except SystemExit:
        return False

res.update(parses_phasemoe=parses("phasemoe"), parses_phasemo=parses("phasemo"), parses_triton=parses("triton"))
import sglang.srt.layers.quantization.fp8 as fp8
from sglang.srt.layers.moe.utils import resolve_moe_runner_backend
try:
    res["resolves"] = resolve_moe_runner_backend("phasemoe").value == "phasemoe"
except ValueError:
    res["resolves"] = False
res["hooked"] = all(hasattr(getattr(fp8.Fp8MoEMethod, m), "__wrapped__") for m in ("create_moe_runner", "apply"))
if res["plugin_loaded"]:
    import moe_backend_integrations.sglang as plugin
    from moe_backend_integrations.sglang.hooks import install_fp8_hooks
    plugin.register(); plugin.register(); install_fp8_hooks(fp8)  # idempotent
    plugin.check()
    target = "sglang.srt.layers.quantization.fp8.Fp8MoEMethod.create_moe_runner"
    res["hooks_on_create"] = len(HookRegistry._hooks[target])
    res["choice_count"] = MOE_RUNNER_BACKEND_CHOICES.count("phasemoe")
print("RESULT " + json.dumps(res))
"""

WRONG_VERSION = r"""
import json
import moe_backend_integrations.sglang as plugin
plugin.metadata.version = lambda name: "0.5.22"
plugin.register()
from sglang.srt.arg_groups.choices import MOE_RUNNER_BACKEND_CHOICES
try:
    plugin.check()
    error = ""
except RuntimeError as exc:
    error = str(exc)
print("RESULT " + json.dumps({"choice": "phasemoe" in MOE_RUNNER_BACKEND_CHOICES, "error": error}))
"""


def run_probe(script: str, tmp_path, **env_overrides) -> tuple[dict, str]:
    env = {k: v for k, v in os.environ.items() if k != "SGLANG_PLUGINS"}
    env.update(env_overrides)
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"probe failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULT ") :]), proc.stderr


def test_entry_point_declared():
    eps = [ep for ep in metadata.entry_points(group="sglang.srt.plugins") if ep.name == "phasemoe"]
    assert [ep.value for ep in eps] == [ENTRY_POINT]
    from moe_backend_integrations.sglang import register

    # SGLang calls the loaded object with no arguments.
    assert eps[0].load() is register


@pytest.mark.parametrize("sglang_plugins", [None, "phasemoe", "some-other-plugin,phasemoe"])
def test_loaded_by_sglang(tmp_path, sglang_plugins):
    env = {} if sglang_plugins is None else {"SGLANG_PLUGINS": sglang_plugins}
    res, stderr = run_probe(PROBE, tmp_path, **env)
    assert res["plugin_loaded"], stderr[-4000:]
    # Lazy: loading the plugin does not import the FP8 quantization module.
    assert not res["fp8_imported_by_plugin"]
    assert res["parses_phasemoe"] and res["parses_triton"] and not res["parses_phasemo"]
    assert res["resolves"] and res["hooked"]
    assert res["hooks_on_create"] == 1 and res["choice_count"] == 1


def test_filtered_out_by_sglang_plugins(tmp_path):
    res, _ = run_probe(PROBE, tmp_path, SGLANG_PLUGINS="some-other-plugin")
    assert not res["plugin_loaded"]
    assert not res["parses_phasemoe"] and res["parses_triton"]
    assert not res["resolves"] and not res["hooked"]


def test_other_sglang_version_is_refused_loudly(tmp_path):
    res, stderr = run_probe(WRONG_VERSION, tmp_path)
    assert not res["choice"]
    assert "0.5.23" in res["error"] and "0.5.22" in res["error"]
    assert "FAILED" in stderr


def test_any_version_override(tmp_path):
    """`MOE_BACKEND_SGLANG_ANY_VERSION=1` (docs/sglang.md, README): the choice is offered anyway."""
    res, stderr = run_probe(WRONG_VERSION, tmp_path, MOE_BACKEND_SGLANG_ANY_VERSION="1")
    assert res["choice"] and res["error"] == ""
    assert "0.5.22 is not the tested 0.5.23" in stderr


def test_the_docs_check_command(tmp_path):
    """docs/sglang.md's one-line check, run exactly as written there, prints True."""
    from pathlib import Path

    docs = (Path(__file__).resolve().parents[3] / "docs" / "sglang.md").read_text()
    commands = [line for line in docs.splitlines() if line.startswith('python -c "from sglang.srt.plugins')]
    assert len(commands) == 1, "docs/sglang.md should hold the check command on one line"
    env = {k: v for k, v in os.environ.items() if k != "SGLANG_PLUGINS"}
    proc = subprocess.run(
        ["bash", "-c", commands[0].replace("python ", f"{sys.executable} ", 1)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "True"
