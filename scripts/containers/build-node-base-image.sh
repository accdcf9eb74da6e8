#!/usr/bin/env bash
# Build a small local Node.js base image that stands in for node:20-alpine when no
# registry can be reached. It is assembled from this host's files (no pull):
#   - the host's node binary (+ the shared libraries ldd lists) at /usr/local/bin/node
#   - the host's npm (and corepack) under /usr/local/lib/node_modules, with npm/npx links
#   - Debian's busybox as /bin/sh and the usual coreutils/applets (env, tar, wget, ...)
#   - CA certificates, /etc/passwd + /etc/group with user/group `node` (1000:1000,
#     home /home/node), /tmp and /var/tmp with mode 1777
#   - ENTRYPOINT docker-entrypoint.sh + CMD ["node"], like the official node images
#
# usage: scripts/containers/build-node-base-image.sh [--force] [--tag REF] [--also-tag REF]...
#   --tag REF       image reference (default: localhost/ops-pipeline/node:20)
#   --also-tag REF  extra tag(s), e.g. docker.io/library/node:20-alpine so that an unmodified
#                   `FROM node:20-alpine` resolves to this image locally (opt-in: the image is
#                   glibc/Debian-based, not Alpine)
#   --force         rebuild even if the image exists and was built from the same recipe
#                   (this script, node-base/*, the host's node/npm); otherwise it is skipped
# Uses the podman CLI directly (same storage as the API service; the service need not run).
set -euo pipefail
# shellcheck source=lib.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"

TAG="localhost/ops-pipeline/node:20"
ALSO_TAGS=()
FORCE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --force) FORCE=1; shift;;
    --tag) TAG="${2:?--tag needs a value}"; shift 2;;
    --also-tag) ALSO_TAGS+=("${2:?--also-tag needs a value}"); shift 2;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0;;
    *) die "unknown argument: $1 (see --help)";;
  esac
done
require_root
command -v podman >/dev/null || die "podman missing: run scripts/containers/setup-engine.sh first"

NODE_BIN="$(readlink -f "$(command -v node || true)")"
[ -x "$NODE_BIN" ] || die "no node binary on this host"
NODE_VERSION="$("$NODE_BIN" -p 'process.versions.node')"
NPM_CLI="$(readlink -f "$(command -v npm || true)")"
[ -f "$NPM_CLI" ] || die "no npm on this host"
NPM_DIR="$(cd "$(dirname "$NPM_CLI")/.." && pwd)"           # .../node_modules/npm
[ -f "$NPM_DIR/package.json" ] || die "cannot locate npm's package dir from $NPM_CLI"
NPM_VERSION="$("$NODE_BIN" -p "require('$NPM_DIR/package.json').version")"
COREPACK_DIR="$(dirname "$NPM_DIR")/corepack"

# Fingerprint of everything that goes into the image: rebuild when it changes.
RECIPE="$( { cat "$0" "$CONTAINERS_SCRIPTS_DIR"/node-base/*; echo "$NODE_BIN $NODE_VERSION $NPM_VERSION";
            sha256sum "$NODE_BIN" | cut -d' ' -f1; } | sha256sum | cut -c1-16)"

tag_extra() {
  local t
  for t in "${ALSO_TAGS[@]+"${ALSO_TAGS[@]}"}"; do podman tag "$TAG" "$t"; log "tagged $t"; done
}

if [ "$FORCE" = 0 ] && podman image exists "$TAG"; then
  have="$(podman image inspect -f '{{ index .Config.Labels "ops-pipeline.recipe" }}' "$TAG" 2>/dev/null || true)"
  if [ "$have" = "$RECIPE" ]; then
    log "$TAG already exists (node $NODE_VERSION, recipe $RECIPE); skipping (use --force to rebuild)"
    tag_extra
    exit 0
  fi
  log "$TAG exists but from another recipe/node (${have:-none} != $RECIPE): rebuilding"
fi

# busybox: /bin/sh + coreutils. Deliberately Debian's regular (dynamically linked) build,
# not busybox-static: the static build's ash runs its own applets in preference to PATH
# (so no wrapper in /usr/local/bin could ever be reached from `sh -c`), and the glibc
# libraries it needs are in the image anyway for node. If the `busybox` package is not
# installed on the host, its .deb is fetched with `apt-get download` (no install) into
# $BUSYBOX_CACHE and unpacked in the work dir.
BUSYBOX_CACHE="${OPS_CONTAINERS_CACHE:-/var/cache/ops-pipeline}"
busybox_deb() {
  local deb
  mkdir -p "$BUSYBOX_CACHE"
  deb="$(find "$BUSYBOX_CACHE" -maxdepth 1 -name 'busybox_*.deb' | sort | tail -n 1)"
  if [ -z "$deb" ]; then
    log "fetching the busybox .deb into $BUSYBOX_CACHE (apt-get download, not installed)"
    if ! (cd "$BUSYBOX_CACHE" && apt-get download -q busybox >&2 2>/dev/null); then
      wait_for_apt; apt-get update -q -o DPkg::Lock::Timeout=900 >&2
      (cd "$BUSYBOX_CACHE" && apt-get download -q busybox >&2)
    fi
    deb="$(find "$BUSYBOX_CACHE" -maxdepth 1 -name 'busybox_*.deb' | sort | tail -n 1)"
    [ -n "$deb" ] || die "could not download the busybox package"
  fi
  echo "$deb"
}

t0="$(now_ms)"
WORK="$(mktemp -d /tmp/ops-node-base.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
R="$WORK/rootfs"
log "assembling rootfs in $R (node $NODE_VERSION from $NODE_BIN, npm $NPM_VERSION)"
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,usr/local/bin,usr/local/sbin,usr/local/lib/node_modules,etc/ssl/certs,root,home/node,tmp,var/tmp,dev,proc,sys,run}

# busybox + one symlink per applet (bin/sh, usr/bin/env, ...)
if dpkg-query -W -f='${Status}' busybox 2>/dev/null | grep -q 'install ok installed'; then
  BUSYBOX=/bin/busybox
else
  dpkg-deb -x "$(busybox_deb)" "$WORK/busybox-deb"
  BUSYBOX="$WORK/busybox-deb/bin/busybox"
fi
[ -x "$BUSYBOX" ] || die "no busybox binary"
cp "$BUSYBOX" "$R/bin/busybox"
while read -r applet; do
  if [ -n "$applet" ] && [ ! -e "$R/$applet" ] && [ ! -L "$R/$applet" ]; then
    ln -s /bin/busybox "$R/$applet"
  fi
done < <("$BUSYBOX" --list-full)

# node + the shared libraries of node and busybox (at the paths the loader searches)
cp "$NODE_BIN" "$R/usr/local/bin/node"
command -v strip >/dev/null && strip --strip-debug "$R/usr/local/bin/node" 2>/dev/null || true
ldd "$NODE_BIN" "$BUSYBOX" | awk '/=> \//{print $3} /^[[:space:]]*\/[^ ]*ld-linux/{print $1}' | sort -u | while read -r lib; do
  mkdir -p "$R$(dirname "$lib")"
  cp -L "$lib" "$R$lib"
done
# libs that glibc may dlopen at run time (name service, DNS)
for extra in libnss_files.so.2 libnss_dns.so.2 libresolv.so.2; do
  for d in /lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu; do
    if [ -e "$d/$extra" ] && [ ! -e "$R$d/$extra" ]; then mkdir -p "$R$d"; cp -L "$d/$extra" "$R$d/$extra"; break; fi
  done
done

# npm, npx, corepack
cp -a "$NPM_DIR" "$R/usr/local/lib/node_modules/npm"
ln -s ../lib/node_modules/npm/bin/npm-cli.js "$R/usr/local/bin/npm"
ln -s ../lib/node_modules/npm/bin/npx-cli.js "$R/usr/local/bin/npx"
if [ -f "$COREPACK_DIR/dist/corepack.js" ]; then
  cp -a "$COREPACK_DIR" "$R/usr/local/lib/node_modules/corepack"
  ln -s ../lib/node_modules/corepack/dist/corepack.js "$R/usr/local/bin/corepack"
fi

# CA certificates: the HOST's bundle, including any local CA (this sandbox's egress proxy
# re-signs TLS with its own CA; node's built-in store alone fails with
# SELF_SIGNED_CERT_IN_CHAIN). NODE_EXTRA_CA_CERTS (set below) makes node and npm use it.
[ -f /etc/ssl/certs/ca-certificates.crt ] || die "no /etc/ssl/certs/ca-certificates.crt (install ca-certificates)"
cp -L /etc/ssl/certs/ca-certificates.crt "$R/etc/ssl/certs/ca-certificates.crt"
ln -s certs/ca-certificates.crt "$R/etc/ssl/cert.pem"

# users, groups, name service
cat >"$R/etc/passwd" <<'P'
root:x:0:0:root:/root:/bin/sh
node:x:1000:1000:Linux User,,,:/home/node:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
P
cat >"$R/etc/group" <<'G'
root:x:0:root
node:x:1000:node
nogroup:x:65534:
G
cat >"$R/etc/shadow" <<'S'
root:*:19000:0:99999:7:::
node:!:19000:0:99999:7:::
nobody:*:19000:0:99999:7:::
S
echo 'hosts: files dns' >"$R/etc/nsswitch.conf"
printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$R/etc/hosts"
cat >"$R/etc/os-release" <<O
NAME="ops-pipeline node base"
ID=ops-pipeline-node
PRETTY_NAME="ops-pipeline node $NODE_VERSION (busybox + host glibc)"
VERSION_ID=$NODE_VERSION
O

# entrypoint with the official node images' behaviour: run `node ARGS` when the first
# argument is an option or not a command.
install -m 0755 "$CONTAINERS_SCRIPTS_DIR/node-base/docker-entrypoint.sh" "$R/usr/local/bin/docker-entrypoint.sh"

# Debian's busybox 1.35 `wget -T SECONDS` segfaults (exit 139, on the host too), and it
# does not know --timeout. HEALTHCHECKs like `wget -q --spider -T 2 http://localhost:3000/`
# are common in node:*-alpine Dockerfiles, so /usr/local/bin/wget (first in PATH) turns
# -T N / --timeout=N into `timeout N busybox wget ...`.
install -m 0755 "$CONTAINERS_SCRIPTS_DIR/node-base/wget" "$R/usr/local/bin/wget"

# Alpine-style account tools (`addgroup -S app && adduser -S -G app app`, common in
# node:*-alpine Dockerfiles): Debian's busybox has no adduser/addgroup applets, so small
# sh implementations of the usual options go to /usr/sbin.
install -m 0755 "$CONTAINERS_SCRIPTS_DIR/node-base/adduser" "$R/usr/sbin/adduser"
install -m 0755 "$CONTAINERS_SCRIPTS_DIR/node-base/addgroup" "$R/usr/sbin/addgroup"

chmod 1777 "$R/tmp" "$R/var/tmp"
chmod 0700 "$R/root"
chown 1000:1000 "$R/home/node"
chown 0:0 "$R"
chmod 0755 "$R"

tar --numeric-owner -C "$R" -cf "$WORK/rootfs.tar" .
cat >"$WORK/Dockerfile" <<D
FROM scratch
ADD rootfs.tar /
ENV NODE_VERSION=$NODE_VERSION \\
    NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt \\
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
LABEL org.opencontainers.image.title="ops-pipeline node base" \\
      org.opencontainers.image.description="node $NODE_VERSION + npm $NPM_VERSION + busybox, assembled from host files; stand-in for node:20-alpine" \\
      ops-pipeline.node-version="$NODE_VERSION" \\
      ops-pipeline.recipe="$RECIPE" \\
      ops-pipeline.npm-version="$NPM_VERSION"
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["node"]
D
printf '*\n!rootfs.tar\n' >"$WORK/.dockerignore"
log "rootfs: $(du -sh "$R" | cut -f1); building $TAG"

old_id="$(podman image inspect -f '{{.Id}}' "$TAG" 2>/dev/null || true)"
# --format docker keeps Docker-only config (HEALTHCHECK, ...) in images built FROM this one.
podman build -q --layers=false --format docker --network none --pull=never -t "$TAG" -f "$WORK/Dockerfile" "$WORK" >/dev/null
new_id="$(podman image inspect -f '{{.Id}}' "$TAG")"
if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ]; then
  podman rmi "$old_id" >/dev/null 2>&1 || true   # only succeeds when nothing else uses it
fi
tag_extra

# self-check of the result (no network): node/npm/npx, users, /tmp, wget wrapper, adduser
podman run --rm --network none "$TAG" sh -ec '
  node --version; npm --version >/dev/null; npx --version >/dev/null
  id node; test -w /tmp; test -d /home/node
  node -e "require(\"http\").createServer((q, s) => s.end(\"ok\")).listen(3999)" & sleep 0.5
  wget -q -O- -T 2 http://localhost:3999/ | grep -q ok
  addgroup -S app && adduser -S -G app app && id app >/dev/null
  kill $!' >&2 || die "built image $TAG fails its self-check"
size="$(podman image inspect -f '{{.Size}}' "$TAG")"
log "built $TAG (id ${new_id:0:12}, $((size / 1024 / 1024)) MiB) in $(( $(now_ms) - t0 )) ms"
