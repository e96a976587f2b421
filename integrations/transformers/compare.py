"""Teacher-forced comparison of two runs of one model, with per-phase timings.

Exact token equality between two numerically different runs is not robust (router near-ties,
logit ties), so the candidate is fed the reference's sequence and the log-probs are compared at
every position: prefill positions from one forward over the prompt, decode positions from one
KV-cached step per token, as generation runs them.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import asdict, dataclass

import torch

__all__ = ["Run", "Agreement", "greedy", "teacher_forced", "agreement"]


@dataclass
class Run:
    tokens: torch.Tensor  # [B, P + N] the prompt and the N tokens that followed it
    logits: torch.Tensor  # fp32 [B, P + N - 1, V]: position t predicts token t + 1
    prompt_len: int  # P: positions < P - 1 and P - 1 itself come from the prefill
    prefill_s: float  # the prefill forward, wall time
    decode_s: float  # all N - 1 decode steps, wall time

    @property
    def decode_steps(self) -> int:
        return self.tokens.shape[1] - self.prompt_len - 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _run(model, prompt: torch.Tensor, new_tokens: int, forced: torch.Tensor | None) -> Run:
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt: expected token ids [B, P] with P >= 1, got shape {list(prompt.shape)}")
    if new_tokens < 1:
        raise ValueError(f"new_tokens: expected >= 1, got {new_tokens}")
    device = prompt.device
    # transformers 5.x renamed past_key_values to cache; older releases know only the first.
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    _sync(device)
    start = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True)
    logits = [out.logits.float()]
    _sync(device)
    prefill_s = time.perf_counter() - start
    tokens = [prompt]
    start = time.perf_counter()
    for step in range(new_tokens):
        nxt = forced[:, step : step + 1] if forced is not None else logits[-1][:, -1:].argmax(-1)
        tokens.append(nxt)
        if step == new_tokens - 1:
            break
        out = model(input_ids=nxt, use_cache=True, **{cache_arg: _cache_of(out)})
        logits.append(out.logits.float())
    _sync(device)
    decode_s = time.perf_counter() - start
    return Run(torch.cat(tokens, 1), torch.cat(logits, 1), prompt.shape[1], prefill_s, decode_s)


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def greedy(model, prompt: torch.Tensor, new_tokens: int) -> Run:
    """Greedy generation of `new_tokens` after `prompt` [B, P]: one prefill, then KV-cached steps."""
    return _run(model, prompt, new_tokens, None)


def teacher_forced(model, reference: Run) -> Run:
    """The model fed the reference's tokens the way generation feeds them (the prompt as one
    prefill, every later token as a KV-cached decode step)."""
    prompt = reference.tokens[:, : reference.prompt_len]
    return _run(
        model, prompt, reference.tokens.shape[1] - reference.prompt_len, reference.tokens[:, reference.prompt_len :]
    )


@dataclass
class Agreement:
    positions: int  # compared positions (B x (P + N - 1))
    decode_positions: int  # of which came from decode steps
    max_abs_dlogprob: float  # max over positions of |Δ log p(forced next token)|
    top1_agreement: float  # fraction of positions with the same argmax
    confident_positions: int  # positions where the reference's top-1 leads its top-2 by >= margin
    confident_top1_mismatches: int  # of those, positions whose argmax differs
    mean_kl: float  # mean over positions of KL(reference || candidate), nats

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"{self.positions} positions ({self.decode_positions} decode): top-1 agreement "
            f"{self.top1_agreement:.2%}, max |Δ logprob| {self.max_abs_dlogprob:.3g}, mean KL "
            f"{self.mean_kl:.3g}, top-1 mismatches where the reference is confident: "
            f"{self.confident_top1_mismatches} of {self.confident_positions}"
        )


def agreement(reference: Run, candidate: Run, margin: float = 0.5) -> Agreement:
    """Compares the candidate's log-probs (teacher-forced on the reference's tokens) with the
    reference's. margin: the reference's top-1 minus top-2 log-prob at which a top-1 change counts
    as a mismatch (below it, a near-tie)."""
    if not torch.equal(reference.tokens, candidate.tokens):
        raise ValueError("candidate: was not fed the reference's tokens (use teacher_forced)")
    ref = reference.logits.log_softmax(-1)
    got = candidate.logits.to(ref.device).log_softmax(-1)
    target = reference.tokens[:, 1:].to(ref.device).unsqueeze(-1)
    dlogprob = (got.gather(-1, target) - ref.gather(-1, target)).abs()
    top2 = ref.topk(2, dim=-1).values
    confident = (top2[..., 0] - top2[..., 1]) >= margin
    same = ref.argmax(-1) == got.argmax(-1)
    kl = (ref.exp() * (ref - got)).sum(-1)
    return Agreement(
        positions=same.numel(),
        decode_positions=reference.decode_steps * same.shape[0],
        max_abs_dlogprob=float(dlogprob.max()),
        top1_agreement=float(same.float().mean()),
        confident_positions=int(confident.sum()),
        confident_top1_mismatches=int((confident & ~same).sum()),
        mean_kl=float(kl.mean()),
    )
