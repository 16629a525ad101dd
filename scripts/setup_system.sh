#!/usr/bin/env bash
# Debian packages the tests use: chromium (browser tests; Playwright from PyPI drives it,
# no browser is ever downloaded) and opencv-doc (carries vtest.avi, the source of the
# sample clip, so the test that reproduces the clip runs). Idempotent: skipped when present.
set -euo pipefail
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
[[ -f /usr/share/doc/opencv-doc/examples/data/vtest.avi || -f /usr/share/doc/opencv-doc/examples/data/vtest.avi.gz ]] || need+=(opencv-doc)
[[ ${#need[@]} -eq 0 ]] && exit 0
if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null; then
    echo "[setup_system] missing ${need[*]} and cannot apt-get them: install them (Debian packages)" >&2
    exit 0
fi
echo "[setup_system] installing ${need[*]}" >&2
apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
