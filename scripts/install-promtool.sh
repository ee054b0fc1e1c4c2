#!/usr/bin/env bash
# Install promtool (Prometheus' rule checker and unit-test runner) and the Prometheus server into .tools/bin, for
# `make validate-deploy` and for the test that runs the alert rules in a real Prometheus
# (tests/deploy/test_alerts_live.py). Both come from Debian's `prometheus` package, unpacked rather than installed:
# each is one static binary, and installing the package would also start a Prometheus server as a service and pull
# in its web assets (the test uses the HTTP API only). Nothing to do for a binary already in .tools/bin or on PATH.
set -euo pipefail
dest="${1:-.tools/bin}"
missing=()
for binary in promtool prometheus; do
    if [ ! -x "$dest/$binary" ] && ! command -v "$binary" >/dev/null 2>&1; then
        missing+=("$binary")
    fi
done
if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "${missing[*]} missing and this is not a Debian-based machine: install Prometheus' ${missing[*]} on PATH" >&2
    exit 1
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# `apt-get download` needs the package lists; refresh them once if the package is not known yet.
if ! (cd "$work" && apt-get download prometheus >/dev/null 2>&1); then
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    (cd "$work" && apt-get download prometheus)
fi
mkdir -p "$dest"
for binary in "${missing[@]}"; do
    dpkg-deb --fsys-tarfile "$work"/prometheus_*.deb | tar -x -C "$work" "./usr/bin/$binary"
    install -m 0755 "$work/usr/bin/$binary" "$dest/$binary"
    "$dest/$binary" --version 2>&1 | head -1
done
