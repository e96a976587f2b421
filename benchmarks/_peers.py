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

ROOT = Path(__file__).resolve().parents[1]
_JIT_FUNCTIONS = ("write_zeros_to_output", "fused_moe_kernel")


def _vllm_source() -> Path:
    env = os.environ.get("MOE_BACKEND_VLLM_FUSED_MOE")
    if env:
        return Path(env)
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
            parts += lines[start:node.end_lineno] + ["", ""]
    tmp = Path(tempfile.mkdtemp(prefix="peer_vllm_")) / "vllm_fused_moe_peer.py"
    tmp.write_text("\n".join(parts))
    spec = importlib.util.spec_from_file_location("vllm_fused_moe_peer", tmp)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.fused_moe_kernel, str(path)


def vllm_configs(num_experts: int, intermediate: int) -> list[dict]:
    """Every distinct config of vLLM's tuned fp8 block JSON for this E and N (the strongest Triton
    peer is the fastest of them per cell, as in BENCHMARKING.md)."""
    pattern = f"E={num_experts},N={intermediate},device_name=NVIDIA_H*,dtype=fp8_w8a8,block_shape=[[]128,128[]].json"
    files = sorted(glob.glob(str(ROOT / ".peer" / pattern)))
    if not files:
        spec = importlib.util.find_spec("vllm")
        if spec and spec.origin:
            files = sorted(glob.glob(str(Path(spec.origin).parent / "model_executor/layers/fused_moe/configs" / pattern)))
    seen, out = set(), []
    for f in files:
        for key, cfg in json.load(open(f)).items():
            if not isinstance(cfg, dict):
                continue
            tag = json.dumps(cfg, sort_keys=True)
            if tag not in seen:
                seen.add(tag)
                out.append(cfg)
    return out


class VllmMoE:
    """One GEMM of vLLM's fused MoE on a balanced routing: T tokens, top-k, every expert gets
    exactly `rows` (token, slot) pairs. w13: A is `[T, K]` (top_k=k); w2: A is `[T*k, K]` (top_k=1)."""

    def __init__(self, kernel, num_experts: int, rows: int, topk: int, gemm: str):
        self.kernel, self.e, self.rows, self.topk, self.gemm = kernel, num_experts, rows, topk, gemm
        self.tokens = rows * num_experts // topk
        self.slots = self.tokens * topk
        self._align: dict = {}

    def expert_of_slot(self) -> torch.Tensor:
        # Slot s = t*k + j goes to expert s % E: k distinct experts per token, `rows` slots per expert.
        return torch.arange(self.slots, device="cuda") % self.e

    def a_rows(self) -> int:
        return self.tokens if self.gemm == "w13" else self.slots

    def alignment(self, block_m: int):
        if block_m not in self._align:
            per = -(-self.rows // block_m) * block_m
            ids = torch.full((self.e, per), self.slots, dtype=torch.int32, device="cuda")
            ids[:, :self.rows] = (torch.arange(self.e, device="cuda")[:, None]
                                  + self.e * torch.arange(self.rows, device="cuda")[None, :]).int()
            expert_ids = torch.arange(self.e, dtype=torch.int32, device="cuda").repeat_interleave(per // block_m)
            post = torch.tensor([self.e * per], dtype=torch.int32, device="cuda")
            self._align[block_m] = (ids.reshape(-1), expert_ids, post)
        return self._align[block_m]

    def __call__(self, a, a_scale, b, b_scale, c, cfg: dict) -> None:
        import triton
        import triton.language as tl

        bm, bn = cfg["BLOCK_SIZE_M"], cfg["BLOCK_SIZE_N"]
        sorted_ids, expert_ids, post = self.alignment(bm)
        top_k = self.topk if self.gemm == "w13" else 1
        em = sorted_ids.numel()
        if a.shape[0] < bm:
            em = min(em, a.shape[0] * top_k * bm)
        n, k = b.shape[1], b.shape[2]
        grid = (triton.cdiv(em, bm) * triton.cdiv(n, bn),)
        self.kernel[grid](
            a_ptr=a, b_ptr=b, c_ptr=c, b_bias_ptr=None, a_scale_ptr=a_scale, b_scale_ptr=b_scale,
            topk_weights_ptr=None, sorted_token_ids_ptr=sorted_ids, expert_ids_ptr=expert_ids,
            num_tokens_post_padded_ptr=post, N=n, K=k, EM=em, num_valid_tokens=self.slots,
            stride_am=a.stride(0), stride_ak=a.stride(1), stride_be=b.stride(0), stride_bk=b.stride(2),
            stride_bn=b.stride(1), stride_cm=c.stride(0), stride_cn=c.stride(1),
            stride_asm=a_scale.stride(0), stride_ask=a_scale.stride(1), stride_bse=b_scale.stride(0),
            stride_bsk=b_scale.stride(2), stride_bsn=b_scale.stride(1), stride_bbe=0, stride_bbn=0,
            group_n=128, group_k=128, naive_block_assignment=False,
            BLOCK_SIZE_M=bm, BLOCK_SIZE_N=bn, BLOCK_SIZE_K=min(cfg["BLOCK_SIZE_K"], 128),
            GROUP_SIZE_M=cfg["GROUP_SIZE_M"], SPLIT_K=1, MUL_ROUTED_WEIGHT=False, top_k=top_k,
            compute_type=tl.bfloat16, use_fp8_w8a8=True, use_int8_w8a8=False, use_int8_w8a16=False,
            per_channel_quant=False, HAS_BIAS=False,
            SWAP_AB=bool(torch.cuda.get_device_capability() == (9, 0) and bm < 64 and bn >= 64),
            USE_TD=False, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
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
