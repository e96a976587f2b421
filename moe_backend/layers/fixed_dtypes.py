"""`FixedDtypes`: a module whose tensors keep their dtypes when the module is moved or cast.

The FP8 weights, their fp32 block scales and the fp32 router are data formats, not a compute
precision: `model.to(torch.bfloat16)`, `.half()` or `.float()` on a model that holds such a module
(a common idiom, even on a model already in bf16) would otherwise cast them, and the next forward
would fail far from the cause, or route in bf16. Device moves apply as usual."""

from __future__ import annotations

from torch import nn

__all__ = ["FixedDtypes"]


class FixedDtypes(nn.Module):
    def _apply(self, fn, recurse=True):
        def keep_dtype(t):
            # What fn does, asked of an empty tensor of the same kind: a cast of the real one would
            # allocate a full-size copy only to throw it away.
            probe = fn(t.new_empty(0))
            return fn(t) if probe.dtype == t.dtype else t.to(probe.device)

        return super()._apply(keep_dtype, recurse)
