#!/usr/bin/env bash
# Install promtool (Prometheus' rule checker and unit-test runner) into .tools/bin for `make validate-deploy`.
# It comes from Debian's `prometheus` package, unpacked rather than installed: promtool is one static binary, and
# installing the package would also start a Prometheus server and pull in its web assets. Nothing to do when
# promtool is already on PATH or in .tools/bin.
set -euo pipefail
dest="${1:-.tools/bin}"
if [ -x "$dest/promtool" ] || command -v promtool >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "promtool is missing and this is not a Debian-based machine: install Prometheus' promtool on PATH" >&2
    exit 1
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# `apt-get download` needs the package lists; refresh them once if the package is not known yet.
if ! (cd "$work" && apt-get download prometheus >/dev/null 2>&1); then
    apt-get update -qq
    (cd "$work" && apt-get download prometheus)
fi
dpkg-deb --fsys-tarfile "$work"/prometheus_*.deb | tar -x -C "$work" ./usr/bin/promtool
mkdir -p "$dest"
install -m 0755 "$work/usr/bin/promtool" "$dest/promtool"
"$dest/promtool" --version | head -1
