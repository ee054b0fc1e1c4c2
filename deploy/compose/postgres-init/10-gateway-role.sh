#!/bin/sh
# Runs once, on the first start of an empty data volume (the postgres image's /docker-entrypoint-initdb.d), before
# 20-seed.sql. The gateway connects as `gateway`, a role that can only read: it runs named SELECT queries and
# nothing else, so that is all it may do.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    --set=gateway_password="$GATEWAY_DB_PASSWORD" <<'SQL'
CREATE ROLE gateway LOGIN PASSWORD :'gateway_password';
GRANT CONNECT ON DATABASE :"DBNAME" TO gateway;
GRANT USAGE ON SCHEMA public TO gateway;
-- Tables that 20-seed.sql creates next (as the owner) are readable by the gateway role, and only readable.
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO gateway;
SQL
