"""From `compare` rows to decisions: the winner of each cell, and a policy for `MOE_BACKEND_POLICY`.

A backend wins a cell only if it ran and stayed within the tolerance of the reference: a fast
wrong kernel never wins. The emitted policy is written per GPU name (under "devices") so one file
can carry calibrations of several GPUs; its decode kernel is the one winning most decode-sized
cells, and `decode_max_tokens` the largest swept batch up to which that kernel stays within
`DECODE_SLACK` of the best kernel (every plan is shape-static, so either can be graph-captured).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict

from moe_backend._json_file import write_json
from moe_backend.ab.divergence import cell_tolerance
from moe_backend.dispatch.policy import KERNELS, Policy

__all__ = ["cell_winners", "policy_section", "write_policy", "existing_policy", "DECODE_SLACK"]

# Switching kernels at a batch size costs a second plan and graph set; a few percent is not worth it.
DECODE_SLACK = 1.05


def _valid(row: dict) -> bool:
    # A cell with no routed pair on the slice's experts times launch overhead, not a kernel: no
    # winner there, and no evidence for the policy.
    return "time_us" in row and not row.get("diverges", True) and row.get("pairs", 1) > 0


def cell_winners(rows: list[dict]) -> dict[tuple[str, int], dict]:
    """{(slice, tokens): the fastest valid row}; cells where nothing was valid (or no pair was
    routed to the slice) are absent."""
    best: dict[tuple[str, int], dict] = {}
    for row in rows:
        key = (row["slice"], row["tokens"])
        if _valid(row) and (key not in best or row["time_us"] < best[key]["time_us"]):
            best[key] = row
    return best


def _pick(wins: dict[str, int], total_us: dict[str, float]) -> str | None:
    # Most cells won; ties go to the smaller summed time over those cells.
    if not wins:
        return None
    return min(wins, key=lambda k: (-wins[k], total_us[k]))


def policy_section(rows: list[dict], tolerance: float | None = None) -> dict | None:
    """{"prefill_kernel", "decode_kernel", "decode_max_tokens"} from the rows' policy kernels
    (rows of registered backends carry no policy kernel and cannot be emitted). Keys with no
    valid evidence keep the defaults; None when no row is valid evidence at all (nothing to
    calibrate from, so nothing may overwrite a calibration)."""
    if tolerance is not None:
        rows = [
            dict(r, diverges=not r.get("rel_err", float("inf")) <= cell_tolerance(tolerance, r.get("pairs", 1 << 20)))
            for r in rows
        ]
    candidates = [r for r in rows if _valid(r) and r.get("kernel") in KERNELS]
    if not candidates:
        return None
    by_cell: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in candidates:
        by_cell[(r["slice"], r["tokens"])].append(r)
    default = Policy()

    def tally(cells) -> str | None:
        wins: dict[str, int] = defaultdict(int)
        total: dict[str, float] = defaultdict(float)
        for cell in cells:
            win = min(cell, key=lambda r: r["time_us"])
            wins[win["kernel"]] += 1
            total[win["kernel"]] += win["time_us"]
        return _pick(wins, total)

    # The decode kernel also serves every CUDA-graph-captured batch (engines mark those decode
    # whatever their size), so it is chosen over the default decode range.
    decode_kernel = tally([c for (_, t), c in by_cell.items() if t <= default.decode_max_tokens])
    decode_kernel = decode_kernel or default.decode_kernel
    # It keeps the batches up to the largest swept size where it stays within DECODE_SLACK of the
    # best kernel in every cell of that size and below.
    boundary = 0
    for tokens in sorted({t for (_, t) in by_cell}):
        cells = [c for (_, t), c in by_cell.items() if t == tokens]
        if not all(
            any(r["kernel"] == decode_kernel and r["time_us"] <= DECODE_SLACK * min(x["time_us"] for x in c) for r in c)
            for c in cells
        ):
            break
        boundary = tokens
    prefill_kernel = tally([c for (_, t), c in by_cell.items() if t > boundary])
    return {
        "prefill_kernel": prefill_kernel or default.prefill_kernel,
        "decode_kernel": decode_kernel,
        "decode_max_tokens": boundary,
    }


def existing_policy(path: str) -> dict:
    """The policy file at `path` to update ({} when there is none); ValueError when it is
    something else, which `write_policy` will not overwrite."""
    if os.path.isdir(path):
        raise ValueError(f"emit-policy: {path!r} is a folder, expected a policy JSON file")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"emit-policy: {path!r} exists and is not JSON ({exc}); not overwriting") from None
    Policy.from_dict(data)  # an existing file must already be a policy
    return data


def write_policy(path: str, device_name: str, section: dict) -> dict:
    """Writes (or updates) a policy file with `section` under devices[device_name]; validates the
    result with `Policy.from_dict` before writing, so the file is accepted as is."""
    data = existing_policy(path)
    data.setdefault("devices", {})[device_name] = dict(section)
    Policy.from_dict(data, device_name)
    write_json(path, data)
    return data
