"""Writing a file so that a reader never sees half of it, and JSON that strict parsers accept."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

__all__ = ["write_text", "write_json", "json_safe"]


def write_text(path: str | os.PathLike, text: str) -> None:
    """`text` at `path` (parent folders made), written to a temporary file beside it and renamed
    over it: an interrupted write leaves the old file whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, data: dict, *, sort_keys: bool = True) -> None:
    """`data` as indented JSON at `path`, written as `write_text` writes."""
    write_text(path, json.dumps(data, indent=1, sort_keys=sort_keys) + "\n")


def json_safe(value):
    """`value` with every non-finite float spelled as the string "nan", "inf" or "-inf": JSON has
    no such numbers (json.dumps writes NaN / Infinity, which strict parsers such as jq reject), and
    null would lose which of them it was."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
