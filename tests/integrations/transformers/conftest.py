"""These tests need transformers' DeepSeek-V3 modeling and safetensors (the [test] extra); without
them the folder is not collected."""

import importlib.util

_NEEDED = ("transformers", "safetensors")
collect_ignore_glob = [] if all(importlib.util.find_spec(m) for m in _NEEDED) else ["test_*.py"]
