"""Block directories: which chain keys are held, and in which tier."""

from symram_vllm.directory.base import Directory
from symram_vllm.directory.embedded import EmbeddedDirectory

__all__ = ["Directory", "EmbeddedDirectory"]
