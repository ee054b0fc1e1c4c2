#!/usr/bin/env bash
# Make sure the test PostgreSQL answers. Tests use GATEWAY_TEST_DATABASE_URL (default: the local `test`
# database). A local Debian cluster that is down is started; on a machine with no PostgreSQL at all, the test
# fixtures start the embedded server that `gateway demo` uses instead, so nothing is skipped.
set -euo pipefail
url="${GATEWAY_TEST_DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/test}"
py="${PYTHON:-.venv/bin/python}"

answers() {
    "$py" - "$url" <<'PY'
import sys, psycopg2
try:
    psycopg2.connect(sys.argv[1], connect_timeout=3).close()
except psycopg2.OperationalError:
    sys.exit(1)
PY
}

if answers; then
    echo "postgres: $url answers"
    exit 0
fi
if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
    for version in $(ls /etc/postgresql); do
        echo "postgres: starting local cluster $version/main"
        pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    done
    for _ in $(seq 1 50); do
        if answers; then echo "postgres: $url answers"; exit 0; fi
        sleep 0.2
    done
fi
if [ -n "${GATEWAY_TEST_DATABASE_URL:-}" ]; then
    echo "postgres: GATEWAY_TEST_DATABASE_URL=$url does not answer" >&2
    exit 1
fi
echo "postgres: no local server answers; the tests will start an embedded PostgreSQL"
