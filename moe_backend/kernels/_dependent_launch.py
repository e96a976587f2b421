"""Programmatic dependent launch (Hopper and later) between the kernels of one plan.

A kernel launched as a dependent may start while the kernel before it on the stream still runs;
its programs then wait (`griddepcontrol.wait`) until that kernel has completed and its writes are
visible, and only then read anything. What it saves is the gap between two dependent kernels:
launch, block scheduling and prologue overlap the predecessor's tail, which at decode is a
large share of a microsecond-scale pipeline. Inside a CUDA graph the launches become
programmatic edges.

Why waiting first is enough: every kernel launched so waits at its very first instruction, before
any load, so a kernel passing its wait knows its predecessor completed, and that one completed only
after its own wait: the whole chain before it is done. A kernel launched normally after the chain
waits for full completion as ever; one launched as a dependent after a normal kernel waits for that
kernel's exit.

The plan decides (`Plan.dependent_launch`); `plan_execution` opens `dependent_launches(True)`
around the plan's launches and each launcher adds `launch_options()` to its kernel's meta.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import triton
import triton.language as tl

__all__ = ["dependent_launches", "launch_options", "wait_for_producer"]

_state = threading.local()


@contextlib.contextmanager
def dependent_launches(enabled: bool) -> Iterator[None]:
    """Kernels launched in this block (this thread) by a launcher that supports it are launched as
    dependents of the kernel before them."""
    before = getattr(_state, "enabled", False)
    _state.enabled = enabled
    try:
        yield
    finally:
        _state.enabled = before


def launch_options() -> dict:
    """Meta for a kernel launch: the kernel's `PDL` constexpr and, when on, Triton's launch flag."""
    if getattr(_state, "enabled", False):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}


@triton.jit
def wait_for_producer(PDL: tl.constexpr):
    """A dependent kernel's first step: wait for the kernel before it, then let the next one launch
    (its programs take free SM slots and wait in turn)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
