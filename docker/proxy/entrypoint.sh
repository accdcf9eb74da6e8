#!/bin/sh
# Entrypoint of the UI proxy (service `ui_proxy`): checks the two htpasswd files, derives what nginx needs from them,
# renders nginx.conf.template and runs nginx in the foreground.
#
#   entrypoint.sh          render, `nginx -t`, then exec nginx (daemon off)
#   entrypoint.sh render   render and check only; prints the path of the rendered nginx.conf
#
# Environment (defaults are the compose service's):
#   OPS_UI_OPERATORS_FILE       htpasswd file of the operators (default /run/secrets/ui_operators)
#   OPS_UI_VIEWERS_FILE         htpasswd file of the viewers   (default /run/secrets/ui_viewers)
#   OPS_UI_OPERATOR_UPSTREAM    host:port of the webserver that launches    (default webserver:3000)
#   OPS_UI_VIEWER_UPSTREAM      host:port of the --read-only webserver      (default webserver_readonly:3000)
#   OPS_UI_PROXY_LISTEN         nginx `listen` of the public side           (default 8080)
#   OPS_UI_PROXY_HEALTH_LISTEN  nginx `listen` of the healthcheck side      (default 127.0.0.1:8081)
#   OPS_UI_PROXY_RUNTIME        folder of the rendered files (default /run/ops-ui-proxy)
#   OPS_UI_PROXY_TEMPLATE       the template (default: nginx.conf.template next to this script)
#   OPS_UI_PROXY_USER           user of nginx's workers when started as root (default www-data)
#   NGINX                       the nginx binary (default: nginx on PATH, else /usr/sbin/nginx)
#
# Every line of both files must be `name:<bcrypt hash>` (`htpasswd -B`, docker/proxy/ui-user.sh), names of
# [A-Za-z0-9._@-] only, no name in both files, at least one user in all. Anything else stops the proxy with a
# message naming the file and line (never the hash): a typo must not lock everyone out silently or let anyone in.
set -eu

here="$(cd "$(dirname "$0")" && pwd)"
operators_file="${OPS_UI_OPERATORS_FILE:-/run/secrets/ui_operators}"
viewers_file="${OPS_UI_VIEWERS_FILE:-/run/secrets/ui_viewers}"
template="${OPS_UI_PROXY_TEMPLATE:-$here/nginx.conf.template}"
export OPS_UI_PROXY_RUNTIME="${OPS_UI_PROXY_RUNTIME:-/run/ops-ui-proxy}"
export OPS_UI_OPERATOR_UPSTREAM="${OPS_UI_OPERATOR_UPSTREAM:-webserver:3000}"
export OPS_UI_VIEWER_UPSTREAM="${OPS_UI_VIEWER_UPSTREAM:-webserver_readonly:3000}"
export OPS_UI_PROXY_LISTEN="${OPS_UI_PROXY_LISTEN:-8080}"
export OPS_UI_PROXY_HEALTH_LISTEN="${OPS_UI_PROXY_HEALTH_LISTEN:-127.0.0.1:8081}"
export OPS_UI_PROXY_USER="${OPS_UI_PROXY_USER:-www-data}"
nginx_bin="${NGINX:-$(command -v nginx || echo /usr/sbin/nginx)}"

die() { echo "ui_proxy: $*" >&2; exit 1; }

# upstreams go into nginx's config verbatim: host:port, nothing else
for upstream in "$OPS_UI_OPERATOR_UPSTREAM" "$OPS_UI_VIEWER_UPSTREAM"; do
  printf '%s\n' "$upstream" | grep -Eqx '[A-Za-z0-9._-]+:[0-9]{1,5}' \
    || die "upstream '$upstream' is not host:port"
done

# check_users FILE ROLE: prints the names of FILE's users (one per line), dies on a bad line
check_users() {
  [ -f "$1" ] || die "no $2 file at $1 (docker/proxy/ui-user.sh writes it; docker/README.md)"
  [ -r "$1" ] || die "the $2 file $1 is not readable"
  bad="$(grep -Env '^[[:space:]]*(#|$)' "$1" \
         | grep -Ev '^[0-9]+:[A-Za-z0-9._@-]+:[$]2[aby][$][0-9]{2}[$][./A-Za-z0-9]{53}$' | head -n 1 | cut -d: -f1)" || true
  [ -z "$bad" ] || die "$2 file $1, line $bad: not name:<bcrypt hash> (htpasswd -B; names of [A-Za-z0-9._@-] only)"
  names="$(grep -Ev '^[[:space:]]*(#|$)' "$1" | cut -d: -f1)" || true
  twice="$(printf '%s\n' "$names" | grep -v '^$' | sort | uniq -d | tr '\n' ' ')"
  [ -z "$twice" ] || die "$2 file $1: user(s) listed twice: $twice"
  printf '%s\n' "$names" | grep -v '^$' || true
}

umask 027
mkdir -p "$OPS_UI_PROXY_RUNTIME"
operators="$(check_users "$operators_file" operators)" || exit 1
viewers="$(check_users "$viewers_file" viewers)" || exit 1
both="$(printf '%s\n%s\n' "$operators" "$viewers" | grep -v '^$' | sort | uniq -d | tr '\n' ' ')"
[ -z "$both" ] || die "user(s) in both the operators' and the viewers' file: $both(one role each)"
[ -n "$operators$viewers" ] || die "no users in $operators_file nor $viewers_file: nobody could log in (docker/proxy/ui-user.sh)"

runtime="$OPS_UI_PROXY_RUNTIME"
# all users, for auth_basic (comments and blank lines dropped)
grep -hEv '^[[:space:]]*(#|$)' "$operators_file" "$viewers_file" >"$runtime/users.htpasswd.new" || true
# operators, as exact case-sensitive regexes of the map (names hold [A-Za-z0-9._@-] only: escape the dot)
printf '%s\n' "$operators" | grep -v '^$' | sed 's/\./\\./g; s/.*/"~^&$" operator;/' >"$runtime/operators.map.new" || true
# the container's DNS server (Docker: 127.0.0.11, Podman: the network's gateway), for the webservers' names
ns="$(awk '$1 == "nameserver" { print $2; exit }' /etc/resolv.conf 2>/dev/null || true)"
case "$ns" in
  "") : >"$runtime/resolver.conf.new" ;;
  *:*) echo "resolver [$ns] valid=10s;" >"$runtime/resolver.conf.new" ;;
  *) echo "resolver $ns valid=10s ipv6=off;" >"$runtime/resolver.conf.new" ;;
esac
# only the OPS_UI_* names are substituted: nginx's own $variables stay as they are
envsubst '${OPS_UI_PROXY_RUNTIME} ${OPS_UI_OPERATOR_UPSTREAM} ${OPS_UI_VIEWER_UPSTREAM} ${OPS_UI_PROXY_LISTEN} ${OPS_UI_PROXY_HEALTH_LISTEN} ${OPS_UI_PROXY_USER}' \
  <"$template" >"$runtime/nginx.conf.new"
for f in users.htpasswd operators.map resolver.conf nginx.conf; do mv -f "$runtime/$f.new" "$runtime/$f"; done
# nginx's workers read the users file on every request: readable by their group, by no one else
if [ "$(id -u)" = 0 ] && id "$OPS_UI_PROXY_USER" >/dev/null 2>&1; then
  chgrp "$(id -gn "$OPS_UI_PROXY_USER")" "$runtime" "$runtime/users.htpasswd"
  chmod 0750 "$runtime"
  chmod 0640 "$runtime/users.htpasswd"
fi

"$nginx_bin" -e stderr -q -t -c "$runtime/nginx.conf" || die "nginx rejected $runtime/nginx.conf"
echo "ui_proxy: $(printf '%s\n' "$operators" | grep -c .) operator(s), $(printf '%s\n' "$viewers" | grep -c .) viewer(s); operators -> $OPS_UI_OPERATOR_UPSTREAM, viewers -> $OPS_UI_VIEWER_UPSTREAM" >&2
if [ "${1:-}" = render ]; then
  echo "$runtime/nginx.conf"
  exit 0
fi
exec "$nginx_bin" -e stderr -c "$runtime/nginx.conf" -g 'daemon off;' "$@"
