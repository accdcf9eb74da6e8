#!/usr/bin/env bash
# Stop the podman API service started by setup-engine.sh.
#
# usage: scripts/containers/stop-engine.sh [--rm-containers] [STATE_DIR]
#   --rm-containers  also force-remove ALL podman containers (they keep running after the
#                    API service stops, since each one is supervised by its own conmon)
# Idempotent: does nothing when the service is not running. Images are kept.
set -euo pipefail
# shellcheck source=lib.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"

RM_CONTAINERS=0
while [ $# -gt 0 ]; do
  case "$1" in
    --rm-containers) RM_CONTAINERS=1; shift;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0;;
    *) break;;
  esac
done
STATE_DIR="${1:-$CONTAINERS_DEFAULT_STATE_DIR}"
require_root

if [ "$RM_CONTAINERS" = 1 ] && command -v podman >/dev/null; then
  n="$(podman ps -aq | wc -l)"
  if [ "$n" -gt 0 ]; then
    log "removing $n container(s)"
    podman rm -f -t 5 -a >/dev/null
  fi
fi

if [ -d "$STATE_DIR" ]; then
  stop_pidfile "$STATE_DIR/healthcheck-runner.pid" "healthcheck-runner.py" "healthcheck runner"
  stop_pidfile "$STATE_DIR/podman.pid" "system service" "podman API service"
  rm -f "$STATE_DIR/podman.sock"
else
  log "no state dir $STATE_DIR; nothing to stop"
fi
