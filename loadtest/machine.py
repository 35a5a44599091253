"""Describe the machine a benchmark ran on, for the results files."""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone


def describe_machine() -> dict[str, object]:
    import torch

    cpu_model = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next((ln.split(":", 1)[1].strip() for ln in f if "model name" in ln), "")
    except OSError:
        pass
    mem_gib = 0.0
    try:
        with open("/proc/meminfo") as f:
            mem_kib = int(next(ln for ln in f if ln.startswith("MemTotal")).split()[1])
            mem_gib = round(mem_kib / 1024**2, 1)
    except (OSError, StopIteration):
        pass
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "memory_gib": mem_gib,
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
