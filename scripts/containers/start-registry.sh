#!/usr/bin/env bash
# Start a local OCI/Docker registry (Debian's `docker-registry`, distribution 2.8) on
# 127.0.0.1:5000, plain http, storage under STATE_DIR/registry/data, deletes enabled.
#
# usage: scripts/containers/start-registry.sh [STATE_DIR]
#   STATE_DIR default: <repo>/.ops/containers  (files: registry/config.yml, registry.pid,
#   registry.log, registry/data/). Env OPS_REGISTRY_ADDR overrides 127.0.0.1:5000.
# Idempotent: a registry that already answers on the address is left alone.
# Podman trusts it over http thanks to the registries.conf.d drop-in that setup-engine.sh
# writes (127.0.0.1:5000 and localhost:5000 marked insecure); this script writes it too.
set -euo pipefail
# shellcheck source=lib.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"

case "${1:-}" in -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0;; esac
STATE_DIR="${1:-$CONTAINERS_DEFAULT_STATE_DIR}"
ADDR="${OPS_REGISTRY_ADDR:-127.0.0.1:5000}"
require_root
mkdir -p "$STATE_DIR/registry/data"
STATE_DIR="$(cd "$STATE_DIR" && pwd)"
CONF="$STATE_DIR/registry/config.yml"
PIDFILE="$STATE_DIR/registry.pid"
LOGFILE="$STATE_DIR/registry.log"
URL="http://$ADDR/v2/"

t0="$(now_ms)"
if [ "${OPS_CONTAINERS_SKIP_INSTALL:-0}" != 1 ]; then
  apt_install docker-registry curl
fi
command -v docker-registry >/dev/null || die "docker-registry is not installed"

# The Debian package ships an init script / systemd unit for its own config on :5000
# (all interfaces, htpasswd auth). Without systemd it is not started; if it is running,
# it holds the port and we stop with a clear message instead of fighting over it.

cat >"$CONF.new" <<YAML
# Managed by ops-pipeline scripts/containers/start-registry.sh
version: 0.1
log:
  level: info
  formatter: text
  fields:
    service: ops-registry
storage:
  filesystem:
    rootdirectory: $STATE_DIR/registry/data
  delete:
    enabled: true
  cache:
    blobdescriptor: inmemory
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: $ADDR
  headers:
    X-Content-Type-Options: [nosniff]
health:
  storagedriver:
    enabled: true
    interval: 10s
    threshold: 3
YAML
if [ -f "$CONF" ] && cmp -s "$CONF" "$CONF.new"; then rm -f "$CONF.new"; else mv "$CONF.new" "$CONF"; log "wrote $CONF"; fi

answers() { [ "$(curl -s -m 3 -o /dev/null -w '%{http_code}' "$URL" 2>/dev/null)" = 200 ]; }

if answers; then
  if pidfile_alive "$PIDFILE" "$CONF"; then
    log "registry already running on $ADDR (pid $(cat "$PIDFILE"))"
  else
    warn "something else already answers on $URL (not started by this script); using it as is"
  fi
else
  if pidfile_alive "$PIDFILE" "$CONF"; then
    stop_pidfile "$PIDFILE" "$CONF" "unresponsive registry"
  fi
  if ss -Hltn "sport = :${ADDR##*:}" 2>/dev/null | grep -q .; then
    ss -Hltnp "sport = :${ADDR##*:}" >&2 || true
    die "port ${ADDR##*:} is taken by another process (see above)"
  fi
  log "starting docker-registry serve $CONF (log: $LOGFILE)"
  setsid nohup docker-registry serve "$CONF" >>"$LOGFILE" 2>&1 </dev/null &
  echo $! >"$PIDFILE"
  for _ in $(seq 1 120); do
    answers && break
    kill -0 "$(cat "$PIDFILE")" 2>/dev/null || { tail -n 20 "$LOGFILE" >&2; die "registry exited; see $LOGFILE"; }
    sleep 0.25
  done
  answers || { tail -n 20 "$LOGFILE" >&2; die "registry did not answer on $URL within 30s"; }
  log "registry answers on $URL (pid $(cat "$PIDFILE")) after $(( $(now_ms) - t0 )) ms"
fi

# Make sure podman treats it as an http (insecure) registry.
REG_FILE=/etc/containers/registries.conf.d/50-ops-pipeline-local-registry.conf
if ! grep -qF "location = \"$ADDR\"" "$REG_FILE" 2>/dev/null; then
  mkdir -p "$(dirname "$REG_FILE")"
  printf '\n[[registry]]\nlocation = "%s"\ninsecure = true\n' "$ADDR" >>"$REG_FILE"
  log "declared $ADDR insecure (http) in $REG_FILE"
fi
log "push with: docker push $ADDR/NAME:TAG (DOCKER_HOST=podman socket) or podman push $ADDR/NAME:TAG"
echo "REGISTRY=$ADDR"
