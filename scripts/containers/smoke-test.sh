#!/usr/bin/env bash
# End-to-end proof of the container test environment (Podman behind DOCKER_HOST).
#
# usage: scripts/containers/smoke-test.sh [--keep] [--rebuild-base] [STATE_DIR]
#   --keep          leave the engine/registry running at the end (they are otherwise
#                   stopped, but only if this script started them)
#   --rebuild-base  rebuild the node base image even if it exists
#
# Steps (each prints PASS/FAIL lines; a summary with timings and "N passed, N failed" ends it):
#   0. setup-engine.sh, build-node-base-image.sh, start-registry.sh
#   a. docker CLI: build a multi-stage Node app (`npm ci` from the npm registry inside the
#      build) with --build-arg BASE_IMAGE=localhost/ops-pipeline/node:20
#   b. docker CLI: run it on 127.0.0.1:<port>, wait for State.Health.Status == healthy
#   c. docker CLI: user-defined bridge network, two containers reach each other by name
#   d. docker CLI: push to 127.0.0.1:5000, remove locally, pull by digest, run
#   a-d again with the Python docker SDK (smoke_docker_sdk.py)
#   e. host nginx as least_conn load balancer over app containers on loopback ports,
#      `nginx -s reload` with a changed upstream under a request loop; failures counted
# Everything created is labelled ops-pipeline.smoke=1 and removed on exit.
set -euo pipefail
# shellcheck source=lib.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"

KEEP=0
REBUILD=()
while [ $# -gt 0 ]; do
  case "$1" in
    --keep) KEEP=1; shift;;
    --rebuild-base) REBUILD=(--force); shift;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0;;
    *) break;;
  esac
done
STATE_DIR="${1:-$CONTAINERS_DEFAULT_STATE_DIR}"
require_root
mkdir -p "$STATE_DIR"
STATE_DIR="$(cd "$STATE_DIR" && pwd)"
D="$CONTAINERS_SCRIPTS_DIR"
BASE_IMAGE="${OPS_NODE_BASE_IMAGE:-localhost/ops-pipeline/node:20}"
REGISTRY=127.0.0.1:5000
LABEL=ops-pipeline.smoke=1
CLI_TAG=localhost/ops-smoke-app:cli
NGINX_DIR="$STATE_DIR/smoke-nginx"

PASSED=0; FAILED=0; TIMINGS=()
pass() { PASSED=$((PASSED + 1)); echo "PASS $*"; }
fail() { FAILED=$((FAILED + 1)); echo "FAIL $*"; }
chk()  { local name="$1"; shift; if "$@" >/dev/null; then pass "$name"; else fail "$name"; fi; }
timing() { TIMINGS+=("$1=$2"); echo "TIMING $1=$2"; }
secs_since() { awk -v a="$1" -v b="$(now_ms)" 'BEGIN{printf "%.1f", (b-a)/1000}'; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

SMOKE_START_EPOCH="$(date +%s)"
ENGINE_WAS_UP=0; REGISTRY_WAS_UP=0
curl -fsS -m 3 --unix-socket "$STATE_DIR/podman.sock" http://d/_ping >/dev/null 2>&1 && ENGINE_WAS_UP=1
curl -fsS -m 3 -o /dev/null "http://$REGISTRY/v2/" 2>/dev/null && REGISTRY_WAS_UP=1
APP_DIR=""

cleanup() {
  set +e
  echo "--- cleanup"
  if [ -f "$NGINX_DIR/nginx.pid" ]; then nginx -c "$NGINX_DIR/nginx.conf" -s quit 2>/dev/null; sleep 0.5; fi
  if [ -n "${DOCKER_HOST:-}" ]; then
    ids="$(docker ps -aq --filter "label=$LABEL" 2>/dev/null)"
    # shellcheck disable=SC2086  # word splitting of the id list is intended
    [ -n "$ids" ] && docker rm -f $ids >/dev/null 2>&1
    docker network rm ops-smoke-cli-net >/dev/null 2>&1
    for img in "$CLI_TAG" "$REGISTRY/ops-smoke/app:cli" ${PULLED_REF:+"$PULLED_REF"}; do
      docker rmi -f "$img" >/dev/null 2>&1
    done
  fi
  # intermediate (dangling) images left by this run's builds: only those created after the
  # run started; `podman rmi` without -f refuses images that something still uses.
  if command -v podman >/dev/null; then
    for _ in 1 2 3 4 5 6; do
      ids="$(podman images --filter dangling=true --format json 2>/dev/null | python3 -c '
import json, sys
print(" ".join(i["Id"] for i in json.load(sys.stdin) or [] if i.get("Created", 0) >= int(sys.argv[1])))' "$SMOKE_START_EPOCH")"
      [ -n "$ids" ] || break
      # shellcheck disable=SC2086
      podman rmi $ids >/dev/null 2>&1 || true
    done
  fi
  [ -n "$APP_DIR" ] && rm -rf "$APP_DIR"
  if [ "$KEEP" = 0 ]; then
    [ "$REGISTRY_WAS_UP" = 0 ] && "$D/stop-registry.sh" "$STATE_DIR"
    [ "$ENGINE_WAS_UP" = 0 ] && "$D/stop-engine.sh" "$STATE_DIR"
  fi
}
trap cleanup EXIT

echo "=== 0. engine, base image, registry"
t="$(now_ms)"; eval "$("$D/setup-engine.sh" "$STATE_DIR")"; timing engine_setup_s "$(secs_since "$t")"
export DOCKER_HOST
t="$(now_ms)"; "$D/build-node-base-image.sh" "${REBUILD[@]+"${REBUILD[@]}"}" --tag "$BASE_IMAGE"
timing base_image_s "$(secs_since "$t")"
t="$(now_ms)"; "$D/start-registry.sh" "$STATE_DIR" >/dev/null; timing registry_start_s "$(secs_since "$t")"
chk "docker CLI talks to podman ($(docker version -f '{{.Server.Version}}' 2>/dev/null))" docker version -f '{{.Server.Version}}'

# --- the app ------------------------------------------------------------------------------
APP_DIR="$(mktemp -d /tmp/ops-smoke-app.XXXXXX)"
mkdir -p "$APP_DIR/src"
cat >"$APP_DIR/package.json" <<'J'
{
  "name": "ops-smoke-app",
  "version": "1.0.0",
  "private": true,
  "scripts": { "build": "node build.js" },
  "dependencies": { "ms": "2.1.3" },
  "devDependencies": { "is-number": "7.0.0" }
}
J
cat >"$APP_DIR/src/server.js" <<'J'
const http = require('http');
const os = require('os');
const ms = require('ms');                  // real runtime dependency, installed by npm ci
const started = Date.now();
const port = Number(process.env.PORT || 3000);
http.createServer((req, res) => {
  if (req.url === '/health') { res.writeHead(200, { 'content-type': 'text/plain' }); return res.end('ok\n'); }
  res.writeHead(200, { 'content-type': 'application/json' });
  res.end(JSON.stringify({ host: os.hostname(), name: process.env.APP_NAME || '', uptime: ms(Date.now() - started) }) + '\n');
}).listen(port, () => console.log(`listening on ${port}`));
process.on('SIGTERM', () => process.exit(0));
J
cat >"$APP_DIR/build.js" <<'J'
const fs = require('fs');
const isNumber = require('is-number');     // devDependency: only present in the builder stage
if (!isNumber(42)) throw new Error('is-number broken');
fs.mkdirSync('dist', { recursive: true });
fs.copyFileSync('src/server.js', 'dist/server.js');
console.log('built dist/server.js');
J
printf 'node_modules\ndist\n' >"$APP_DIR/.dockerignore"
cat >"$APP_DIR/Dockerfile" <<'J'
ARG BASE_IMAGE=node:20-alpine
FROM ${BASE_IMAGE} AS builder
WORKDIR /app
COPY package*.json ./
RUN npm ci
COPY . .
RUN npm run build
FROM ${BASE_IMAGE}
WORKDIR /app
COPY package*.json ./
RUN npm ci --omit=dev
COPY --from=builder /app/dist ./dist
HEALTHCHECK --interval=5s --timeout=3s --start-period=5s --retries=3 CMD node -e "require('http').get('http://localhost:3000/health', (r) => process.exit(r.statusCode === 200 ? 0 : 1))"
USER node
EXPOSE 3000
CMD ["node", "dist/server.js"]
J
(cd "$APP_DIR" && npm install --package-lock-only --no-audit --no-fund --loglevel=error >/dev/null)
chk "package-lock.json generated" test -s "$APP_DIR/package-lock.json"

echo "=== a. docker CLI build (npm ci inside the build reaches the npm registry)"
t="$(now_ms)"
if docker build --no-cache --label "$LABEL" --build-arg "BASE_IMAGE=$BASE_IMAGE" -t "$CLI_TAG" "$APP_DIR" >"$STATE_DIR/smoke-build.log" 2>&1; then
  pass "docker build (multi-stage, npm ci, npm run build, npm ci --omit=dev)"
else
  tail -n 30 "$STATE_DIR/smoke-build.log"; fail "docker build"; exit 1
fi
timing cli_app_build_nocache_s "$(secs_since "$t")"
chk "npm ci installed packages during the build" grep -q 'added [0-9]* package' "$STATE_DIR/smoke-build.log"
# The compat API's image inspect shows Config.Healthcheck=null (podman 4.3), but the image
# has it and containers get it; podman's own inspect shows it.
chk "image keeps HEALTHCHECK (podman image inspect .HealthCheck)" \
  sh -c "podman image inspect -f '{{json .HealthCheck}}' '$CLI_TAG' | grep -q CMD-SHELL"
t="$(now_ms)"; docker build --label "$LABEL" --build-arg "BASE_IMAGE=$BASE_IMAGE" -t "$CLI_TAG" "$APP_DIR" >/dev/null 2>&1
timing cli_app_build_cached_s "$(secs_since "$t")"

echo "=== b. docker CLI run + published port + healthcheck"
wait_health() {   # NAME WANT TIMEOUT_S -> prints seconds taken
  local name="$1" want="$2" limit="$3" t0 s
  t0="$(now_ms)"
  while :; do
    s="$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$name" 2>/dev/null || true)"
    [ "$s" = "$want" ] && { secs_since "$t0"; return 0; }
    [ "$(( ($(now_ms) - t0) / 1000 ))" -ge "$limit" ] && { echo "timeout (last: ${s:-none})"; return 1; }
    sleep 0.5
  done
}
wait_http() { local _; for _ in $(seq 1 60); do curl -fsS -m 2 "$1" 2>/dev/null && return 0; sleep 0.25; done; return 1; }
P1="$(free_port)"
docker run -d --name ops-smoke-cli-app -l "$LABEL" -p "127.0.0.1:$P1:3000" "$CLI_TAG" >/dev/null
chk "GET http://127.0.0.1:$P1/ answers" wait_http "http://127.0.0.1:$P1/"
if hs="$(wait_health ops-smoke-cli-app healthy 40)"; then pass "State.Health.Status=healthy after ${hs}s"; else fail "healthy: $hs"; fi
docker inspect -f 'health: {{json .State.Health}}' ops-smoke-cli-app | cut -c1-220
chk "podman ps shows (healthy)" sh -c "podman ps --filter name=ops-smoke-cli-app --format '{{.Status}}' | grep -q healthy"

echo "=== c. docker CLI user-defined bridge network + name resolution (aardvark-dns)"
docker network create --label "$LABEL" ops-smoke-cli-net >/dev/null
docker run -d --name ops-smoke-cli-n1 -l "$LABEL" --network ops-smoke-cli-net -e APP_NAME=n1 "$CLI_TAG" >/dev/null
docker run -d --name ops-smoke-cli-n2 -l "$LABEL" --network ops-smoke-cli-net -e APP_NAME=n2 "$CLI_TAG" >/dev/null
reach() { local _; for _ in $(seq 1 40); do docker exec "$1" wget -q -O- -T 3 "http://$2:3000/" 2>/dev/null | grep -q "\"name\":\"$3\"" && return 0; sleep 0.25; done; return 1; }
chk "n1 -> http://ops-smoke-cli-n2:3000/ by name" reach ops-smoke-cli-n1 ops-smoke-cli-n2 n2
chk "n2 -> http://ops-smoke-cli-n1:3000/ by name" reach ops-smoke-cli-n2 ops-smoke-cli-n1 n1
chk "the default network (no name resolution) cannot resolve n2" \
  sh -c "! docker exec ops-smoke-cli-app wget -q -O- -T 2 http://ops-smoke-cli-n2:3000/ >/dev/null 2>&1"

echo "=== d. docker CLI push to $REGISTRY, remove, pull by digest, run"
REPO="$REGISTRY/ops-smoke/app"
docker tag "$CLI_TAG" "$REPO:cli"
t="$(now_ms)"
if push_out="$(docker push "$REPO:cli" 2>&1)"; then pass "docker push $REPO:cli"; else echo "$push_out"; fail "docker push"; fi
timing cli_push_s "$(secs_since "$t")"
DIGEST="$(printf '%s\n' "$push_out" | grep -o 'sha256:[0-9a-f]\{64\}' | tail -n 1)"
reg_digest="$(curl -fsSI -H 'Accept: application/vnd.docker.distribution.manifest.v2+json' \
  -H 'Accept: application/vnd.oci.image.manifest.v1+json' "http://$REGISTRY/v2/ops-smoke/app/manifests/cli" \
  | tr -d '\r' | awk -F': ' 'tolower($1)=="docker-content-digest"{print $2}')"
chk "push digest ($DIGEST) equals the registry's manifest digest" test -n "$DIGEST" -a "$DIGEST" = "$reg_digest"
IMG_ID="$(docker image inspect -f '{{.Id}}' "$CLI_TAG")"
docker rm -f ops-smoke-cli-app >/dev/null
docker rmi -f "$IMG_ID" >/dev/null 2>&1 || true
chk "image removed locally" sh -c "! podman image exists '$IMG_ID'"
PULLED_REF="$REPO@$DIGEST"
log_lines="$(wc -l <"$STATE_DIR/registry.log")"
t="$(now_ms)"
chk "docker pull $PULLED_REF" sh -c "docker pull '$PULLED_REF' >/dev/null"
timing cli_pull_by_digest_s "$(secs_since "$t")"
chk "registry served manifest $DIGEST for that pull" \
  sh -c "tail -n +$((log_lines + 1)) '$STATE_DIR/registry.log' | grep -q 'GET /v2/ops-smoke/app/manifests/$DIGEST'"
P2="$(free_port)"
docker run -d --name ops-smoke-cli-pulled -l "$LABEL" -p "127.0.0.1:$P2:3000" "$PULLED_REF" >/dev/null
chk "container from $REPO@sha256:... answers" wait_http "http://127.0.0.1:$P2/"
if hs="$(wait_health ops-smoke-cli-pulled healthy 40)"; then pass "pulled-image container healthy after ${hs}s"; else fail "pulled healthy: $hs"; fi

echo "=== a-d with the Python docker SDK"
PY="${OPS_SMOKE_PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x "$CONTAINERS_REPO_ROOT/.venv/bin/python" ] && "$CONTAINERS_REPO_ROOT/.venv/bin/python" -c 'import docker' 2>/dev/null; then
    PY="$CONTAINERS_REPO_ROOT/.venv/bin/python"
  else
    PY=/tmp/ops-containers-venv/bin/python
    if ! "$PY" -c 'import docker' 2>/dev/null; then
      log "creating /tmp/ops-containers-venv with the docker SDK"
      python3 -m venv /tmp/ops-containers-venv && /tmp/ops-containers-venv/bin/pip install -q docker
    fi
  fi
fi
sdk_out="$("$PY" "$D/smoke_docker_sdk.py" --app-dir "$APP_DIR" --base-image "$BASE_IMAGE" --registry "$REGISTRY" 2>&1)" || true
printf '%s\n' "$sdk_out" | grep -v '^TIMING'
PASSED=$((PASSED + $(printf '%s\n' "$sdk_out" | grep -c '^PASS' || true)))
FAILED=$((FAILED + $(printf '%s\n' "$sdk_out" | grep -c '^FAIL' || true)))
grep -q 'passed, 0 failed' <<<"$sdk_out" || { grep -q '^FAIL' <<<"$sdk_out" || fail "sdk script did not finish"; }
while read -r k v; do timing "$k" "$v"; done < <(printf '%s\n' "$sdk_out" | sed -n 's/^TIMING \([a-z_]*\)=\(.*\)$/\1 \2/p')

echo "=== e. host nginx (least_conn) in front of app containers; graceful reload under load"
command -v nginx >/dev/null || apt_install nginx
BA="$(free_port)"; BB="$(free_port)"; BC="$(free_port)"; LB="$(free_port)"
for n in a b c; do
  p=$BA; [ $n = b ] && p=$BB; [ $n = c ] && p=$BC
  docker run -d --name "ops-smoke-lb-$n" -l "$LABEL" -e "APP_NAME=$n" -p "127.0.0.1:$p:3000" "$PULLED_REF" >/dev/null
done
for p in $BA $BB $BC; do wait_http "http://127.0.0.1:$p/health" >/dev/null || fail "backend $p not up"; done
mkdir -p "$NGINX_DIR/tmp"
chown -R nobody:nogroup "$NGINX_DIR/tmp"
upstream() { printf 'upstream app {\n  least_conn;\n'; for p in "$@"; do printf '  server 127.0.0.1:%s max_fails=1 fail_timeout=2s;\n' "$p"; done; printf '  keepalive 16;\n}\n'; }
upstream "$BA" "$BB" >"$NGINX_DIR/upstream.conf"
cat >"$NGINX_DIR/nginx.conf" <<N
# generated by scripts/containers/smoke-test.sh
user nobody nogroup;
worker_processes 2;
pid $NGINX_DIR/nginx.pid;
error_log $NGINX_DIR/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $NGINX_DIR/tmp/body;
  proxy_temp_path $NGINX_DIR/tmp/proxy;
  fastcgi_temp_path $NGINX_DIR/tmp/fastcgi;
  uwsgi_temp_path $NGINX_DIR/tmp/uwsgi;
  scgi_temp_path $NGINX_DIR/tmp/scgi;
  include $NGINX_DIR/upstream.conf;
  server {
    listen 127.0.0.1:$LB;
    location = /lb-health { return 200 "ok\n"; }
    location / {
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_next_upstream error timeout http_502 http_503;
      proxy_connect_timeout 2s;
    }
  }
}
N
chk "nginx -t" nginx -q -t -c "$NGINX_DIR/nginx.conf"
nginx -c "$NGINX_DIR/nginx.conf"
chk "nginx LB answers on 127.0.0.1:$LB" wait_http "http://127.0.0.1:$LB/lb-health"
# bounded request loop: new connection per request, 15 s, counts per backend and failures
python3 - "$LB" 15 >"$NGINX_DIR/loop.json" <<'PY' &
import http.client, json, sys, time
port, dur = int(sys.argv[1]), float(sys.argv[2])
t0 = time.monotonic(); ok = fail = 0; before = {}; after = {}; errors = []
while time.monotonic() - t0 < dur:
    el = time.monotonic() - t0
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        c.request("GET", "/"); r = c.getresponse(); body = r.read(); c.close()
        if r.status == 200:
            ok += 1
            name = json.loads(body)["name"]
            if el < 4.5:
                before[name] = before.get(name, 0) + 1
            elif el > 7.5:
                after[name] = after.get(name, 0) + 1
        else:
            fail += 1; errors.append(f"{el:.2f}s HTTP {r.status}")
    except Exception as e:
        fail += 1; errors.append(f"{el:.2f}s {type(e).__name__}: {e}")
print(json.dumps({"ok": ok, "failed": fail, "before_4.5s": before, "after_7.5s": after, "errors": errors[:10]}))
PY
LOOP_PID=$!
sleep 5
upstream "$BB" "$BC" >"$NGINX_DIR/upstream.conf"
t="$(now_ms)"
nginx -q -t -c "$NGINX_DIR/nginx.conf" && nginx -c "$NGINX_DIR/nginx.conf" -s reload
timing nginx_reload_cmd_s "$(secs_since "$t")"
echo "reloaded nginx: upstream a,b -> b,c (least_conn)"
sleep 2
docker stop -t 5 ops-smoke-lb-a >/dev/null   # drained backend goes away after the reload
echo "stopped backend a"
wait "$LOOP_PID" || true
loop="$(cat "$NGINX_DIR/loop.json")"
echo "request loop: $loop"
lf="$(python3 -c 'import json,sys; print(json.load(sys.stdin)["failed"])' <<<"$loop")"
lok="$(python3 -c 'import json,sys; print(json.load(sys.stdin)["ok"])' <<<"$loop")"
chk "no failed requests across reload + backend removal ($lok ok, $lf failed)" test "$lf" = 0 -a "$lok" -gt 0
chk "before reload only a,b served; after it only b,c" python3 -c '
import json,sys; d=json.loads(sys.argv[1])
assert set(d["before_4.5s"]) == {"a","b"}, d
assert set(d["after_7.5s"]) == {"b","c"}, d' "$loop"
# a second, heavier burst with wrk (if installed) across another reload, bounded to 6 s
if command -v wrk >/dev/null; then
  docker start ops-smoke-lb-a >/dev/null
  wait_http "http://127.0.0.1:$BA/health" >/dev/null || true
  ( sleep 3; upstream "$BA" "$BC" >"$NGINX_DIR/upstream.conf"; nginx -c "$NGINX_DIR/nginx.conf" -s reload ) &
  RELOAD2=$!
  wrk_out="$(wrk -t2 -c16 -d6s --timeout 5s "http://127.0.0.1:$LB/" 2>&1 || true)"
  wait "$RELOAD2" 2>/dev/null || true
  printf '%s\n' "$wrk_out" | sed 's/^/  wrk: /'
  # Non-2xx, connect errors and timeouts must be 0. "read" errors are the keep-alive race:
  # on reload the old workers close their idle keep-alive client connections, and a request
  # wrk had just written on such a connection gets EOF. Real clients retry idempotent
  # requests on a closed keep-alive connection; so these are reported, not failed.
  non2xx="$(printf '%s\n' "$wrk_out" | awk '/Non-2xx/{print $NF}')"
  sock="$(printf '%s\n' "$wrk_out" | sed -n 's/.*Socket errors: connect \([0-9]*\), read \([0-9]*\), write \([0-9]*\), timeout \([0-9]*\).*/\1 \2 \3 \4/p')"
  read -r e_conn e_read e_write e_to <<<"${sock:-0 0 0 0}"
  total="$(printf '%s\n' "$wrk_out" | awk '/requests in/{print $1}')"
  chk "wrk 6s, reload (b,c -> a,c) midway: ${total:-?} requests, non-2xx ${non2xx:-0}, connect ${e_conn}, timeout ${e_to}" \
    test "${non2xx:-0}" = 0 -a "$e_conn" = 0 -a "$e_to" = 0
  echo "INFO keep-alive connections closed by the reload (wrk read/write errors): $e_read/$e_write"
fi
grep -E 'emerg|alert|crit' "$NGINX_DIR/error.log" 2>/dev/null | tail -5 || true

echo "=== registry delete (storage.delete.enabled)"
chk "DELETE manifest $DIGEST -> 202" sh -c "[ \"\$(curl -s -o /dev/null -w '%{http_code}' -X DELETE http://$REGISTRY/v2/ops-smoke/app/manifests/$DIGEST)\" = 202 ]"

echo "=== summary"
for x in "${TIMINGS[@]}"; do echo "  $x"; done
echo "smoke: $PASSED passed, $FAILED failed"
[ "$FAILED" = 0 ]
