#!/usr/bin/env bash
# Build local stand-ins for the Docker Hub images that docker-compose.yml and the Dockerfile start
# from, for a machine that cannot reach Docker Hub:
#   python:3.11-slim  Debian bookworm's Python 3.11 (python.Dockerfile)
#   postgres:17       Debian bookworm's PostgreSQL 15 (postgres.Dockerfile)
# Both start from a debootstrap of Debian bookworm (minbase) imported with `docker import` as
# scaling-search-base/debian:bookworm; an image that is already there is kept, so a rerun builds
# nothing. The machine's CA bundle goes into the python image, so that pip reaches PyPI through
# whatever TLS interception the machine's network has. Needs root (debootstrap) and Debian's
# mirror. scripts/compose_check.sh runs this only when `docker pull` of an image fails.
#
#   bash scripts/docker_base/build.sh python:3.11-slim postgres:17
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
BASE=scaling-search-base/debian:bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
log() { echo "docker_base: $*"; }

have_image() { docker image inspect "$1" > /dev/null 2>&1; }

build_base() {
  have_image "$BASE" && return
  command -v debootstrap > /dev/null || {
    log "installing debootstrap"
    DEBIAN_FRONTEND=noninteractive apt-get install --yes --quiet debootstrap > /dev/null 2>&1 \
      || { log "apt-get install debootstrap failed" >&2; exit 1; }
  }
  local rootfs
  rootfs=$(mktemp -d /var/tmp/scaling-search-rootfs.XXXXXX)
  log "debootstrap of Debian bookworm into $rootfs"
  if ! debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" > "$rootfs.log" 2>&1; then
    tail -n 20 "$rootfs.log" >&2
    rm -rf "$rootfs" "$rootfs.log"
    return 1
  fi
  # As Docker's own Debian images: no services started by package scripts, no package caches.
  printf '#!/bin/sh\nexit 101\n' > "$rootfs/usr/sbin/policy-rc.d"
  chmod 755 "$rootfs/usr/sbin/policy-rc.d"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | docker import --change 'CMD ["bash"]' - "$BASE" > /dev/null
  rm -rf "$rootfs" "$rootfs.log"
  log "imported $BASE"
}

build_one() {  # build_one TAG DOCKERFILE
  local tag=$1 dockerfile=$2 context
  have_image "$tag" && return
  build_base
  context=$(mktemp -d)
  cp "$here/$dockerfile" "$here/postgres-entrypoint.sh" "$context/"
  cp "$CA_BUNDLE" "$context/ca-certificates.crt"
  log "building the stand-in $tag ($dockerfile)"
  if ! DOCKER_BUILDKIT=0 docker build --quiet --build-arg "BASE=$BASE" --label \
      "org.scaling-search.stand-in=scripts/docker_base/$dockerfile" -t "$tag" \
      -f "$context/$dockerfile" "$context" > "$context.log" 2>&1; then
    tail -n 30 "$context.log" >&2
    rm -rf "$context" "$context.log"
    return 1
  fi
  rm -rf "$context" "$context.log"
}

for tag in "$@"; do
  case $tag in
    python:3.11-slim) build_one "$tag" python.Dockerfile ;;
    postgres:17) build_one "$tag" postgres.Dockerfile ;;
    *) log "no stand-in for $tag (only python:3.11-slim and postgres:17)" >&2; exit 2 ;;
  esac
done
