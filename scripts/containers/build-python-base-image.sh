#!/usr/bin/env bash
# Build local stand-ins for the public base images that docker-compose.yml uses, for machines where
# no registry can be reached (docker.io does not even resolve here). Nothing is pulled: the root
# file system comes from the Debian archive (debootstrap, which *is* reachable) and is turned into an
# image with `podman import`; everything else is built on top of it with `podman build`.
#
#   localhost/ops-pipeline/debian:bookworm  Debian 12 minbase rootfs (debootstrap + podman import);
#                                           the tarball is cached in $OPS_CONTAINERS_CACHE
#   localhost/ops-pipeline/python:3.11      stand-in for python:3.11-slim: Debian's python3 (3.11.2) in
#                                           a venv at /opt/python that is first in PATH, so `python`,
#                                           `pip install ...` and console scripts work as in the
#                                           official image; the HOST's CA bundle (this machine's egress
#                                           proxy re-signs TLS) with PIP_CERT/SSL_CERT_FILE/
#                                           REQUESTS_CA_BUNDLE pointing at it
#   localhost/ops-pipeline/postgres:16      stand-in for postgres:16-alpine: PostgreSQL 16.2 binaries of
#                                           the `pgserver` wheel (PyPI) + an entrypoint that honours
#                                           POSTGRES_USER/POSTGRES_PASSWORD/POSTGRES_DB/PGDATA like the
#                                           official one (initdb, scram-sha-256 over TCP, listen on *)
#   localhost/ops-pipeline/redis:7          stand-in for redis:7-alpine: Debian's redis-server 7.0 with
#                                           the official image's defaults (CMD redis-server, /data,
#                                           protected mode off, runs as user redis)
#
# usage: scripts/containers/build-python-base-image.sh [--force] [--python-only] [--also-tag-upstream]
#   --force              rebuild even when the images exist with the same recipe fingerprint
#                        (the debootstrap tarball stays cached; delete it to re-run debootstrap)
#   --python-only        build only the Debian and Python images (not postgres/redis)
#   --also-tag-upstream  also tag them python:3.11-slim, postgres:16-alpine, redis:7-alpine
#                        (docker.io/library/...), so unmodified FROM/image: lines resolve to them
#                        locally. Opt-in: they are Debian/glibc stand-ins, not the real images.
# Idempotent: every image carries the label ops-pipeline.recipe (a hash of this script, the host CA
# bundle and the pgserver version); when all of them exist with the current recipe the script does
# nothing (~0.3 s). Uses the podman CLI directly (same storage as the API service). Needs root.
# Environment: OPS_CONTAINERS_CACHE (default /var/cache/ops-pipeline), DEBIAN_MIRROR (default
# http://deb.debian.org/debian), PGSERVER_VERSION (default: the pin in pyproject.toml, else 0.1.4).
set -euo pipefail
# shellcheck source=lib.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"

FORCE=0
PYTHON_ONLY=0
UPSTREAM_TAGS=0
while [ $# -gt 0 ]; do
  case "$1" in
    --force) FORCE=1; shift;;
    --python-only) PYTHON_ONLY=1; shift;;
    --also-tag-upstream) UPSTREAM_TAGS=1; shift;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0;;
    *) die "unknown argument: $1 (see --help)";;
  esac
done
require_root
command -v podman >/dev/null || die "podman missing: run scripts/containers/setup-engine.sh first"

DEBIAN_TAG="localhost/ops-pipeline/debian:bookworm"
PYTHON_TAG="localhost/ops-pipeline/python:3.11"
POSTGRES_TAG="localhost/ops-pipeline/postgres:16"
REDIS_TAG="localhost/ops-pipeline/redis:7"
SUITE=bookworm
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
CACHE="${OPS_CONTAINERS_CACHE:-/var/cache/ops-pipeline}"
HOST_CA=/etc/ssl/certs/ca-certificates.crt
[ -f "$HOST_CA" ] || die "no $HOST_CA on this host (install ca-certificates)"
if [ -z "${PGSERVER_VERSION:-}" ]; then
  PGSERVER_VERSION="$(sed -n 's/^ *"pgserver==\([0-9.]*\)".*/\1/p' "$CONTAINERS_REPO_ROOT/pyproject.toml" 2>/dev/null | head -n 1)"
  PGSERVER_VERSION="${PGSERVER_VERSION:-0.1.4}"
fi

# What goes into the debootstrap tarball (changing it re-runs debootstrap, ~2 min).
ROOTFS_RECIPE="$(printf 'debootstrap --variant=minbase %s %s v1' "$SUITE" "$MIRROR" | sha256sum | cut -c1-12)"
ROOTFS_TAR="$CACHE/debian-$SUITE-minbase-$ROOTFS_RECIPE.tar"
# Everything else: this script (which holds the Dockerfiles and entrypoints), the host CA bundle, pgserver.
RECIPE="$( { cat "$0"; sha256sum "$HOST_CA" | cut -d' ' -f1; echo "$ROOTFS_RECIPE pgserver==$PGSERVER_VERSION"; } \
            | sha256sum | cut -c1-16)"

recipe_of() { podman image inspect -f '{{ index .Config.Labels "ops-pipeline.recipe" }}' "$1" 2>/dev/null || true; }
up_to_date() { [ "$FORCE" = 0 ] && [ "$(recipe_of "$1")" = "$RECIPE" ]; }
tag_upstream() {  # $1 local tag, $2 upstream name
  [ "$UPSTREAM_TAGS" = 1 ] || return 0
  podman tag "$1" "docker.io/library/$2"
  log "tagged $1 as docker.io/library/$2"
}
all_up_to_date() {
  up_to_date "$DEBIAN_TAG" && up_to_date "$PYTHON_TAG" || return 1
  [ "$PYTHON_ONLY" = 1 ] || { up_to_date "$POSTGRES_TAG" && up_to_date "$REDIS_TAG"; }
}
if all_up_to_date; then
  log "images are up to date (recipe $RECIPE): $DEBIAN_TAG $PYTHON_TAG$([ "$PYTHON_ONLY" = 1 ] || echo " $POSTGRES_TAG $REDIS_TAG"); skipping (use --force to rebuild)"
  tag_upstream "$PYTHON_TAG" python:3.11-slim
  if [ "$PYTHON_ONLY" = 0 ]; then tag_upstream "$POSTGRES_TAG" postgres:16-alpine; tag_upstream "$REDIS_TAG" redis:7-alpine; fi
  exit 0
fi

t0="$(now_ms)"
WORK="$(mktemp -d /tmp/ops-python-base.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT

build() {  # build TAG CONTEXT_DIR [extra podman build args...]
  local tag="$1" ctx="$2" old_id new_id t1
  shift 2
  t1="$(now_ms)"
  old_id="$(podman image inspect -f '{{.Id}}' "$tag" 2>/dev/null || true)"
  # --format docker keeps HEALTHCHECK & co. in images built FROM these; --pull=never: nothing is pulled;
  # --layers=false: no intermediate images (stage and layer caches) are left behind by rebuilds.
  if ! podman build -q --layers=false --format docker --pull=never --label "ops-pipeline.recipe=$RECIPE" "$@" -t "$tag" "$ctx" \
       >"$WORK/build.log" 2>&1; then
    tail -n 40 "$WORK/build.log" >&2
    die "podman build of $tag failed"
  fi
  new_id="$(podman image inspect -f '{{.Id}}' "$tag")"
  if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ]; then podman rmi "$old_id" >/dev/null 2>&1 || true; fi
  log "built $tag (id ${new_id:0:12}, $(( $(podman image inspect -f '{{.Size}}' "$tag") / 1024 / 1024 )) MiB) in $(( $(now_ms) - t1 )) ms"
}

# --- 1. Debian rootfs (debootstrap, cached) -> localhost/ops-pipeline/debian:bookworm --------------------
if ! up_to_date "$DEBIAN_TAG"; then
  if [ ! -s "$ROOTFS_TAR" ]; then
    command -v debootstrap >/dev/null || apt_install debootstrap
    mkdir -p "$CACHE"
    R="$WORK/rootfs"
    log "debootstrap --variant=minbase $SUITE from $MIRROR (takes ~2 min; cached as $ROOTFS_TAR)"
    t1="$(now_ms)"
    if ! debootstrap --variant=minbase "$SUITE" "$R" "$MIRROR" >"$WORK/debootstrap.log" 2>&1; then
      tail -n 30 "$WORK/debootstrap.log" >&2
      die "debootstrap failed (log above)"
    fi
    # Same sources as an official debian:bookworm image (updates + security), no caches, no host identity.
    rm -f "$R/etc/apt/sources.list"
    cat >"$R/etc/apt/sources.list.d/debian.sources" <<SRC
Types: deb
URIs: $MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${MIRROR%/debian}/debian-security
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    # like the official images: no recommends, no docs/man pages, no apt caches
    printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' >"$R/etc/apt/apt.conf.d/90ops-no-recommends"
    cat >"$R/etc/dpkg/dpkg.cfg.d/90ops-excludes" <<'EXC'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EXC
    rm -rf "$R"/var/cache/apt/archives/*.deb "$R"/var/lib/apt/lists/* "$R"/var/log/* "$R"/tmp/* \
           "$R"/usr/share/doc/* "$R"/usr/share/man/* "$R"/usr/share/info/*
    : >"$R/etc/resolv.conf"; : >"$R/etc/hostname"
    tar --numeric-owner -C "$R" -cf "$ROOTFS_TAR.part" .
    mv "$ROOTFS_TAR.part" "$ROOTFS_TAR"
    rm -rf "$R"
    log "rootfs tarball $(du -h "$ROOTFS_TAR" | cut -f1) in $(( $(now_ms) - t1 )) ms"
  else
    log "using the cached rootfs $ROOTFS_TAR"
  fi
  old_id="$(podman image inspect -f '{{.Id}}' "$DEBIAN_TAG" 2>/dev/null || true)"
  podman import -q \
    --change "LABEL ops-pipeline.recipe=$RECIPE" \
    --change 'LABEL org.opencontainers.image.description="Debian 12 minbase (debootstrap), ops-pipeline local base"' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["bash"]' \
    "$ROOTFS_TAR" "$DEBIAN_TAG" >/dev/null
  new_id="$(podman image inspect -f '{{.Id}}' "$DEBIAN_TAG")"
  if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ]; then podman rmi "$old_id" >/dev/null 2>&1 || true; fi
  log "imported $DEBIAN_TAG (id ${new_id:0:12})"
fi

# --- 2. Python 3.11 (stand-in for python:3.11-slim) -----------------------------------------------------
mkdir -p "$WORK/python"
cp -L "$HOST_CA" "$WORK/python/ca-certificates.crt"
cat >"$WORK/python/Dockerfile" <<D
FROM $DEBIAN_TAG
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update -q \\
 && apt-get install -y -q --no-install-recommends python3 python3-venv ca-certificates \\
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
# The HOST's CA bundle: this machine's egress proxy re-signs TLS with its own CA (pip fails without it).
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
# pip installs into this venv (Debian's own python3 is "externally managed", PEP 668), like the
# official image's /usr/local: python, pip and installed console scripts are first in PATH. pip and
# setuptools are upgraded from PyPI as in the official image (Debian's pip 23.0.1 backtracks for
# many minutes over this project's dependency tree; current pip resolves it at once).
RUN PIP_CERT=/etc/ssl/certs/ca-certificates.crt python3 -m venv --upgrade-deps /opt/python \\
 && ln -s /opt/python/bin/python /usr/local/bin/python && /opt/python/bin/pip --version
ENV VIRTUAL_ENV=/opt/python \\
    PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    LANG=C.UTF-8 \\
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \\
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \\
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt \\
    PIP_DISABLE_PIP_VERSION_CHECK=1 \\
    PIP_NO_CACHE_DIR=1
LABEL org.opencontainers.image.title="ops-pipeline python base" \\
      org.opencontainers.image.description="Debian 12 python3 3.11 in /opt/python; local stand-in for python:3.11-slim"
CMD ["python3"]
D
if ! up_to_date "$PYTHON_TAG"; then
  build "$PYTHON_TAG" "$WORK/python"
  podman run --rm --network none "$PYTHON_TAG" sh -ec '
    python --version; pip --version >/dev/null; command -v python3 pip >/dev/null
    python -c "import ssl, sqlite3, venv, ctypes, zlib, lzma, bz2, json; print(\"stdlib ok\")"
    test -s "$PIP_CERT"' >&2 || die "built image $PYTHON_TAG fails its self-check"
fi
tag_upstream "$PYTHON_TAG" python:3.11-slim

if [ "$PYTHON_ONLY" = 1 ]; then
  log "done in $(( $(now_ms) - t0 )) ms"
  exit 0
fi

# --- 3. PostgreSQL 16 (stand-in for postgres:16-alpine) -------------------------------------------------
mkdir -p "$WORK/postgres"
cat >"$WORK/postgres/docker-entrypoint.sh" <<'EP'
#!/bin/sh
# Minimal take on the official postgres image's entrypoint: POSTGRES_PASSWORD (required),
# POSTGRES_USER (default postgres), POSTGRES_DB (default $POSTGRES_USER), PGDATA,
# POSTGRES_INITDB_ARGS; scram-sha-256 for TCP clients, trust on the local socket; the first
# start initialises the cluster with a server that does not listen on TCP, as the official one does.
set -eu
if [ "${1#-}" != "$1" ]; then set -- postgres "$@"; fi
if [ "$1" = postgres ]; then
  : "${PGDATA:=/var/lib/postgresql/data}"
  if [ "$(id -u)" = 0 ]; then
    mkdir -p "$PGDATA" /var/run/postgresql
    chown -R postgres:postgres "$PGDATA" /var/run/postgresql
    chmod 700 "$PGDATA"
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
  fi
  if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "${POSTGRES_PASSWORD:-}" ]; then
      echo "error: database is uninitialized and POSTGRES_PASSWORD is not set" >&2
      exit 1
    fi
    user="${POSTGRES_USER:-postgres}"
    db="${POSTGRES_DB:-$user}"
    pwfile="$(mktemp)"
    printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
    # shellcheck disable=SC2086
    initdb -D "$PGDATA" --username="$user" --pwfile="$pwfile" --auth-local=trust --auth-host=scram-sha-256 \
      --encoding=UTF8 --locale=C.UTF-8 ${POSTGRES_INITDB_ARGS:-} >/dev/null
    rm -f "$pwfile"
    echo "listen_addresses = '*'" >>"$PGDATA/postgresql.conf"
    echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
    pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
    if [ "$db" != postgres ]; then
      psql -v ON_ERROR_STOP=1 --username "$user" --dbname postgres -q \
        -c "CREATE DATABASE \"$(printf '%s' "$db" | sed 's/"/""/g')\""
    fi
    pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
    echo "PostgreSQL init process complete; ready for start up."
  fi
fi
exec "$@"
EP
cat >"$WORK/postgres/Dockerfile" <<D
FROM $PYTHON_TAG AS pgserver
RUN pip install -q --no-deps "pgserver==$PGSERVER_VERSION" \\
 && sp="\$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \\
 && mkdir -p /out/opt/pgsql/pgserver \\
 && cp -a "\$sp/pgserver/pginstall" /out/opt/pgsql/pgserver/pginstall \\
 && cp -a "\$sp/pgserver.libs" /out/opt/pgsql/pgserver.libs \\
 && rm -rf /out/opt/pgsql/pgserver/pginstall/include /out/opt/pgsql/pgserver/pginstall/lib/*.a

FROM $DEBIAN_TAG
# The binaries find libpq through the rpath \$ORIGIN/../../../pgserver.libs: keep the wheel's layout.
COPY --from=pgserver /out/ /
RUN echo 'postgres:x:70:70:PostgreSQL:/var/lib/postgresql:/bin/sh' >>/etc/passwd \\
 && echo 'postgres:x:70:' >>/etc/group \\
 && mkdir -p /var/lib/postgresql/data /var/run/postgresql \\
 && chown -R 70:70 /var/lib/postgresql /var/run/postgresql && chmod 1777 /var/lib/postgresql/data
ENV PATH=/opt/pgsql/pgserver/pginstall/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    PGDATA=/var/lib/postgresql/data \\
    LANG=C.UTF-8
COPY docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
RUN chmod 0755 /usr/local/bin/docker-entrypoint.sh && postgres --version && pg_isready --version
LABEL org.opencontainers.image.title="ops-pipeline postgres stand-in" \\
      org.opencontainers.image.description="PostgreSQL 16 from the pgserver $PGSERVER_VERSION wheel on Debian 12; local stand-in for postgres:16-alpine"
VOLUME /var/lib/postgresql/data
ENTRYPOINT ["docker-entrypoint.sh"]
STOPSIGNAL SIGINT
EXPOSE 5432
CMD ["postgres"]
D
if ! up_to_date "$POSTGRES_TAG"; then
  build "$POSTGRES_TAG" "$WORK/postgres"
  name="ops-pgcheck-$$"
  podman run -d --name "$name" --network none -e POSTGRES_USER=check -e POSTGRES_PASSWORD=check-pw \
    -e POSTGRES_DB=checkdb "$POSTGRES_TAG" >/dev/null
  ok=0
  for _ in $(seq 1 60); do
    if podman exec "$name" pg_isready -q -h 127.0.0.1 -U check -d checkdb 2>/dev/null \
       && podman exec -e PGPASSWORD=check-pw "$name" psql -h 127.0.0.1 -U check -d checkdb -Atc 'select 1' 2>/dev/null | grep -qx 1; then
      ok=1; break
    fi
    sleep 0.5
  done
  [ "$ok" = 1 ] || podman logs "$name" >&2 || true
  podman rm -f "$name" >/dev/null 2>&1 || true
  [ "$ok" = 1 ] || die "built image $POSTGRES_TAG fails its self-check (initdb + password login over TCP)"
fi
tag_upstream "$POSTGRES_TAG" postgres:16-alpine

# --- 4. Redis 7 (stand-in for redis:7-alpine) -----------------------------------------------------------
mkdir -p "$WORK/redis"
cat >"$WORK/redis/docker-entrypoint.sh" <<'EP'
#!/bin/sh
# Like the official redis image: `redis-server` by default, options-only arguments go to it,
# protected mode off (the official build compiles it off), and it runs as user redis in /data.
set -eu
if [ "${1#-}" != "$1" ] || [ "${1%.conf}" != "$1" ]; then set -- redis-server "$@"; fi
if [ "$1" = redis-server ]; then
  case " $* " in *" --protected-mode "*) ;; *) set -- "$@" --protected-mode no;; esac
  if [ "$(id -u)" = 0 ]; then
    find . \! -user redis -exec chown redis '{}' + 2>/dev/null || true
    exec setpriv --reuid=redis --regid=redis --init-groups "$@"
  fi
fi
exec "$@"
EP
cat >"$WORK/redis/Dockerfile" <<D
FROM $DEBIAN_TAG
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update -q \\
 && apt-get install -y -q --no-install-recommends redis-server redis-tools \\
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \\
 && mkdir /data && chown redis:redis /data && redis-server --version
COPY docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
RUN chmod 0755 /usr/local/bin/docker-entrypoint.sh
LABEL org.opencontainers.image.title="ops-pipeline redis stand-in" \\
      org.opencontainers.image.description="Debian 12 redis-server 7.0; local stand-in for redis:7-alpine"
VOLUME /data
WORKDIR /data
ENTRYPOINT ["docker-entrypoint.sh"]
EXPOSE 6379
CMD ["redis-server"]
D
if ! up_to_date "$REDIS_TAG"; then
  build "$REDIS_TAG" "$WORK/redis"
  name="ops-redischeck-$$"
  podman run -d --name "$name" --network none "$REDIS_TAG" redis-server --requirepass check-pw >/dev/null
  ok=0
  for _ in $(seq 1 40); do
    if podman exec -e REDISCLI_AUTH=check-pw "$name" redis-cli ping 2>/dev/null | grep -q PONG; then ok=1; break; fi
    sleep 0.25
  done
  [ "$ok" = 1 ] || podman logs "$name" >&2 || true
  podman rm -f "$name" >/dev/null 2>&1 || true
  [ "$ok" = 1 ] || die "built image $REDIS_TAG fails its self-check (redis-cli ping with a password)"
fi
tag_upstream "$REDIS_TAG" redis:7-alpine

log "done in $(( $(now_ms) - t0 )) ms: $PYTHON_TAG $POSTGRES_TAG $REDIS_TAG (recipe $RECIPE)"
