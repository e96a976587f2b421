"""Proves a refactor of the CUDA kernel changed no shipped binary: every config the two heuristics
can produce for the DeepSeek-V3 shapes (EP8 I=2048 and TP8 I=256, hidden 7168; contiguous
prefill and masked decode) is rendered by the package's own JIT (`kernel_spec`) and compiled to
PTX with `nvcc -ptx` for sm_90a (no GPU needed). The normalized PTX (comments, line and file
directives dropped, the kernel's own name replaced, parameters the body never reads dropped and
the others numbered in order) is hashed per config.

    python lab/check_ptx.py --save lab/ptx_manifest.json [--keep DIR]   # record
    python lab/check_ptx.py --check lab/ptx_manifest.json [--keep DIR]  # compare, exit 1 on a change

A config is keyed by what distinguishes the shipped variants (N, K, masked max_m, N tile,
stages, group_m, cluster, shared operand), so kernel names may change and the key still finds
its recorded PTX. The manifest records nvcc's version: compare with the same compiler.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from moe_backend.cuda import jit
from moe_backend.cuda.grouped_gemm_contiguous import kernel_spec, select_config
from moe_backend.cuda.grouped_gemm_masked import select_masked_config

# (N, K) of w13 and w2 for EP8 (I = 2048) and TP8 (I = 256) at hidden 7168.
SHAPES = ((4096, 7168), (7168, 2048), (512, 7168), (7168, 256))
# H100 SXM / H200, H100 PCIe, H20: the SM counts the contiguous formula may see.
SM_COUNTS = (132, 114, 78)
MAX_M_TILES = 8192  # contiguous row counts up to 1M rows (every wave count the formula can see)
MASKED_MAX_M = (128, 256, 512, 1024)
# the GPU names that pick configs of their own (None: every other GPU's)
HEURISTIC_GPUS = (None, "NVIDIA H100 80GB HBM3")
KEY_FIELDS = ("N", "K", "MASKED_MAX_M", "BLOCK_N", "STAGES", "GROUP_M", "CLUSTER", "MCAST_A")


def shipped_specs() -> dict[str, jit.KernelSpec]:
    """key -> spec of every kernel the heuristics pick for SHAPES."""
    specs = {}
    for n, k in SHAPES:
        for sms in SM_COUNTS:
            for tiles in range(1, MAX_M_TILES + 1):
                for gpu in HEURISTIC_GPUS:
                    _add(specs, kernel_spec(n, k, select_config(tiles * 128, n, sms, k=k, device_name=gpu)))
        for max_m in MASKED_MAX_M:
            for gpu in HEURISTIC_GPUS:
                _add(specs, kernel_spec(n, k, select_masked_config(n, k, gpu), masked_max_m=max_m))
    return dict(sorted(specs.items()))


def _add(specs: dict[str, jit.KernelSpec], spec: jit.KernelSpec) -> None:
    seen = specs.setdefault(_key(spec), spec)
    if seen.source != spec.source:  # the key must tell every shipped variant apart
        raise RuntimeError(f"{seen.kernel_name} and {spec.kernel_name} share the key {_key(spec)}")


def _key(spec: jit.KernelSpec) -> str:
    return ",".join(f"{f}={spec.constants[f]}" for f in KEY_FIELDS)


def normalized_ptx(spec: jit.KernelSpec, keep: Path | None) -> str:
    """PTX of one spec, without comments, .loc/.file lines and the kernel's own name."""
    with tempfile.TemporaryDirectory() as tmp:
        src, ptx = Path(tmp) / "kernel.cu", Path(tmp) / "kernel.ptx"
        src.write_text(spec.source)
        flags = [f for f in spec.nvcc_flags() if not f.startswith(("-gencode", "-Xptxas"))]
        cmd = [jit.find_nvcc(), *flags, f"-arch={spec.arch}", "-ptx", "-o", str(ptx), str(src)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode:
            raise RuntimeError(f"nvcc -ptx failed for {spec.kernel_name}:\n{proc.stderr}")
        text = ptx.read_text()
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        (keep / f"{spec.kernel_name}.ptx").write_text(text)
    lines = [
        line for line in text.splitlines() if line.strip() and not line.lstrip().startswith(("//", ".loc", ".file"))
    ]
    return _rename_params(re.sub(re.escape(spec.kernel_name), "KERNEL", "\n".join(lines)) + "\n")


def _rename_params(ptx: str) -> str:
    """Drops the declarations of parameters the body never reads and numbers the others in
    declaration order: a kernel that lost unused parameters normalizes like the one before."""
    declared = re.findall(r"^\s*\.param .*?(KERNEL_param_\d+)\b", ptx, flags=re.M)
    used = [p for p in declared if len(re.findall(rf"\b{p}\b", ptx)) > 1]
    kept = [
        line.rstrip(",")
        for line in ptx.splitlines()
        if not any(re.search(rf"\b{p}\b", line) for p in set(declared) - set(used)) or ".param" not in line
    ]
    out = "\n".join(kept) + "\n"
    for i, p in enumerate(used):
        out = re.sub(rf"\b{p}\b", f"P{i}", out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--save", type=Path, help="write the manifest of PTX hashes here")
    mode.add_argument("--check", type=Path, help="compare against this manifest")
    parser.add_argument("--keep", type=Path, help="also keep the raw PTX files in this directory")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)

    specs = shipped_specs()
    with ThreadPoolExecutor(args.jobs) as pool:
        ptx = dict(zip(specs, pool.map(lambda s: normalized_ptx(s, args.keep), specs.values())))
    hashes = {
        key: {"sha256": hashlib.sha256(text.encode()).hexdigest(), "kernel_name": specs[key].kernel_name}
        for key, text in ptx.items()
    }
    compiler = jit.nvcc_version(jit.find_nvcc()).splitlines()[-1]
    if args.save:
        args.save.write_text(json.dumps({"nvcc": compiler, "configs": hashes}, indent=1) + "\n")
        print(f"{len(hashes)} configs recorded in {args.save}")
        return 0
    recorded = json.loads(args.check.read_text())
    if recorded["nvcc"] != compiler:
        print(f"warning: recorded with {recorded['nvcc']!r}, comparing with {compiler!r}", file=sys.stderr)
    old, new = recorded["configs"], hashes
    missing, added = sorted(set(old) - set(new)), sorted(set(new) - set(old))
    changed = sorted(k for k in set(old) & set(new) if old[k]["sha256"] != new[k]["sha256"])
    for what, keys in (("no longer produced", missing), ("newly produced", added), ("PTX changed", changed)):
        for key in keys:
            print(f"{what}: {key}")
    same = len(set(old) & set(new)) - len(changed)
    print(
        f"{same} of {len(old)} recorded configs compiled to identical PTX"
        f" ({len(changed)} changed, {len(missing)} missing, {len(added)} new)"
    )
    return 0 if not (missing or added or changed) else 1


if __name__ == "__main__":
    raise SystemExit(main())
