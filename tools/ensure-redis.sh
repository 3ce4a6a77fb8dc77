#!/usr/bin/env bash
# Make sure the server programs the tests and the example need are installed.
#   tools/ensure-redis.sh          redis-server, redis-cli, redis-sentinel (Debian's packages)
#   tools/ensure-redis.sh valkey   valkey-server and valkey-sentinel too (Valkey 8: on Debian 12
#                                  from the bookworm-backports suite, which is added if needed)
# As root it installs the Debian packages; otherwise it says what to install and fails.
set -euo pipefail

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
command -v redis-sentinel >/dev/null 2>&1 || missing+=(redis-sentinel)
if [ "${1:-}" = valkey ]; then
    command -v valkey-server >/dev/null 2>&1 || missing+=(valkey-server)
    command -v valkey-sentinel >/dev/null 2>&1 || missing+=(valkey-sentinel)
fi
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "error: missing server programs; install the packages: ${missing[*]}" >&2
    echo "       (Debian/Ubuntu: sudo apt-get install -y ${missing[*]};" >&2
    echo "        on Debian 12 Valkey comes from the bookworm-backports suite)" >&2
    exit 1
fi
echo "installing ${missing[*]} with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
if [[ " ${missing[*]} " == *" valkey-server "* ]] \
    && ! apt-cache policy valkey-server | grep -q 'Candidate: [0-9]'; then
    # Debian 12 ships Valkey only in its backports suite.
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME}")
    echo "adding the ${codename}-backports suite for valkey-server" >&2
    cat >"/etc/apt/sources.list.d/${codename}-backports.sources" <<SOURCES
Types: deb
URIs: http://deb.debian.org/debian
Suites: ${codename}-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
    apt-get update -qq
fi
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# The Debian packages start system services on the default ports; the project starts its own.
for service in redis-server redis-sentinel valkey-server valkey-sentinel; do
    if command -v systemctl >/dev/null 2>&1; then
        systemctl disable --now "$service" >/dev/null 2>&1 || true
    fi
    service "$service" stop >/dev/null 2>&1 || true
done
