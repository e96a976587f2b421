"""Programmatic dependent launch is only safe if every kernel launched as a dependent waits for its
predecessor before it reads anything (`moe_backend/kernels/_dependent_launch`): checked here on
the source of every launch site, CPU only. The GPU side (same bits, graphs replayed with new
routing) is in test_kernels_gpu.py."""

from __future__ import annotations

import ast
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[2] / "moe_backend" / "kernels"


def _jit_functions() -> dict:
    out = {}
    for path in KERNELS.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list):
                out[node.name] = (path.name, node)
    return out


def _dependent_launch_sites() -> list:
    """(file, kernel name) of every `kernel[grid](..., **launch_options())` and of every kernel whose
    meta dict holds `**launch_options()` (launched as `kernel[grid](*args, **meta)`)."""
    sites = []
    for path in KERNELS.glob("*.py"):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef):
                continue
            has_meta_options = any(
                isinstance(n, ast.Call)
                and ast.unparse(n.func) == "dict"
                and any(k.arg is None and "launch_options" in ast.unparse(k.value) for k in n.keywords)
                for n in ast.walk(fn)
            )
            for call in ast.walk(fn):
                if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Subscript)):
                    continue
                spread = [ast.unparse(k.value) for k in call.keywords if k.arg is None]
                if any("launch_options" in s for s in spread) or (has_meta_options and "meta" in spread):
                    sites.append((path.name, ast.unparse(call.func.value)))
    return sites


def test_every_dependent_launch_waits_first() -> None:
    jit = _jit_functions()
    sites = _dependent_launch_sites()
    names = {name for _, name in sites}
    # The decode pipeline: layout, token quant (or quant+permute, or the row copy), both GEMMs,
    # SiLU*up quant and the combine.
    assert names >= {
        "_layout_one_launch_kernel",
        "_group_quant_kernel",
        "_permute_quant_kernel",
        "_permute_rows_kernel",
        "_fp8_grouped_gemm_kernel",
        "_combine_kernel",
    }, sites
    for file, name in sites:
        _, fn = jit[name]
        assert "PDL" in [a.arg for a in fn.args.args], f"{file}: {name} has no PDL constexpr"
        body = [s for s in fn.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
        assert ast.unparse(body[0]) == "wait_for_producer(PDL)", f"{file}: {name} does something before its wait"


def test_the_wait_is_the_kernels_first_step_and_lets_the_next_launch() -> None:
    fn = _jit_functions()["wait_for_producer"][1]
    src = ast.unparse(fn)
    assert src.index("gdc_wait()") < src.index("gdc_launch_dependents()")
