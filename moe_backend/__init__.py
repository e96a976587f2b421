"""moe-backend: a phase-aware FP8 Mixture-of-Experts backend for DeepSeek-V3 (engine name `phasemoe`).

Imports stay light (torch only): engines load our plugins in every process.
"""

from moe_backend.config import MoEConfig
from moe_backend.constants import BACKEND_NAME

__version__ = "0.1.0"
ENGINE_NAME = BACKEND_NAME

__all__ = ["MoEConfig", "ENGINE_NAME", "__version__"]
