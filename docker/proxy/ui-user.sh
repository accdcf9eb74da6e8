#!/bin/sh
# Adds a user of the Dagster UI, changes their password or role, or removes them. The password is read from the
# terminal (asked twice) or, when stdin is not a terminal, from its first line; never from the command line.
#
#   docker/proxy/ui-user.sh NAME operator|viewer    add NAME (or set a new password / move NAME to this role)
#   docker/proxy/ui-user.sh NAME delete             remove NAME from both files
#   make ui-user NAME=alice ROLE=operator           the same
#
# The files are htpasswd files with bcrypt hashes (`htpasswd -B` of apache2-utils, cost $BCRYPT_COST, default 10):
#   $OPS_UI_USERS_DIR/operators.htpasswd and $OPS_UI_USERS_DIR/viewers.htpasswd (default docker/proxy/users/, git-
#   ignored), the files docker-compose.yml gives the proxy as secrets (OPS_UI_OPERATORS_HTPASSWD /
#   OPS_UI_VIEWERS_HTPASSWD). Both are created (empty) when missing, mode 0600. A running proxy reads them when it
#   starts: `docker compose restart ui_proxy` after a change.
set -eu

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[ $# -eq 2 ] || usage
name="$1"
role="$2"
dir="${OPS_UI_USERS_DIR:-$(cd "$(dirname "$0")" && pwd)/users}"
cost="${BCRYPT_COST:-10}"
operators="$dir/operators.htpasswd"
viewers="$dir/viewers.htpasswd"

printf '%s\n' "$name" | grep -Eqx '[A-Za-z0-9._@-]{1,64}' \
  || { echo "ui-user: bad name '$name': letters, digits and . _ @ - only (at most 64)" >&2; exit 2; }
case "$role" in
  operator) file="$operators"; other="$viewers" ;;
  viewer) file="$viewers"; other="$operators" ;;
  delete) file=""; other="" ;;
  *) usage ;;
esac
command -v htpasswd >/dev/null || { echo "ui-user: htpasswd is missing: apt-get install apache2-utils" >&2; exit 1; }

umask 077
mkdir -p "$dir"
for f in "$operators" "$viewers"; do [ -e "$f" ] || : >"$f"; done

remove() {  # remove NAME from FILE if present (htpasswd -D fails when absent)
  if awk -F: -v n="$name" '$1 == n { found = 1 } END { exit !found }' "$1"; then htpasswd -D "$1" "$name" 2>/dev/null; fi
}

if [ "$role" = delete ]; then
  remove "$operators"
  remove "$viewers"
  echo "ui-user: $name removed; restart the proxy (docker compose restart ui_proxy)" >&2
  exit 0
fi

if [ -t 0 ]; then
  htpasswd -B -C "$cost" "$file" "$name"        # asks twice
else
  IFS= read -r password || [ -n "${password:-}" ] || { echo "ui-user: no password on stdin" >&2; exit 1; }
  [ ${#password} -ge 12 ] || { echo "ui-user: passwords of at least 12 characters, please" >&2; exit 1; }
  printf '%s\n' "$password" | htpasswd -i -B -C "$cost" "$file" "$name" 2>/dev/null
fi
remove "$other"
echo "ui-user: $name is a $role ($file); restart the proxy to apply (docker compose restart ui_proxy)" >&2
