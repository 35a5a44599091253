"""symram: a tiered, content-addressed KV cache for vLLM (a KV-connector plugin).

Importing the package imports neither torch nor vLLM.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("symram-vllm")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
