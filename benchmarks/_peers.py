"""The peers, loaded at run time and never committed: vLLM's Triton `fused_moe_kernel` (from a
vLLM source file: .peer/fused_moe.py, $MOE_BACKEND_VLLM_FUSED_MOE, or an installed vllm) and
DeepGEMM (`sgl-deep-gemm==0.1.5`, import name `deep_gemm`). Only the peer's `@triton.jit`
functions are compiled; this file is the launcher (vLLM's token alignment, rebuilt in torch)."""

from __future__ import annotations

import ast
import glob
import importlib.util
import json
import os
import tempfile
from pathlib import Path

import torch

from moe_backend.env import ENV

ROOT = Path(__file__).resolve().parents[1]
_JIT_FUNCTIONS = ("write_zeros_to_output", "fused_moe_kernel")


def _vllm_source() -> Path:
    if ENV.vllm_fused_moe is not None:
        return ENV.vllm_fused_moe
    local = ROOT / ".peer" / "fused_moe.py"
    if local.exists():
        return local
    spec = importlib.util.find_spec("vllm")
    if spec and spec.origin:
        return Path(spec.origin).parent / "model_executor/layers/fused_moe/fused_moe.py"
    raise FileNotFoundError("vLLM's fused_moe.py: put it in .peer/ or set MOE_BACKEND_VLLM_FUSED_MOE")


def load_vllm_kernel():
    """Compiles only the peer's Triton functions: their source goes into a temp module (Triton
    reads kernel source through `inspect`, so it must live in a file)."""
    path = _vllm_source()
    src = path.read_text()
    lines = src.splitlines()
    parts = ["import triton", "import triton.language as tl", ""]
    for node in ast.parse(src).body:
        if isinstance(node, ast.FunctionDef) and node.name in _JIT_FUNCTIONS:
            start = min([d.lineno for d in node.decorator_list] + [node.lineno]) - 1
            parts += lines[start : node.end_lineno] + ["", ""]
    tmp = Path(tempfile.mkdtemp(prefix="peer_vllm_")) / "vllm_fused_moe_peer.py"
    tmp.write_text("\n".join(parts))
    spec = importlib.util.spec_from_file_location("vllm_fused_moe_peer", tmp)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.fused_moe_kernel, str(path)


def vllm_configs(
    num_experts: int, intermediate: int, near_m: int | None = None, limit: int | None = None
) -> list[dict]:
    """Every distinct config of vLLM's tuned fp8 block JSON for this E and N (the strongest Triton
    peer is the fastest of them per cell, as in BENCHMARKING.md). With `near_m` (tokens of the
    batch): ordered by how close their batch-size key lies to it (log scale), so `limit` keeps
    the configs vLLM itself would pick for this batch and its neighbours (short runs)."""
    import math

    pattern = f"E={num_experts},N={intermediate},device_name=NVIDIA_H*,dtype=fp8_w8a8,block_shape=[[]128,128[]].json"
    files = sorted(glob.glob(str(ROOT / ".peer" / pattern)))
    if not files:
        spec = importlib.util.find_spec("vllm")
        if spec and spec.origin:
            files = sorted(
                glob.glob(str(Path(spec.origin).parent / "model_executor/layers/fused_moe/configs" / pattern))
            )
    distance: dict = {}
    configs: dict = {}
    for f in files:
        for key, cfg in json.load(open(f)).items():
            if not isinstance(cfg, dict):
                continue
            tag = json.dumps(cfg, sort_keys=True)
            d = abs(math.log(max(int(key), 1) / max(near_m, 1))) if near_m and key.isdigit() else 0.0
            if tag not in configs or d < distance[tag]:
                configs[tag], distance[tag] = cfg, d
    order = sorted(configs, key=lambda tag: distance[tag]) if near_m else list(configs)
    return [configs[tag] for tag in order[:limit]]


class VllmMoE:
    """One GEMM of vLLM's fused MoE on a routing given as rows (token, slot pairs) per expert:
    `counts[e]` slots go to expert e, drawn from the T * k slots by a seeded permutation (sorted
    within an expert, as vLLM's token alignment leaves them). w13: A is `[T, K]` (top_k = k, slot
    s reads token s // k); w2: A is `[T * k, K]` (top_k = 1). As in vLLM, the id arrays and the
    grid are sized for the worst case, total + E * (BLOCK_M - 1) rows, and blocks past the padded
    row count (on the device) exit at once."""

    def __init__(self, kernel, counts, topk: int, gemm: str, seed: int = 0, device="cuda"):
        self.kernel, self.topk, self.gemm, self.device = kernel, topk, gemm, device
        self.counts = [int(c) for c in counts]
        self.e = len(self.counts)
        self.slots = sum(self.counts)
        if self.slots % topk:
            raise ValueError(f"counts: {self.slots} slots in all, not a multiple of top-k ({topk})")
        self.tokens = self.slots // topk
        perm = torch.randperm(self.slots, generator=torch.Generator().manual_seed(seed))
        self._slots_of, start = [], 0
        for c in self.counts:
            self._slots_of.append(perm[start : start + c].sort().values.to(device))
            start += c
        self._align: dict = {}

    def slots_of(self, expert: int) -> torch.Tensor:
        """int64 `[counts[expert]]`: the rows of C (slots) expert `expert` writes."""
        return self._slots_of[expert]

    def a_rows(self) -> int:
        return self.tokens if self.gemm == "w13" else self.slots

    def a_row_of_slot(self, slots: torch.Tensor) -> torch.Tensor:
        return slots // self.topk if self.gemm == "w13" else slots

    def alignment(self, block_m: int):
        if block_m not in self._align:
            bound = self.slots + self.e * (block_m - 1)
            ids = torch.full((bound,), self.slots, dtype=torch.int32, device=self.device)
            expert_ids = torch.full((-(-bound // block_m),), -1, dtype=torch.int32, device=self.device)
            row = 0
            for e, slots in enumerate(self._slots_of):
                padded = -(-slots.numel() // block_m) * block_m
                ids[row : row + slots.numel()] = slots.int()
                expert_ids[row // block_m : (row + padded) // block_m] = e
                row += padded
            post = torch.tensor([row], dtype=torch.int32, device=self.device)
            self._align[block_m] = (ids, expert_ids, post)
        return self._align[block_m]

    def __call__(self, a, a_scale, b, b_scale, c, cfg: dict) -> None:
        import triton
        import triton.language as tl

        bm, bn = cfg["BLOCK_SIZE_M"], cfg["BLOCK_SIZE_N"]
        sorted_ids, expert_ids, post = self.alignment(bm)
        top_k = self.topk if self.gemm == "w13" else 1
        em = sorted_ids.numel()
        if a.shape[0] < bm:  # vLLM's small-batch cap on the grid
            em = min(em, a.shape[0] * top_k * bm)
        n, k = b.shape[1], b.shape[2]
        grid = (triton.cdiv(em, bm) * triton.cdiv(n, bn),)
        self.kernel[grid](
            a_ptr=a,
            b_ptr=b,
            c_ptr=c,
            b_bias_ptr=None,
            a_scale_ptr=a_scale,
            b_scale_ptr=b_scale,
            topk_weights_ptr=None,
            sorted_token_ids_ptr=sorted_ids,
            expert_ids_ptr=expert_ids,
            num_tokens_post_padded_ptr=post,
            N=n,
            K=k,
            EM=em,
            num_valid_tokens=self.slots,
            stride_am=a.stride(0),
            stride_ak=a.stride(1),
            stride_be=b.stride(0),
            stride_bk=b.stride(2),
            stride_bn=b.stride(1),
            stride_cm=c.stride(0),
            stride_cn=c.stride(1),
            stride_asm=a_scale.stride(0),
            stride_ask=a_scale.stride(1),
            stride_bse=b_scale.stride(0),
            stride_bsk=b_scale.stride(2),
            stride_bsn=b_scale.stride(1),
            stride_bbe=0,
            stride_bbn=0,
            group_n=128,
            group_k=128,
            naive_block_assignment=False,
            BLOCK_SIZE_M=bm,
            BLOCK_SIZE_N=bn,
            BLOCK_SIZE_K=min(cfg["BLOCK_SIZE_K"], 128),
            GROUP_SIZE_M=cfg["GROUP_SIZE_M"],
            SPLIT_K=1,
            MUL_ROUTED_WEIGHT=False,
            top_k=top_k,
            compute_type=tl.bfloat16,
            use_fp8_w8a8=True,
            use_int8_w8a8=False,
            use_int8_w8a16=False,
            per_channel_quant=False,
            HAS_BIAS=False,
            SWAP_AB=bool(torch.cuda.get_device_capability() == (9, 0) and bm < 64 and bn >= 64),
            USE_TD=False,
            num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
        )


def load_deep_gemm():
    import deep_gemm

    return deep_gemm


def deep_gemm_version() -> str:
    try:
        from importlib.metadata import version

        return version("sgl-deep-gemm")
    except Exception:  # metadata is optional; the version is only printed
        return "?"


def load_peers(log) -> tuple[dict, dict]:
    """({"dg": deep_gemm, "vllm": fused_moe_kernel} for the peers that load, {"deep_gemm": version,
    "vllm_source": path} for the run's environment line); why a peer did not load goes to `log`."""
    import traceback

    env = dict(deep_gemm="not loaded", vllm_source="not loaded")
    peers: dict = {}
    try:
        peers["dg"] = load_deep_gemm()
        env["deep_gemm"] = deep_gemm_version()
    except Exception:
        print("deep_gemm unavailable:\n" + traceback.format_exc(limit=3), file=log, flush=True)
    try:
        peers["vllm"], src = load_vllm_kernel()
        env["vllm_source"] = os.path.relpath(src, ROOT)
    except Exception:
        print("vLLM kernel unavailable:\n" + traceback.format_exc(limit=3), file=log, flush=True)
    return peers, env
