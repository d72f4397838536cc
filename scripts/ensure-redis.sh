#!/usr/bin/env bash
# Make sure a Redis answers at MOSAIC_REDIS_URL's host:port (default 127.0.0.1:6379); start one if not.
set -euo pipefail
cd "$(dirname "$0")/.."
url="${MOSAIC_REDIS_URL:-redis://127.0.0.1:6379/0}"
hostport="${url#redis://}"; hostport="${hostport%%/*}"; hostport="${hostport##*@}"
host="${hostport%%:*}"; port="${hostport##*:}"; [ "$port" = "$hostport" ] && port=6379
if .venv/bin/python -c "import redis,sys; redis.Redis(host='$host', port=$port, socket_connect_timeout=1).ping()" 2>/dev/null; then
  exit 0
fi
if ! command -v redis-server >/dev/null; then
  echo "==> no Redis at $host:$port and no redis-server binary: installing one (Debian/Ubuntu)"
  if command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq redis-server) >/dev/null
  else
    echo "install Redis (redis-server) and run this again" >&2; exit 1
  fi
fi
data="${MOSAIC_DATA_DIR:-$HOME/.cache/mosaic}/redis"
mkdir -p "$data"
echo "==> starting redis-server on 127.0.0.1:$port (data in $data)"
redis-server --port "$port" --bind 127.0.0.1 --dir "$data" --appendonly yes --daemonize yes --logfile "$data/redis.log"
for _ in $(seq 50); do
  .venv/bin/python -c "import redis; redis.Redis(port=$port).ping()" 2>/dev/null && exit 0
  sleep 0.2
done
echo "redis-server did not answer on port $port" >&2; exit 1
