"""Writing a JSON file so that a reader never sees half of it."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_json(path: str | os.PathLike, data: dict) -> None:
    """`data` as indented, key-sorted JSON at `path` (parent folders made), written to a temporary
    file beside it and renamed over it: an interrupted write leaves the old file whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
