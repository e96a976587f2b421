"""The test suite's own rules: a package (every folder holds an `__init__.py`, so helpers import as
`tests.helpers.<name>` and same-named files in two folders never collide), no `sys.path` edits in
tests or benchmarks, and GPU tests chosen by the `gpu` marker, never by their folder."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
# Spelled in pieces so this file does not match itself.
SYS_PATH_EDIT = re.compile(r"sys\.path\s*(\.\s*(insert|append|extend)\b|\[|\+=|=)")
IMPORT_ORDER_WAIVER = re.compile("noqa:[^\n]*" + "E4" + "02")
GPU_MARK = re.compile(r"pytest\.mark\.gpu\b")


def _python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py") if "__pycache__" not in p.parts)


def test_every_test_folder_is_a_package():
    folders = {p.parent for p in _python_files("tests")}
    missing = sorted(str(f.relative_to(REPO)) for f in folders if not (f / "__init__.py").exists())
    assert not missing, f"add an __init__.py to {missing} (tests import each other as the tests package)"


@pytest.mark.parametrize("folder", ["tests", "benchmarks"])
def test_no_sys_path_edits(folder):
    offenders = [
        f"{p.relative_to(REPO)}:{n}"
        for p in _python_files(folder)
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if SYS_PATH_EDIT.search(line)
    ]
    assert not offenders, f"import through the package instead (tests.*, benchmarks.*): {offenders}"


def test_no_import_order_waivers():
    offenders = [
        f"{p.relative_to(REPO)}:{n}"
        for p in _python_files("moe_backend", "integrations", "tests", "benchmarks", "examples")
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if IMPORT_ORDER_WAIVER.search(line)
    ]
    assert not offenders, offenders


def test_gpu_tests_carry_the_marker():
    """A module named *_gpu.py runs on the GPU: its tests must be selected by `-m gpu` and skip on CPU."""
    unmarked = [
        str(p.relative_to(REPO))
        for p in _python_files("tests")
        if p.name.endswith("_gpu.py") and not GPU_MARK.search(p.read_text())
    ]
    assert not unmarked, unmarked


def test_the_rules_catch_what_they_are_for():
    assert SYS_PATH_EDIT.search("sys.path" + ".insert(0, 'x')") and SYS_PATH_EDIT.search("sys.path" + "[:0] = ['x']")
    assert not SYS_PATH_EDIT.search("print(sys.path)")
    assert IMPORT_ORDER_WAIVER.search("import x  # noqa: " + "E4" + "02")
    assert IMPORT_ORDER_WAIVER.search("import x  # noqa: F401," + "E4" + "02")
    assert GPU_MARK.search("pytestmark = pytest.mark.gpu") and not GPU_MARK.search("pytest.mark.gpux")
