#!/usr/bin/env bash
# Set up and run the whole test suite (real Redis, the real base model, the real vLLM engine).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"` for the fast tests only.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
MOSAIC_REDIS_URL="${MOSAIC_TEST_REDIS_URL:-redis://127.0.0.1:6379/3}" bash scripts/ensure-redis.sh
bash scripts/ensure-chromium.sh || true  # without it only the console's browser test fails, and says why
.venv/bin/mosaic base prepare >/dev/null
exec .venv/bin/python -m pytest "$@"
