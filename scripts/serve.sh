#!/usr/bin/env bash
# The main job: set up, prepare the base model, make sure Redis answers, register the demo
# skills, and run the server (Ctrl-C stops it). HOST/PORT override 127.0.0.1:8000.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh cpu  # the engine and the server only: the test, bench and Ray extras are the tests' (scripts/test.sh)
bash scripts/ensure-redis.sh
.venv/bin/mosaic base prepare
for dir in bench/skills/*/; do
  .venv/bin/mosaic skills add "$dir" --name "$(basename "$dir")" --if-changed
done
HOST="${HOST:-127.0.0.1}"; PORT="${PORT:-8000}"
cat <<MSG

==> Mosaic is starting on http://$HOST:$PORT (the engine needs about a minute; GET /health says when).
    The console (library, playground, compose, upload, ops): http://$HOST:$PORT/ui
    Try it from another terminal, with the stock openai client:

    .venv/bin/python - <<'PY'
from openai import OpenAI
client = OpenAI(base_url="http://$HOST:$PORT/v1", api_key="none")
ask = lambda **kw: client.chat.completions.create(temperature=0, max_tokens=60, **kw).choices[0].message.content
print(ask(model="json_extract", messages=[{"role": "user", "content": "Extract the person as JSON: Ada is 36 years old and lives in London."}]))
print(ask(model="sentiment", messages=[{"role": "user", "content": "Is this review positive or negative? The soup was cold and bland."}]))
print(ask(model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Reverse the list: red, green, blue"}],
          extra_body={"composition": {"skills": ["reverse_list", "sentiment"], "weights": [1.0, 0.5]}}))
PY

    or: curl http://$HOST:$PORT/v1/chat/completions -H 'content-type: application/json' \\
          -d '{"model": "reverse_list", "messages": [{"role": "user", "content": "Reverse the list: one, two, three"}], "temperature": 0}'

MSG
exec .venv/bin/mosaic serve --host "$HOST" --port "$PORT"
