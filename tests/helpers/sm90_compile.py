"""Compiles a Triton kernel for sm_90a without a GPU (ahead of time, as the GPU would specialize it:
16-byte aligned pointers and strides) and counts its global loads and stores by width, so a CPU
test sees whether a copy or quant kernel moves 16-byte vectors (what the interpreter cannot show)."""

from __future__ import annotations

import re
from collections import Counter


def compile_for_sm90(kernel, signature: dict, constexprs: dict, aligned: list, num_warps: int = 4):
    """`signature`: name -> Triton type of each runtime argument; `aligned`: names known divisible by 16."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    index = {name: i for i, name in enumerate(kernel.arg_names)}
    src = ASTSource(
        fn=kernel,
        signature=signature,
        constexprs={(index[n],): v for n, v in constexprs.items()},
        attrs={(index[n],): [["tt.divisibility", 16]] for n in aligned},
    )
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))


def global_memory_ops(ptx: str) -> tuple[Counter, Counter]:
    """(loads, stores) of global memory in `ptx`, by instruction (e.g. `ld.global.v4.b32`)."""
    loads = Counter(re.findall(r"\bld\.global[\w.:]*", ptx))
    stores = Counter(re.findall(r"\bst\.global[\w.:]*", ptx))
    return loads, stores


def vector_bytes(op: str) -> int:
    """Bytes one thread moves with `op`: `ld.global.v2.b64` -> 16, `st.global.b32` -> 4."""
    width = int(re.search(r"\.b(\d+)$", op).group(1)) // 8
    lanes = re.search(r"\.v(\d)\.", op)
    return width * (int(lanes.group(1)) if lanes else 1)


def assert_waits_first(ptx: str, dependent: bool) -> None:
    """A kernel launched as a dependent (`PDL`) waits for its predecessor before its first global
    load and then lets its own dependents launch; one launched normally has neither instruction."""
    wait, first_load = ptx.find("griddepcontrol.wait"), ptx.find("ld.global")
    if not dependent:
        assert wait < 0 and "griddepcontrol" not in ptx
        return
    assert 0 <= wait and (first_load < 0 or wait < first_load), "a load before the dependency wait"
    assert ptx.find("griddepcontrol.launch_dependents") > wait
