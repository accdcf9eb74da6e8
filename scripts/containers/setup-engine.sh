#!/usr/bin/env bash
# Install and start a rootful Podman engine that serves the Docker-compatible API on a
# unix socket, so that the `docker` CLI and the Python `docker` SDK work without dockerd.
#
# usage: scripts/containers/setup-engine.sh [STATE_DIR]
#        eval "$(scripts/containers/setup-engine.sh)"      # sets DOCKER_HOST in this shell
#
# STATE_DIR (default: <repo>/.ops/containers) receives podman.sock, podman.pid, podman.log.
# Idempotent: packages/config are only changed when needed; a service that already
# answers on the socket is left alone. Progress goes to stderr; stdout only carries
# the `export DOCKER_HOST=...` line.
#
# Environment knobs:
#   OPS_CONTAINERS_NOFILE  default container RLIMIT_NOFILE, "soft:hard" (default 1024:1024)
#   OPS_CONTAINERS_NPROC   default container RLIMIT_NPROC,  "soft:hard" (default 1024:1024)
#   OPS_CONTAINERS_SKIP_INSTALL=1  never call apt-get (fail if something is missing)
#   OPS_CONTAINERS_HEALTH_RUNNER=0 do not start healthcheck-runner.py (see below)
#
# Without systemd, podman cannot schedule HEALTHCHECKs (it uses systemd timers), so this
# script also starts scripts/containers/healthcheck-runner.py next to the service; it
# triggers each running container's healthcheck every Interval through the API, which
# makes State.Health.Status go starting -> healthy/unhealthy as with Docker.
set -euo pipefail
# shellcheck source=lib.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"

case "${1:-}" in -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0;; esac
STATE_DIR="${1:-$CONTAINERS_DEFAULT_STATE_DIR}"
require_root
mkdir -p "$STATE_DIR"
STATE_DIR="$(cd "$STATE_DIR" && pwd)"
SOCK="$STATE_DIR/podman.sock"
PIDFILE="$STATE_DIR/podman.pid"
LOGFILE="$STATE_DIR/podman.log"
[ "${#SOCK}" -lt 100 ] || die "socket path too long for a unix socket (${#SOCK} chars): $SOCK"

t0="$(now_ms)"

# --- 1. packages -------------------------------------------------------------------------
# podman + runc (crun fails on this host's cgroup v1 hierarchy), netavark + aardvark-dns
# (bridge networks and name resolution between containers), iptables (netavark NAT and
# port publishing), catatonit (--init), curl (health probes of the API socket).
# Not needed for rootful podman: uidmap, slirp4netns/passt (rootless networking) and
# fuse-overlayfs (the kernel's native overlay works on ext4 here).
if [ "${OPS_CONTAINERS_SKIP_INSTALL:-0}" != 1 ]; then
  apt_install podman runc conmon netavark aardvark-dns iptables catatonit curl ca-certificates
fi
command -v podman >/dev/null || die "podman is not installed"
command -v runc >/dev/null || die "runc is not installed"

# --- 2. containers.conf (drop-in: merges with, never rewrites, other settings) -----------
# Files in /etc/containers/containers.conf.d/ are read after /etc/containers/containers.conf
# and override only the keys they set.
NOFILE="${OPS_CONTAINERS_NOFILE:-1024:1024}"
NPROC="${OPS_CONTAINERS_NPROC:-1024:1024}"
CGROUP_MANAGER=cgroupfs
[ -d /run/systemd/system ] && CGROUP_MANAGER=systemd
CONF_D=/etc/containers/containers.conf.d
CONF_FILE="$CONF_D/50-ops-pipeline.conf"
mkdir -p "$CONF_D"
conf_new="$(cat <<CONF
# Managed by ops-pipeline scripts/containers/setup-engine.sh; re-running the script rewrites it.
[containers]
# Podman's default rlimits (nofile=1048576) exceed this host's hard limits and runc refuses them.
default_ulimits = ["nofile=$NOFILE", "nproc=$NPROC"]

[engine]
# crun fails on this host's cgroups; runc works.
runtime = "runc"
cgroup_manager = "$CGROUP_MANAGER"
events_logger = "file"
CONF
)"
if [ ! -f "$CONF_FILE" ] || [ "$(cat "$CONF_FILE")" != "$conf_new" ]; then
  printf '%s\n' "$conf_new" >"$CONF_FILE"
  log "wrote $CONF_FILE"
else
  log "$CONF_FILE is up to date"
fi

# --- 3. registries.conf drop-in: plain-http local registry --------------------------------
# Only the two local registry names are declared insecure (http). No unqualified-search
# registries are added, so a short name either resolves to a local image or fails at once.
REG_D=/etc/containers/registries.conf.d
REG_FILE="$REG_D/50-ops-pipeline-local-registry.conf"
mkdir -p "$REG_D"
reg_new="$(cat <<'CONF'
# Managed by ops-pipeline scripts/containers/setup-engine.sh; re-running the script rewrites it.
# The local registry started by scripts/containers/start-registry.sh speaks plain http.
[[registry]]
location = "127.0.0.1:5000"
insecure = true

[[registry]]
location = "localhost:5000"
insecure = true
CONF
)"
if [ ! -f "$REG_FILE" ] || [ "$(cat "$REG_FILE")" != "$reg_new" ]; then
  printf '%s\n' "$reg_new" >"$REG_FILE"
  log "wrote $REG_FILE"
else
  log "$REG_FILE is up to date"
fi

# --- 4. the API service ---------------------------------------------------------------------
STARTED_SERVICE=0
ping_ok() { curl -fsS -m 3 --unix-socket "$SOCK" http://d/_ping >/dev/null 2>&1; }

if ping_ok; then
  log "podman API already answers on $SOCK"
else
  if pidfile_alive "$PIDFILE" "system service"; then
    log "podman service (pid $(cat "$PIDFILE")) runs but does not answer; giving it 15s"
    for _ in $(seq 1 30); do ping_ok && break; sleep 0.5; done
    if ! ping_ok; then
      stop_pidfile "$PIDFILE" "system service" "stale podman service"
    fi
  fi
  if ! ping_ok; then
    rm -f "$SOCK"
    log "starting: podman system service --time=0 unix://$SOCK (log: $LOGFILE)"
    # No job control in a script, so setsid does not fork: $! is podman's own pid.
    setsid nohup podman system service --time=0 "unix://$SOCK" >>"$LOGFILE" 2>&1 </dev/null &
    echo $! >"$PIDFILE"
    for _ in $(seq 1 120); do
      ping_ok && break
      kill -0 "$(cat "$PIDFILE")" 2>/dev/null || { tail -n 20 "$LOGFILE" >&2; die "podman service exited; see $LOGFILE"; }
      sleep 0.25
    done
    ping_ok || { tail -n 20 "$LOGFILE" >&2; die "podman API did not answer on $SOCK within 30s"; }
    log "podman API answers on $SOCK (pid $(cat "$PIDFILE"))"
    STARTED_SERVICE=1
  fi
fi

# --- 5. healthcheck runner (only where podman has no systemd to schedule checks) ----------
HC_PIDFILE="$STATE_DIR/healthcheck-runner.pid"
HC_LOG="$STATE_DIR/healthcheck-runner.log"
if [ -d /run/systemd/system ]; then
  log "systemd present: podman schedules healthchecks itself; no runner needed"
elif [ "${OPS_CONTAINERS_HEALTH_RUNNER:-1}" = 0 ]; then
  log "OPS_CONTAINERS_HEALTH_RUNNER=0: healthchecks run only via 'podman healthcheck run NAME'"
elif [ "$STARTED_SERVICE" = 0 ] && pidfile_alive "$HC_PIDFILE" "healthcheck-runner.py"; then
  log "healthcheck runner already running (pid $(cat "$HC_PIDFILE"))"
else
  # a runner left from a previous service instance watches the old pid: replace it
  stop_pidfile "$HC_PIDFILE" "healthcheck-runner.py" "previous healthcheck runner" 2>/dev/null
  setsid nohup python3 "$CONTAINERS_SCRIPTS_DIR/healthcheck-runner.py" --socket "$SOCK" \
    --service-pid "$(cat "$PIDFILE" 2>/dev/null || echo 0)" >>"$HC_LOG" 2>&1 </dev/null &
  echo $! >"$HC_PIDFILE"
  sleep 0.3
  pidfile_alive "$HC_PIDFILE" "healthcheck-runner.py" || { tail -n 20 "$HC_LOG" >&2; die "healthcheck runner failed to start"; }
  log "started healthcheck runner (pid $(cat "$HC_PIDFILE"), log: $HC_LOG)"
fi

ver="$(curl -fsS -m 5 --unix-socket "$SOCK" http://d/version 2>/dev/null \
  | python3 -c 'import json,sys; v=json.load(sys.stdin); print(v.get("Version"), "API", v.get("ApiVersion"))' 2>/dev/null || true)"
log "engine: podman ${ver:-?}; ready in $(( $(now_ms) - t0 )) ms"
log "use it with:  export DOCKER_HOST=unix://$SOCK"
echo "export DOCKER_HOST=unix://$SOCK"
