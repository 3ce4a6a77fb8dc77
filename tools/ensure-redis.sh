#!/usr/bin/env bash
# Make sure the Redis programs the tests and the example need are installed.
# As root it installs the Debian packages; otherwise it says what to install and fails.
set -euo pipefail

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
command -v redis-sentinel >/dev/null 2>&1 || missing+=(redis-sentinel)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "error: missing Redis programs; install the packages: ${missing[*]}" >&2
    echo "       (Debian/Ubuntu: sudo apt-get install -y ${missing[*]})" >&2
    exit 1
fi
echo "installing ${missing[*]} with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# The Debian packages start system services on the default ports; the project starts its own.
if command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now redis-server redis-sentinel >/dev/null 2>&1 || true
fi
service redis-server stop >/dev/null 2>&1 || true
service redis-sentinel stop >/dev/null 2>&1 || true
