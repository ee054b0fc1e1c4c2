#!/usr/bin/env bash
# Install a headless browser for the /docs browser test (tests/routes/test_docs_browser.py): Debian's `chromium`.
# Nothing to do when one is already on PATH. The package comes from the distribution; no browser build is
# downloaded from anywhere else.
set -euo pipefail
for browser in chromium chromium-browser google-chrome; do
    if command -v "$browser" >/dev/null 2>&1; then
        exit 0
    fi
done
if ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" -ne 0 ]; then
    echo "no chromium on PATH: install Debian's chromium package (apt-get install chromium) for the /docs test" >&2
    exit 1
fi
# The package lists may be missing or stale on a fresh machine. Another apt-get (the benchmark installing its
# tools, say) may hold the package lock for a while: wait for it rather than fail.
if ! apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends chromium >/dev/null 2>&1; then
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends chromium >/dev/null
fi
chromium --version
