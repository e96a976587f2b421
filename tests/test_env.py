"""`moe_backend.env`: README's table equals its list (names and defaults, in order), every
`MOE_BACKEND_*` name the repository mentions is on that list, the library reads them only there,
and every switch follows the one truthiness rule."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from moe_backend import env
from moe_backend.env import ENV, VARIABLES

ROOT = Path(__file__).resolve().parents[1]
NAME = re.compile(r"\bMOE_BACKEND_[A-Z0-9_]*[A-Z0-9]\b")
# moe_backend/cuda/ is being rebuilt separately; it moves to ENV (cache_dir, jit_verbose,
# jit_debug, print_config) with that rewrite.
_NOT_YET = ()


def _readme_table() -> list[tuple[str, str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Configuration (`MOE_BACKEND_*`)", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `MOE_BACKEND_")]
    table = []
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        table.append((cells[0].strip("`"), cells[1].strip("`")))
    return table


def test_readme_table_equals_env_list():
    assert _readme_table() == [(v.name, v.default) for v in VARIABLES]


def _repository_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "dev", ROOT / "pyproject.toml"]
    for folder, patterns in (
        ("moe_backend", ("*.py",)),
        ("integrations", ("*.py", "*.md")),
        ("benchmarks", ("*.py", "*.sh")),
        ("tests", ("*.py",)),
        (".ci", ("*",)),
        ("docs", ("*.md",)),
        ("examples", ("*",)),
    ):
        for pattern in patterns:
            files += [p for p in (ROOT / folder).rglob(pattern) if p.is_file() and "__pycache__" not in p.parts]
    return [p for p in files if p.exists()]


def test_every_mentioned_variable_is_listed():
    listed = {v.name for v in VARIABLES}
    unlisted = {}
    for path in _repository_files():
        if path == Path(__file__):
            continue
        for name in NAME.findall(path.read_text(errors="replace")):
            if name not in listed:
                unlisted.setdefault(name, str(path.relative_to(ROOT)))
    assert not unlisted, f"MOE_BACKEND_* variables missing from moe_backend.env.VARIABLES: {unlisted}"


def _environ_reads(path: Path) -> list[str]:
    """MOE_BACKEND_* names read through os.environ / os.getenv in `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        key = None
        if isinstance(node, ast.Call) and node.args:
            func = ast.unparse(node.func)
            if func in ("os.environ.get", "os.getenv", "environ.get", "getenv", "os.environ.setdefault"):
                key = node.args[0]
        elif isinstance(node, ast.Subscript) and ast.unparse(node.value) in ("os.environ", "environ"):
            key = node.slice
        if isinstance(key, ast.Constant) and isinstance(key.value, str) and key.value.startswith("MOE_BACKEND_"):
            found.append(key.value)
    return found


def test_library_reads_variables_only_in_env_py():
    env_py = ROOT / "moe_backend" / "env.py"
    readers = {}
    for folder in ("moe_backend", "integrations", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            if path == env_py or any(d in path.parents for d in _NOT_YET):
                continue
            names = _environ_reads(path)
            if names:
                readers[str(path.relative_to(ROOT))] = names
    assert not readers, f"read these through moe_backend.env.ENV instead: {readers}"


def test_the_reader_check_can_fail(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import os\nos.environ.get('MOE_BACKEND_X', '0')\nos.environ['MOE_BACKEND_Y']\n")
    assert _environ_reads(probe) == ["MOE_BACKEND_X", "MOE_BACKEND_Y"]


SWITCHES = [v.name for v in VARIABLES if v.default == "0" and v.name != "MOE_BACKEND_SHADOW_SEED"]


@pytest.mark.parametrize(
    "value, on",
    [
        ("1", True),
        ("true", True),
        ("ON", True),
        (" yes ", True),
        ("on", True),
        ("0", False),
        ("", False),
        ("no", False),
        ("false", False),
        ("off", False),
        ("2", False),
    ],
)
@pytest.mark.parametrize("name", SWITCHES)
def test_every_switch_has_one_truthiness_rule(name, value, on, monkeypatch):
    monkeypatch.setenv(name, value)
    assert env.flag(name) is on
    attribute = name.removeprefix("MOE_BACKEND_").lower()
    assert getattr(ENV, attribute) is on


def test_switches_cover_the_library_flags():
    flags = {
        name
        for name, value in vars(env.Env).items()
        if isinstance(value, property) and value.fget.__annotations__.get("return") == "bool"
    }
    assert {f"MOE_BACKEND_{f.upper()}" for f in flags} == set(SWITCHES)


def test_unset_means_the_default(monkeypatch):
    for v in VARIABLES:
        monkeypatch.delenv(v.name, raising=False)
    assert ENV.policy == "" and ENV.shadow == "" and ENV.shadow_log is None and ENV.shadow_seed == 0
    assert not any(getattr(ENV, n.removeprefix("MOE_BACKEND_").lower()) for n in SWITCHES)
    assert ENV.cache_dir == Path.home() / ".cache" / "moe_backend" / "jit"
    assert ENV.vllm_fused_moe is None
    assert set(ENV.as_dict()) >= {"policy", "check_finite", "cache_dir"}


def test_typed_values(monkeypatch, tmp_path):
    monkeypatch.setenv("MOE_BACKEND_SHADOW_SEED", " 7 ")
    assert ENV.shadow_seed == 7
    monkeypatch.setenv("MOE_BACKEND_SHADOW_SEED", "seven")
    with pytest.raises(ValueError, match="MOE_BACKEND_SHADOW_SEED: expected an int"):
        ENV.shadow_seed  # noqa: B018
    monkeypatch.setenv("MOE_BACKEND_CACHE_DIR", str(tmp_path))
    assert ENV.cache_dir == tmp_path
    monkeypatch.setenv("MOE_BACKEND_SHADOW_LOG", str(tmp_path / "log.jsonl"))
    assert ENV.shadow_log == str(tmp_path / "log.jsonl")


def test_unknown_name_refused():
    with pytest.raises(KeyError, match="MOE_BACKEND_NOPE"):
        env.flag("MOE_BACKEND_NOPE")


def test_check_finite_follows_the_rule(monkeypatch):
    """The switch that used to count any non-empty, non-'0' value as on ('false' included)."""
    import torch

    from moe_backend._checks import finite_checks_enabled

    meta = torch.empty(1, device="meta")  # not CPU: the variable decides
    monkeypatch.setenv("MOE_BACKEND_CHECK_FINITE", "false")
    assert not finite_checks_enabled(meta)
    monkeypatch.setenv("MOE_BACKEND_CHECK_FINITE", "1")
    assert finite_checks_enabled(meta)
    assert finite_checks_enabled(torch.empty(1))  # CPU: always checked


def test_env_imports_nothing_heavy():
    import subprocess
    import sys

    code = "import sys, moe_backend.env; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_info_lists_the_variables_set(monkeypatch):
    import subprocess
    import sys

    monkeypatch.setenv("MOE_BACKEND_PRINT_CONFIG", "on")
    monkeypatch.delenv("MOE_BACKEND_POLICY", raising=False)
    out = subprocess.run(
        [sys.executable, "-m", "moe_backend", "info"], capture_output=True, text=True, check=True
    ).stdout
    line = next(x for x in out.splitlines() if x.startswith("environment"))
    assert "MOE_BACKEND_PRINT_CONFIG='on'" in line and "MOE_BACKEND_POLICY" not in line


def test_an_unwritable_plan_log_is_a_warning_not_a_failed_forward(tmp_path):
    """MOE_BACKEND_PLAN_LOG in a folder that does not exist: one warning at import and no log, where
    each executed plan's append would raise inside the forward."""
    code = "from moe_backend import plan_execution\nassert plan_execution._PLAN_LOG is None\n"
    env = dict(os.environ, MOE_BACKEND_PLAN_LOG=str(tmp_path / "no" / "such" / "plan.log"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "MOE_BACKEND_PLAN_LOG: cannot append to" in proc.stderr and "no plan log is written" in proc.stderr
