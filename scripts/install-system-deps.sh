#!/usr/bin/env bash
# Debian packages the tests and the demo use as real peers: Prometheus (server + promtool),
# systemd-analyze, systemd-nspawn (boots systemd in a container for the unit's tests),
# PostgreSQL, Chromium for the status page test, microsocks (SOCKS5 with user/password) and
# tinyproxy (HTTP CONNECT) for the proxy tests, iproute2's ss. Idempotent: installs only what is
# missing, so a developer machine that has them pays nothing.
set -euo pipefail

need=()
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v systemd-nspawn >/dev/null 2>&1 || need+=(systemd-container)
# PostgreSQL for the lease store's second backend (tests start their own server as `postgres`).
[ -x /usr/lib/postgresql/15/bin/initdb ] || need+=(postgresql)
command -v microsocks >/dev/null 2>&1 || need+=(microsocks)
# ss (iproute2): the tests read a daemon socket's kernel send buffer (skmem) with it.
command -v ss >/dev/null 2>&1 || need+=(iproute2)
# tinyproxy lives in /usr/bin on Debian 12 (/usr/sbin on older releases, off a user's PATH)
command -v tinyproxy >/dev/null 2>&1 || [ -x /usr/sbin/tinyproxy ] || need+=(tinyproxy)
if [ "${TGDAEMON_SKIP_BROWSER:-0}" != 1 ]; then
  command -v chromium >/dev/null 2>&1 || need+=(chromium)
fi
[ ${#need[@]} -eq 0 ] && exit 0

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# shellcheck disable=SC2086
$SUDO apt-get install -y -qq --no-install-recommends $(printf '%s\n' "${need[@]}" | sort -u) >/dev/null
