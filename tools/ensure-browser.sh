#!/usr/bin/env bash
# Make sure Debian's chromium and chromedriver are installed: the dashboard's browser tests drive
# them (tests/test_dashboard_browser.py); nothing downloads a browser of its own.
# As root it installs the Debian packages; otherwise it says what to install and fails.
set -euo pipefail

missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "error: the dashboard's browser tests need: ${missing[*]}" >&2
    echo "       (Debian/Ubuntu: sudo apt-get install -y ${missing[*]})" >&2
    exit 1
fi
echo "installing ${missing[*]} with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
