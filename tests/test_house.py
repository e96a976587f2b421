"""The house's layering rules, read from the source (AST), not from conventions:

- no production module imports the oracle (`moe_backend.reference`), except the one named door
  the ops' CPU path goes through, and that one only inside its functions;
- the oracle itself builds only on the package's base (constants, checks, the FP8 format, the
  layouts' data format);
- the shared numbers live in `moe_backend.constants` alone (the engine name, the FP8 max).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "moe_backend"
INTEGRATIONS = ROOT / "integrations"  # installed as moe_backend_integrations
ORACLE = "moe_backend.reference"

# Modules under moe_backend/ that may import the oracle, and why. Everything else is production.
ORACLE_USERS = {
    # The one door: ops runs the reference GEMMs for CPU tensors and impl="reference" through it.
    "moe_backend/providers/torch_reference.py": "the ops' CPU / impl='reference' provider",
    # Tools that check our output against the oracle; nothing serving a model imports them.
    "moe_backend/demo.py": "`python -m moe_backend demo` reports the layer's error vs the oracle",
    "integrations/transformers/swap.py": "use_reference_experts: transformers with the oracle's experts, the "
    "independent reference the end-to-end tests compare engines against",
    "moe_backend/ab/sweep.py": "the A/B harness (`compare`) measures each backend's divergence from the oracle",
    # Test support, once it exists (random weights, input builders for tests and benchmarks).
    "moe_backend/testing.py": "helpers for tests and benchmarks",
}
LAZY_ONLY = {"moe_backend/providers/torch_reference.py"}
# What the oracle may build on: the package's base, never a module that executes a layer. The
# layouts' data format is base: the twins return the same dataclasses the kernels do.
ORACLE_BASE = {"moe_backend._checks", "moe_backend.constants", "moe_backend.quant", "moe_backend.dispatch.layouts"}


def _modules(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "integrations":
        parts[0] = "moe_backend_integrations"
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(absolute module name, at module level?) for every import in `path`, with each
    `from pkg import name` also counted as importing `pkg.name` (it may be a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, (ast.If, ast.Try)) and id(node) in top_level:
            top_level |= {id(child) for child in ast.walk(node)}  # guarded module-level imports
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.append((base, id(node) in top_level))
            found += [(f"{base}.{alias.name}", id(node) in top_level) for alias in node.names]
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and getattr(node.func, "attr", getattr(node.func, "id", "")) in ("import_module", "__import__")
        ):
            found.append((node.args[0].value, False))
    return found


def _is_oracle(name: str) -> bool:
    return name == ORACLE or name.startswith(ORACLE + ".")


def _production_modules() -> list[Path]:
    oracle_dir = PACKAGE / "reference"
    return [
        p
        for p in _modules(PACKAGE) + _modules(INTEGRATIONS)
        if oracle_dir not in p.parents and str(p.relative_to(ROOT)) not in ORACLE_USERS
    ]


def test_the_rule_sees_every_import_form(tmp_path, monkeypatch):
    """The checker itself: each way of spelling the import is caught (else the rule could not fail)."""
    spellings = [
        "import moe_backend.reference",
        "from moe_backend import reference",
        "from moe_backend.reference.gemm import expert_gemm",
        "from . import reference",
        "from .reference import routed_experts",
        "import importlib\nimportlib.import_module('moe_backend.reference')",
        "def f():\n    from moe_backend import reference",
    ]
    fake_root = tmp_path
    (fake_root / "moe_backend").mkdir()
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake_root)
    for code in spellings:
        module = fake_root / "moe_backend" / "__init__.py"
        module.write_text(code + "\n")
        assert any(_is_oracle(name) for name, _ in _imports(module)), code
    module.write_text("from moe_backend import ops\nfrom moe_backend.quant import FP8_DTYPE\n")
    assert not any(_is_oracle(name) for name, _ in _imports(module))


def test_production_never_imports_the_oracle():
    offenders = [
        f"{p.relative_to(ROOT)}: {name}" for p in _production_modules() for name, _ in _imports(p) if _is_oracle(name)
    ]
    assert not offenders, "production modules importing moe_backend.reference:\n" + "\n".join(offenders)


def test_the_door_opens_only_when_called():
    for rel in LAZY_ONLY:
        eager = [name for name, top in _imports(ROOT / rel) if _is_oracle(name) and top]
        assert not eager, f"{rel} imports the oracle at module level: {eager}"


def test_the_door_forwards_to_the_oracle(monkeypatch):
    """Each door function has the reference's parameters (names, kinds, defaults) and looks its
    function up on the reference package at call time, so a wrapper installed there sees the call."""
    import inspect

    from moe_backend import reference
    from moe_backend.providers import torch_reference

    for name in torch_reference.__all__:
        want = inspect.signature(getattr(reference, name)).parameters
        for param in inspect.signature(getattr(torch_reference, name)).parameters.values():
            if param.kind is param.VAR_KEYWORD:
                continue  # options passed on as given (silu_mul_quant's row validity)
            assert param.name in want and want[param.name].kind == param.kind, (name, param.name)
            if param.default is not param.empty:
                assert param.default == want[param.name].default, (name, param.name)
        seen = []
        monkeypatch.setattr(reference, name, lambda *args, _name=name, **kwargs: seen.append(_name) or _name)
        args = [None] * sum(
            p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD
            for p in inspect.signature(getattr(torch_reference, name)).parameters.values()
        )
        assert getattr(torch_reference, name)(*args) == name and seen == [name]


def test_allowed_oracle_users_exist():
    """The allow-list names real files (a stale entry would hide nothing, but would mislead)."""
    missing = [rel for rel in ORACLE_USERS if not (ROOT / rel).exists() and rel != "moe_backend/testing.py"]
    assert not missing


def test_serving_imports_leave_the_oracle_unloaded():
    code = (
        "import sys\n"
        "import moe_backend.ops, moe_backend.experts, moe_backend.layers, moe_backend.dispatch.plan\n"
        "import moe_backend.providers.deepgemm, moe_backend.providers.torch_reference\n"
        "print(sorted(m for m in sys.modules if m.startswith('moe_backend.reference')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_oracle_builds_only_on_the_base():
    oracle_dir = PACKAGE / "reference"
    bad = [
        f"{p.relative_to(ROOT)}: {name}"
        for p in _modules(oracle_dir)
        for name, _ in _imports(p)
        if name.startswith("moe_backend")
        and not _is_oracle(name)
        and not any(name == b or name.startswith(b + ".") for b in ORACLE_BASE)
        and name != "moe_backend"
    ]
    assert not bad, "the oracle imports beyond constants/_checks/quant/dispatch.layouts:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "name",
    [
        "grouped_gemm_contiguous",
        "grouped_gemm_masked",
        "silu_mul_quant",
        "routed_experts",
        "expert_gemm",
        "_expert_gemm",
        "build_contiguous_layout",
        "build_masked_layout",
        "permute",
        "permute_quant",
        "unpermute_combine",
        "combine",
    ],
)
def test_reference_names_importable(name):
    from moe_backend import reference

    assert callable(getattr(reference, name))


def _string_constants(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    docstrings = {
        id(n.body[0].value)
        for n in ast.walk(tree)
        if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
        and n.body
        and isinstance(n.body[0], ast.Expr)
        and isinstance(n.body[0].value, ast.Constant)
    }
    return [
        (n.lineno, n.value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings
    ]


def test_backend_name_defined_once():
    from moe_backend import constants

    spelled = [
        f"{p.relative_to(ROOT)}:{line}"
        for p in _modules(PACKAGE) + _modules(INTEGRATIONS)
        if p != PACKAGE / "constants.py"
        for line, value in _string_constants(p)
        if value == constants.BACKEND_NAME
    ]
    assert not spelled, "write moe_backend.constants.BACKEND_NAME instead of the literal:\n" + "\n".join(spelled)


def _module_level_numbers(path: Path) -> list[tuple[str, object]]:
    tree = ast.parse(path.read_text())
    out = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            out += [(t.id, node.value.value) for t in node.targets if isinstance(t, ast.Name)]
    return out


# moe_backend/cuda/ is being rebuilt separately; it joins this rule once it imports the constants.
_NOT_YET = ()


def test_quant_numbers_defined_once():
    """The FP8 max and the 128 quantization block are named once (moe_backend.constants); other
    modules import them rather than write their own `GROUP = 128` or `FP8_MAX = 448.0`."""
    own = []
    for p in _modules(PACKAGE) + _modules(INTEGRATIONS):
        if p == PACKAGE / "constants.py" or any(d in p.parents for d in _NOT_YET):
            continue
        for name, value in _module_level_numbers(p):
            if value in (448, 448.0) or (value == 128 and any(w in name for w in ("GROUP", "QUANT", "SCALE"))):
                own.append(f"{p.relative_to(ROOT)}: {name} = {value}")
    assert not own, "\n".join(own)


def test_constants_match_torch():
    import torch

    from moe_backend import constants

    assert constants.FP8_DTYPE is torch.float8_e4m3fn
    assert constants.FP8_MAX == float(torch.finfo(constants.FP8_DTYPE).max)
    assert constants.SCALE_CEIL * constants.FP8_MAX < torch.finfo(torch.float32).max
    assert [tuple(s) for s in constants.DEEPSEEK_V3_GEMM_SHAPES] == [
        ("ep8", "w13", 32, 4096, 7168),
        ("ep8", "w2", 32, 7168, 2048),
        ("tp8", "w13", 256, 512, 7168),
        ("tp8", "w2", 256, 7168, 256),
    ]
    assert [s.intermediate for s in constants.DEEPSEEK_V3_GEMM_SHAPES] == [2048, 2048, 256, 256]
    with pytest.raises(AttributeError, match="no attribute 'NOPE'"):
        constants.NOPE  # noqa: B018


def test_constants_import_no_torch():
    code = "import sys, moe_backend.constants; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_unpermute_combine_has_one_name():
    """The op is `unpermute_combine` in every layer (kernel, ops, torch twin); the reference's
    `combine` is the one other name: the same over a layout rather than its `row_of_slot`."""
    defined = {
        node.name
        for p in _modules(PACKAGE)
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, ast.FunctionDef) and "combine" in node.name
    }
    assert defined == {"unpermute_combine", "combine", "_combine_kernel"}
    from moe_backend import ops, reference
    from moe_backend.providers import torch_reference

    assert (PACKAGE / "kernels" / "unpermute_combine.py").is_file()  # the kernel's file carries the name
    names = {
        fn.__name__ for fn in (ops.unpermute_combine, torch_reference.unpermute_combine, reference.unpermute_combine)
    }
    assert names == {"unpermute_combine"}


def test_every_package_is_in_the_wheel():
    """pyproject.toml lists the packages explicitly (two roots, one renamed): a package folder it
    misses installs from a checkout but not from the wheel."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = set()
    for name, folder in config["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((name, *rel)))
    assert found == listed, f"missing from pyproject: {sorted(found - listed)}; stale: {sorted(listed - found)}"


def test_install_hints_name_real_extras():
    """Every "not installed" hint is built by extra_install_command; each extra it names must be one
    of pyproject.toml's optional-dependency groups, or the hint tells the user to install nothing."""
    import tomllib

    from moe_backend._install import extra_install_command

    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    named = {}
    for root in (PACKAGE, INTEGRATIONS):
        for path in root.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if (
                    isinstance(node, ast.Call)
                    and getattr(node.func, "id", None) == "extra_install_command"
                    and node.args
                    and isinstance(node.args[0], ast.Constant)
                ):
                    named.setdefault(node.args[0].value, []).append(str(path.relative_to(ROOT)))
    assert {"ab", "bench", "cuda", "deepgemm"} <= set(named), f"the hints' call sites moved: {sorted(named)}"
    unknown = {extra: files for extra, files in named.items() if extra not in extras}
    assert not unknown, f"hints name extras pyproject.toml does not define: {unknown}"
    assert extra_install_command("bench") == "pip install -e '<moe-backend clone>[bench]'"
