#!/usr/bin/env bash
# Run on a development machine (with network): download the pure-Python runtime
# dependencies the GPU proof kit needs and the GPU host lacks, as cp312 manylinux
# x86_64 wheels, into the git-ignored .whl/ (kept under 60 MiB, since it travels
# with the working tree: pass carry=[".whl"] to the device tool). torch, triton, cupy,
# numpy and nvidia-ml-py are on the target host (and gpu_check.sh never installs a
# wheel of those); pytest and its dependencies are not promised there, so they travel.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
DEST=.whl
LIMIT_MIB=60
mkdir -p "$DEST"

download() {
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_34_x86_64 --platform any -d "$DEST" "$@"
}

# One version of each; names match pyproject's runtime dependencies.
download pydantic pydantic-core annotated-types typing-inspection pydantic-settings \
  python-dotenv zstandard redis hiredis cryptography cffi pycparser typing-extensions
# The test runner (the kit runs `pytest -m gpu`).
download pytest pluggy iniconfig packaging pygments

# kvikio (GPUDirect Storage) only if it fits in the budget; libkvikio finds librapids_logger
# and the host's libcufile through cuda-pathfinder (without it the import fails).
used=$(du -sm "$DEST" | cut -f1)
if tmp=$(mktemp -d) && download_kvikio() { "$PY" -m pip download -q --no-deps \
      --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi none \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d "$tmp" kvikio-cu13 libkvikio-cu13 rapids-logger cuda-pathfinder; } \
   && download_kvikio; then
  extra=$(du -sm "$tmp" | cut -f1)
  if [ $((used + extra)) -le "$LIMIT_MIB" ]; then
    mv "$tmp"/*.whl "$DEST"/
  else
    echo "[gpu_wheels] kvikio-cu13 (${extra} MiB) does not fit in ${LIMIT_MIB} MiB; left out"
  fi
else
  echo "[gpu_wheels] kvikio-cu13 not found for cp312 manylinux x86_64; left out"
fi
rm -rf "${tmp:-/nonexistent}"
total=$(du -sm "$DEST" | cut -f1)
echo "[gpu_wheels] $(ls "$DEST" | wc -l) wheels, ${total} MiB in $DEST/"
if [ "$total" -gt "$LIMIT_MIB" ]; then
  echo "[gpu_wheels] over ${LIMIT_MIB} MiB: the working tree would not travel" >&2
  exit 1
fi
