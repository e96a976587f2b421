"""Helpers shared by several test folders: the naive model, the tolerance table, layout cases and
checks, quantizer edge inputs, the cache census."""
