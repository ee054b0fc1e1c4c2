#!/usr/bin/env bash
# Make sure the test Redis answers (the shared rate limiter's tests run against a real server). Tests use
# GATEWAY_TEST_REDIS_URL (default redis://127.0.0.1:6379/0). A local redis-server that is installed but down is
# started, bound to loopback, keeping nothing on disk. On a machine without redis-server at all, only the Redis
# tests are skipped, and they say so.
set -euo pipefail
url="${GATEWAY_TEST_REDIS_URL:-redis://127.0.0.1:6379/0}"
py="${PYTHON:-.venv/bin/python}"

answers() {
    "$py" - "$url" <<'PY'
import sys, redis
try:
    redis.Redis.from_url(sys.argv[1], socket_timeout=2, socket_connect_timeout=2).ping()
except (redis.RedisError, OSError):
    sys.exit(1)
PY
}

if answers; then
    echo "redis: $url answers"
    exit 0
fi
if [ -n "${GATEWAY_TEST_REDIS_URL:-}" ]; then
    echo "redis: GATEWAY_TEST_REDIS_URL=$url does not answer" >&2
    exit 1
fi
if command -v redis-server >/dev/null 2>&1; then
    echo "redis: starting redis-server on 127.0.0.1:6379"
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no >/dev/null
    for _ in $(seq 1 50); do
        if answers; then echo "redis: $url answers"; exit 0; fi
        sleep 0.1
    done
    echo "redis: redis-server was started but $url does not answer" >&2
    exit 1
fi
echo "redis: no redis-server on this machine; the Redis rate-limiter tests will be skipped"
