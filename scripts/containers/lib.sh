# shellcheck shell=bash
# Shared helpers for scripts/containers/*.sh. Source it; do not run it.

# Directory of this file (the scripts/containers folder) and the repo root.
CONTAINERS_SCRIPTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONTAINERS_REPO_ROOT="$(cd "$CONTAINERS_SCRIPTS_DIR/../.." && pwd)"
# shellcheck disable=SC2034  # used by the scripts that source this file
# Default state dir: sockets, pid files, logs, registry storage. The repo ignores .ops/.
CONTAINERS_DEFAULT_STATE_DIR="${OPS_CONTAINERS_STATE_DIR:-$CONTAINERS_REPO_ROOT/.ops/containers}"

log()  { printf '[%s] %s\n' "$(basename "$0")" "$*" >&2; }
warn() { printf '[%s] WARNING: %s\n' "$(basename "$0")" "$*" >&2; }
die()  { printf '[%s] ERROR: %s\n' "$(basename "$0")" "$*" >&2; exit 1; }

require_root() {
  [ "$(id -u)" = 0 ] || die "must run as root (rootful podman, apt-get)"
}

# Wait (up to $1 seconds, default 900) while another apt/dpkg process holds the lock.
wait_for_apt() {
  local limit="${1:-900}" waited=0
  while pgrep -x apt-get >/dev/null 2>&1 || pgrep -x apt >/dev/null 2>&1 \
        || pgrep -x dpkg >/dev/null 2>&1 || pgrep -f '^/usr/bin/unattended-upgrade' >/dev/null 2>&1; do
    if [ "$waited" = 0 ]; then
      log "another apt/dpkg process is running; waiting for it (up to ${limit}s):"
      pgrep -a -x apt-get >&2 || true; pgrep -a -x dpkg >&2 || true
    fi
    sleep 5; waited=$((waited + 5))
    [ "$waited" -lt "$limit" ] || die "apt/dpkg still busy after ${limit}s"
  done
}

# apt_install PKG... : install the Debian packages that are not installed yet.
apt_install() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ "${#missing[@]}" -gt 0 ] || return 0
  log "installing Debian packages: ${missing[*]}"
  wait_for_apt
  export DEBIAN_FRONTEND=noninteractive
  local opts=(-y -q --no-install-recommends -o DPkg::Lock::Timeout=900 -o Dpkg::Options::=--force-confold)
  if ! apt-get install "${opts[@]}" "${missing[@]}" >&2; then
    log "apt-get install failed; running apt-get update and retrying"
    apt-get update -q -o DPkg::Lock::Timeout=900 >&2
    apt-get install "${opts[@]}" "${missing[@]}" >&2
  fi
}

# pidfile_alive PIDFILE [CMDLINE_SUBSTRING]: true when the pid in the file runs (and its
# command line contains the substring, to avoid trusting a recycled pid).
pidfile_alive() {
  local pidfile="$1" needle="${2:-}" pid
  [ -s "$pidfile" ] || return 1
  pid="$(cat "$pidfile")"
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  if [ -n "$needle" ]; then
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$needle" || return 1
  fi
  return 0
}

# stop_pidfile PIDFILE NEEDLE NAME: SIGTERM the process, wait up to 20s, then SIGKILL.
stop_pidfile() {
  local pidfile="$1" needle="$2" name="$3" pid
  if ! pidfile_alive "$pidfile" "$needle"; then
    log "$name is not running (no live process for $pidfile)"
    rm -f "$pidfile"
    return 0
  fi
  pid="$(cat "$pidfile")"
  log "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 40); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  if kill -0 "$pid" 2>/dev/null; then
    warn "$name (pid $pid) did not exit after SIGTERM; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

# now_ms: milliseconds since the epoch (for timings).
now_ms() { date +%s%3N; }
