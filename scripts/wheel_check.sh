#!/usr/bin/env bash
# Build the wheel and install it, with the gateway extra, into a fresh venv from the
# wheelhouse scripts/setup.sh filled (no index, no network), then run what a
# gateway-only user runs. Proves: the wheel builds, its declared dependencies suffice,
# and the CLI and the gateway run without torch or vLLM. About 20 s.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SYMRAM_VENV:-.venv}"
HOUSE="$VENV/wheelhouse"
if [ ! -d "$HOUSE" ]; then
  echo "wheel check: $HOUSE is missing; run scripts/setup.sh" >&2
  exit 1
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1  # no index, no find-links
step() { printf '\033[1m[wheel check]\033[0m %s\n' "$*"; }

step "building the wheel"
# From a copy of the checkout's files: an in-tree build/ could carry stale modules into
# the wheel, and the checkout stays as it was.
mkdir "$work/src"
git ls-files -z --cached --others --exclude-standard \
  | tar --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -xf - -C "$work/src"
"$VENV/bin/python" -m pip wheel -q --no-deps --no-build-isolation -w "$work/dist" "$work/src" \
  >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
wheel="$(ls "$work"/dist/symram_vllm-*.whl)"
for member in symram_vllm/py.typed symram_vllm/serving/gateway/static/dashboard.html; do
  "$VENV/bin/python" -c "import sys, zipfile; sys.exit('$member' not in zipfile.ZipFile('$wheel').namelist())" \
    || { echo "wheel check: $member is not in $wheel" >&2; exit 1; }
done
"$VENV/bin/python" -c "import sys, zipfile; n = zipfile.ZipFile('$wheel').namelist(); sys.exit(not any(p.endswith('/LICENSE') for p in n))" \
  || { echo "wheel check: no LICENSE in $wheel" >&2; exit 1; }

step "installing $(basename "$wheel")[gateway] into a fresh venv (no index)"
"$VENV/bin/python" -m venv --without-pip "$work/venv"  # the outer pip installs into it
"$VENV/bin/python" -m pip --python "$work/venv/bin/python" install -q --no-index \
  --find-links "$HOUSE" "$wheel[gateway]"
# The install must not bring torch or vLLM.
if "$work/venv/bin/python" -c "import torch" 2>/dev/null || \
   "$work/venv/bin/python" -c "import vllm" 2>/dev/null; then
  echo "wheel check: the gateway install pulled in torch or vLLM" >&2; exit 1
fi
cd "$work"  # not the checkout: the installed package, not the source tree, is tested
env -u SYMRAM_CONFIG "$work/venv/bin/symram" --version
"$work/venv/bin/symram" --help >/dev/null
"$work/venv/bin/symram" doctor >/dev/null
"$work/venv/bin/symram" gateway --help >/dev/null
"$work/venv/bin/symram" gateway --backend http://127.0.0.1:1 --check >/dev/null
"$work/venv/bin/python" -c "
import sys
from symram_vllm.serving.gateway.app import create_app
from symram_vllm.serving.gateway.config import GatewayConfig
create_app(GatewayConfig())
bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'vllm')]
assert not bad, bad
"
step "ok: symram --version/--help/doctor/gateway from the wheel, without torch or vLLM"
