"""nanovl3: InternVL3 in plain PyTorch. See README.md."""

from nanovl3.config import VLConfig, preset
from nanovl3.model import InternVL

__all__ = ["InternVL", "VLConfig", "preset"]
