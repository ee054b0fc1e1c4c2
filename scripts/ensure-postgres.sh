#!/usr/bin/env bash
# Make sure the test PostgreSQL answers. Tests use GATEWAY_TEST_DATABASE_URL (default: the local `test`
# database). The local Debian cluster is started when it is down, but only for a URL that names it (unset, or
# host 127.0.0.1/localhost/a socket and port 5432): another server's URL is never answered by a local one. With
# the URL unset and no local server, the test fixtures start the embedded server that `gateway demo` uses, so
# nothing is skipped; with it set, a server that does not answer is an error here and in the tests.
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

names_local_cluster() {
    "$py" - "$url" <<'PY'
import sys
from urllib.parse import urlsplit
parts = urlsplit(sys.argv[1])
local_host = parts.hostname in (None, "", "127.0.0.1", "localhost", "::1")
sys.exit(0 if parts.scheme in ("postgres", "postgresql") and local_host and (parts.port or 5432) == 5432 else 1)
PY
}

if answers; then
    echo "postgres: $url answers"
    exit 0
fi
if names_local_cluster && command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
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
    echo "postgres: GATEWAY_TEST_DATABASE_URL=$url does not answer (no embedded server replaces a configured one)" >&2
    exit 1
fi
echo "postgres: no local server answers; the tests will start an embedded PostgreSQL"
