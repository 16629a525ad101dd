#!/usr/bin/env bash
# Headless Chromium for the browser tests: Debian's package (Playwright from PyPI drives
# it; no browser is ever downloaded). Idempotent; skipped when chromium is present.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then exit 0; fi
if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null; then
    echo "[setup_browser] chromium not found and cannot apt-get it: browser tests will fail; install Debian's chromium" >&2
    exit 0
fi
echo "[setup_browser] installing Debian chromium" >&2
apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >&2
