#!/usr/bin/env bash
# Stop the registry started by start-registry.sh. Its data (STATE_DIR/registry/data) stays.
# usage: scripts/containers/stop-registry.sh [--gc | --wipe] [STATE_DIR]
#   --gc    after stopping, garbage-collect blobs no manifest references any more
#           (`docker-registry garbage-collect --delete-untagged`; needs the registry stopped)
#   --wipe  also delete the stored images (STATE_DIR/registry/data)
set -euo pipefail
# shellcheck source=lib.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"
WIPE=0; GC=0
while [ $# -gt 0 ]; do
  case "$1" in
    --wipe) WIPE=1; shift;;
    --gc) GC=1; shift;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0;;
    *) break;;
  esac
done
STATE_DIR="${1:-$CONTAINERS_DEFAULT_STATE_DIR}"
stop_pidfile "$STATE_DIR/registry.pid" "$STATE_DIR/registry/config.yml" "registry"
if [ "$WIPE" = 1 ] && [ -d "$STATE_DIR/registry/data" ]; then
  rm -rf "$STATE_DIR/registry/data"
  log "removed $STATE_DIR/registry/data"
fi
if [ "$GC" = 1 ] && [ "$WIPE" = 0 ] && [ -f "$STATE_DIR/registry/config.yml" ]; then
  before="$(du -sh "$STATE_DIR/registry/data" 2>/dev/null | cut -f1)"
  docker-registry garbage-collect --delete-untagged "$STATE_DIR/registry/config.yml" >"$STATE_DIR/registry-gc.log" 2>&1 \
    || { tail -n 5 "$STATE_DIR/registry-gc.log" >&2; die "garbage-collect failed (log: $STATE_DIR/registry-gc.log)"; }
  log "garbage-collected registry storage: $before -> $(du -sh "$STATE_DIR/registry/data" | cut -f1)"
fi
