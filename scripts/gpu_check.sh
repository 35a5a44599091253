#!/usr/bin/env bash
# GPU proof kit: symram's transfer path, tiers and kernels on a real GPU, in one
# command, with no vLLM and no network (synthetic caches in vLLM's layouts).
#
#   scripts/gpu_check.sh            on a CUDA host (python3 with torch/triton/cupy)
#   scripts/gpu_check.sh --dry-run  the same steps on CPU (CI runs this)
#
# Before: scripts/gpu_wheels.sh on a machine with network fills .whl/ with the pure-
# Python dependencies the GPU host lacks; carry .whl with the working tree.
# Steps: install the wheels (pip --no-index --no-deps --target, or zipfile without pip;
# never numpy/torch/triton/cupy/nvidia-*, whose host builds must win), `pytest -m gpu`
# (pinned arena, side-stream copies, every block-copy backend and the Triton int8/fp8
# kernels byte-identical to the torch reference, kvikio probe + GDS round trip),
# bench_transfer on the device (codecs none/int8/fp8; headline cases first, results
# rewritten after every case, so a timeout keeps what was measured). Everything lands
# in ${OUT:-gpu-results}/ (at most 8 files): machine.json, kit.log, junit.xml,
# transfer_<device>.json, summary.json. summary.json is written whatever fails, with
# every step's exit status (124: its timeout; pytest, stopped by SIGINT, still writes
# junit.xml with the tests that ran). Budget: the step timeouts add up to 445 s, under the 8 minutes
# an H200 run may take. Override the interpreter with PYTHON=/path/to/python.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
wheels_rc=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
  *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac

OUT="${OUT:-gpu-results}"
mkdir -p "$OUT"
LOG="$OUT/kit.log"
: > "$LOG"
start=$(date +%s)
say() { printf '[gpu_check] %s\n' "$*" | tee -a "$LOG"; }

if [ "$DRY" = 1 ]; then
  PY="${PYTHON:-${SYMRAM_VENV:-.venv}/bin/python}"
  DEVICE=cpu
  # CPU: codec none only (the torch reference quantizer takes minutes per case here;
  # tests/test_gpu.py still moves int8/fp8 jobs through the same path).
  BENCH_ARGS=(--quick --codecs none --jobs 1,32,512 --time-budget 100)
else
  PY="${PYTHON:-python3}"
  DEVICE=cuda
  BENCH_ARGS=(--repeats 5 --time-budget 100)
  if compgen -G ".whl/*.whl" >/dev/null; then
    SITE=/tmp/symram-site
    # Never install a wheel of what the host's CUDA stack is built on: its own copies
    # must win (a numpy or torch wheel here would not match the host's builds).
    mapfile -t WHEELS < <(ls .whl/*.whl | grep -Eiv '/(numpy|torch|triton|cupy[^/]*|nvidia_[^/]*)-')
    say "installing ${#WHEELS[@]} wheels from .whl/ into $SITE"
    timeout -k 5 30 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target "$SITE" "${WHEELS[@]}" >>"$LOG" 2>&1
    wheels_rc=$?
    if [ "$wheels_rc" != 0 ]; then
      # No pip on the host: a wheel is a zip laid out for site-packages.
      say "pip install failed (rc=$wheels_rc); unpacking the wheels with zipfile instead"
      timeout -k 5 30 "$PY" -c 'import sys, zipfile
for w in sys.argv[2:]: zipfile.ZipFile(w).extractall(sys.argv[1])' "$SITE" "${WHEELS[@]}" \
        >>"$LOG" 2>&1
      wheels_rc=$?
    fi
    # First on the path: symram needs these versions (pydantic 2 over a host's 1.x).
    # Only pure-Python or self-contained wheels are here, and typing_extensions only
    # ever adds names, so the host's torch is unaffected by a newer copy.
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  else
    say "no .whl/: assuming symram's dependencies are installed (scripts/gpu_wheels.sh)"
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

say "machine"
{ command -v nvidia-smi >/dev/null && timeout -k 5 15 nvidia-smi; } >>"$LOG" 2>&1
timeout -k 5 30 "$PY" - >"$OUT/machine.json" 2>>"$LOG" <<'EOF'
import json
from loadtest.machine import describe_machine
from symram_vllm import capability
from symram_vllm.kernels import triton_capability
import torch
info = describe_machine()
info.update(capability.describe())
info["triton"] = triton_capability().reason
if torch.cuda.is_available():
    info["gpu_name"] = torch.cuda.get_device_name(0)
print(json.dumps(info, indent=2, default=str))
EOF
machine_rc=$?
cat "$OUT/machine.json" >>"$LOG"

if [ "$DEVICE" = cpu ]; then
  KERNEL_TESTS=(tests/test_gpu.py tests/test_block_copy.py)
else
  # On CUDA test_kernels compares the compiled Triton int8/fp8 kernels with the torch
  # reference byte for byte, and times them with triton.testing.do_bench.
  KERNEL_TESTS=(tests/test_gpu.py tests/test_block_copy.py tests/test_kernels.py)
fi
say "pytest -m gpu on $DEVICE: ${KERNEL_TESTS[*]}"
# SIGINT, not SIGTERM: pytest then stops cleanly and still writes junit.xml.
timeout -s INT -k 10 210 "$PY" -m pytest -q -rsx -p no:cacheprovider -o addopts="" \
  -o junit_logging=system-out -m gpu \
  --junitxml="$OUT/junit.xml" "${KERNEL_TESTS[@]}" 2>&1 | tee -a "$LOG"
tests_rc=${PIPESTATUS[0]}

say "bench_transfer --device $DEVICE ${BENCH_ARGS[*]}"
timeout -k 10 130 "$PY" -m loadtest.bench_transfer --device "$DEVICE" "${BENCH_ARGS[@]}" \
  --out "$OUT/transfer_$DEVICE.json" 2>&1 | tee -a "$LOG"
bench_rc=${PIPESTATUS[0]}

elapsed=$(( $(date +%s) - start ))
"$PY" - "$OUT" "$DEVICE" "$wheels_rc" "$machine_rc" "$tests_rc" "$bench_rc" "$elapsed" \
  >"$OUT/summary.json" <<'EOF'
import json, sys
from pathlib import Path
out, device, wheels_rc, machine_rc, tests_rc, bench_rc, elapsed = sys.argv[1:]
summary = {"device": device, "wheels_rc": int(wheels_rc), "machine_rc": int(machine_rc),
           "tests_rc": int(tests_rc), "bench_rc": int(bench_rc), "elapsed_s": int(elapsed)}
for name in ("machine.json", f"transfer_{device}.json"):
    try:
        data = json.loads((Path(out) / name).read_text())
    except (OSError, ValueError) as exc:
        summary[f"{name}_error"] = str(exc)[:200]
        continue
    if name == "machine.json":
        summary.update({k: data.get(k) for k in ("gpu_name", "triton", "kvikio")})
    else:
        summary.update({k: v for k, v in data.items()
                        if k.endswith(("_512", "_geometry", "_layout", "_backend"))})
        summary["bench_cases"] = len(data.get("cases", []))
print(json.dumps(summary, indent=2))
EOF
cat "$OUT/summary.json" | tee -a "$LOG"
say "done in ${elapsed}s: tests rc=$tests_rc, bench rc=$bench_rc; results in $OUT/"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
