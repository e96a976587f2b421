# TEMPORARY probe (deleted after use): PhaseMoeRunnerCore on CUDA with stubbed sglang modules,
# eager and inside a CUDA graph, vs moe_backend.reference.
import sys, types, dataclasses, typing
from collections import namedtuple
import torch

def mod(name, **attrs):
    m = types.ModuleType(name); m.__dict__.update(attrs); sys.modules[name] = m
    parent, _, leaf = name.rpartition(".")
    if parent: setattr(sys.modules[parent], leaf, m)
    return m
for n in ["sglang", "sglang.srt", "sglang.srt.layers", "sglang.srt.layers.moe", "sglang.srt.layers.moe.moe_runner",
          "sglang.srt.layers.moe.token_dispatcher"]:
    mod(n)
class DispatchMoeRunnerCore:
    def __init__(self, config): self.config = config
@dataclasses.dataclass
class MoeQuantInfo: pass
@dataclasses.dataclass
class MoeRunnerConfig:
    routed_scaling_factor: typing.Optional[float] = None
    no_combine: bool = False
    apply_router_weight_on_input: bool = False
mod("sglang.srt.layers.moe.moe_runner.base", DispatchMoeRunnerCore=DispatchMoeRunnerCore, MoeQuantInfo=MoeQuantInfo, MoeRunnerConfig=MoeRunnerConfig)
mod("sglang.srt.layers.moe.token_dispatcher.deepep", DeepEPLLCombineInput=namedtuple("LL", "hidden_states topk_ids topk_weights"),
    DeepEPNormalCombineInput=namedtuple("N", "hidden_states topk_ids topk_weights"))
mod("sglang.srt.layers.moe.token_dispatcher.standard", StandardCombineInput=namedtuple("S", "hidden_states"))
class TopKOutputChecker:
    @staticmethod
    def format_is_standard(t): return True
mod("sglang.srt.layers.moe.topk", TopKOutputChecker=TopKOutputChecker)
mod("sglang.srt.layers.moe.utils", resolve_moe_runner_backend=lambda n: n)
FWD = types.SimpleNamespace(is_extend_in_batch=False)
mod("sglang.srt.runtime_context", get_forward=lambda: FWD)
class Fmt:
    def __init__(self, v): self.value = v
    def is_standard(self): return self.value == "standard"
    def is_deepep_normal(self): return self.value == "deepep_normal"
    def is_deepep_ll(self): return self.value == "deepep_ll"

sys.path.insert(0, ".")
import importlib.util, pathlib
# moe_backend_integrations -> integrations/
spec = importlib.util.spec_from_file_location("moe_backend_integrations", "integrations/__init__.py",
                                              submodule_search_locations=["integrations"])
pkg = importlib.util.module_from_spec(spec); sys.modules["moe_backend_integrations"] = pkg; spec.loader.exec_module(pkg)
from moe_backend_integrations.sglang.core import PhaseMoeRunnerCore, PhaseMoeQuantInfo
from moe_backend import reference
from moe_backend.quant import quantize_fp8_blockwise, quantize_fp8_per_token_group

dev = "cuda"; torch.manual_seed(0)
E, H, I, K, M = 8, 7168 // 4, 512, 2, 64
w13 = torch.randn(E, 2 * I, H, device=dev) / H ** 0.5; w2 = torch.randn(E, H, I, device=dev) / I ** 0.5
W = (*quantize_fp8_blockwise(w13), *quantize_fp8_blockwise(w2))
q = PhaseMoeQuantInfo(*W)
core = PhaseMoeRunnerCore(MoeRunnerConfig(routed_scaling_factor=2.5))
def rel(a, b): return float((a.float() - b.float()).norm() / b.float().norm())

# --- LL: masked [E, M, H], column-major scales, masked_m on device, expert 1 empty
T = 40
ids = torch.stack([torch.randperm(E - 1, device=dev)[:K] for _ in range(T)]); ids[ids >= 1] += 1
x = torch.randn(T, H, device=dev).bfloat16(); x_fp8, x_s = quantize_fp8_per_token_group(x)
a = torch.zeros(E, M, H, device=dev, dtype=torch.float8_e4m3fn); s = torch.ones(E, M, H // 128, device=dev)
mm = torch.zeros(E, dtype=torch.int32, device=dev)
for e in range(E):
    tok = (ids == e).any(1).nonzero().squeeze(1); mm[e] = len(tok); a[e, :len(tok)] = x_fp8[tok]; s[e, :len(tok)] = x_s[tok]
s_cm = torch.empty(E, H // 128, M, device=dev).transpose(1, 2); s_cm.copy_(s)
w = torch.rand(T, K, device=dev)
LL = types.SimpleNamespace(format=Fmt("deepep_ll"), hidden_states=a, hidden_states_scale=s_cm, topk_ids=ids, topk_weights=w, masked_m=mm, expected_m=8)
def check_ll(out):
    errs = []
    for e in range(E):
        m = int(mm[e])
        if m:
            ref = reference.routed_experts(a[e, :m], *W, torch.ones(m, 1, device=dev), torch.full((m, 1), e, device=dev), x_scale=s[e, :m])
            errs.append(rel(out[e, :m], ref))
    return max(errs)
out = core.run_from_dispatch(LL, q, core.config).hidden_states
print("LL eager max rel err", check_ll(out))
g = torch.cuda.CUDAGraph(); torch.cuda.synchronize()
st = torch.cuda.Stream(); st.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(st):
    core.run_from_dispatch(LL, q, core.config)
torch.cuda.current_stream().wait_stream(st)
with torch.cuda.graph(g):
    gout = core.run_from_dispatch(LL, q, core.config).hidden_states
g.replay(); torch.cuda.synchronize()
print("LL graph max rel err", check_ll(gout))

# --- standard TP, decode (graph) and prefill
for T, phase in [(16, False), (300, True)]:
    FWD.is_extend_in_batch = phase
    ids = torch.stack([torch.randperm(E, device=dev)[:K] for _ in range(T)]).int(); ids[0, 0] = -1
    w = torch.rand(T, K, device=dev); x = torch.randn(T, H, device=dev).bfloat16()
    topk = types.SimpleNamespace(topk_weights=w, topk_ids=ids)
    D = types.SimpleNamespace(format=Fmt("standard"), hidden_states=x, hidden_states_scale=None, topk_output=topk)
    ref = reference.routed_experts(x, *W, w, ids).float() * 2.5
    out = core.run_from_dispatch(D, q, core.config).hidden_states
    print("standard", "prefill" if phase else "decode", "T", T, "rel err", rel(out, ref))
    if not phase:
        g = torch.cuda.CUDAGraph(); st = torch.cuda.Stream(); st.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(st): core.run_from_dispatch(D, q, core.config)
        torch.cuda.current_stream().wait_stream(st)
        with torch.cuda.graph(g): gout = core.run_from_dispatch(D, q, core.config).hidden_states
        g.replay(); torch.cuda.synchronize(); print("standard decode graph rel err", rel(gout, ref))

# --- DeepEP normal
N = 200; ids = torch.stack([torch.randperm(E, device=dev)[:K] for _ in range(N)]).long(); ids[:5, 1] = -1
x = torch.randn(N, H, device=dev).bfloat16(); xf, xs = quantize_fp8_per_token_group(x); w = torch.rand(N, K, device=dev)
D = types.SimpleNamespace(format=Fmt("deepep_normal"), hidden_states=xf, hidden_states_scale=xs, topk_ids=ids, topk_weights=w, num_recv_tokens_per_expert=[0] * E)
out = core.run_from_dispatch(D, q, core.config).hidden_states
print("deepep normal rel err", rel(out, reference.routed_experts(xf, *W, w, ids, x_scale=xs)))
