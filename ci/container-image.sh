#!/usr/bin/env bash
# Build the project's container image with podman, for real, on a machine that reaches no container registry
# (how and why: ../shared/containers.md of the CI machines).
#
#   1. a stand-in for python:3.12-slim, unless it exists: Debian bookworm (python3, pip, venv, ca-certificates)
#      made with mmdebstrap, `podman import`ed, and a small image FROM it that behaves like the official one
#      (PATH, `python`/`pip`, no EXTERNALLY-MANAGED);
#   2. the project image from ./Dockerfile with --build-arg PYTHON_IMAGE=<the stand-in>, unless an image with
#      this tag was already built from the same sources on the same base (label odata-auth-proxy.source).
#
# Idempotent: a second run only checks. Prints what each step took. Needs root (mmdebstrap, podman), a Debian
# mirror and the Python package index (the build runs pip with the host's /etc/pip.conf and CA certificates).
#
#   ci/container-image.sh            # -> localhost/odata-auth-proxy:ci
#   ci/container-image.sh --rebuild  # the project image again even if its sources did not change
#
# Settings (environment): IMAGE (localhost/odata-auth-proxy:ci), BASE_IMAGE (localhost/debian-python:bookworm),
# CONTAINERS_CONF (default: a file with the settings these machines need, written to $TMPDIR).
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-localhost/odata-auth-proxy:ci}
BASE_IMAGE=${BASE_IMAGE:-localhost/debian-python:bookworm}
ROOTFS_IMAGE=${BASE_IMAGE%:*}-rootfs:${BASE_IMAGE##*:}
SUITE=bookworm
rebuild=0
for arg in "$@"; do
  case $arg in
    --rebuild) rebuild=1 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
  esac
done

start=$EPOCHREALTIME
step_start=$start
step() { # step NAME: close the previous step's timing, announce the next
  printf '[container-image] %s\n' "$*"
  step_start=$EPOCHREALTIME
}
done_step() { printf '[container-image]   ... %s s\n' "$(awk -v a="$step_start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')"; }
total() { awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }

# ---- tools: podman, runc, mmdebstrap (Debian packages) ------------------------------------------------------------
missing=()
for tool in podman runc mmdebstrap; do command -v "$tool" >/dev/null 2>&1 || missing+=("$tool"); done
if ((${#missing[@]})); then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    step "installing ${missing[*]} (apt-get)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc mmdebstrap >/dev/null
    done_step
  else
    echo "[container-image] missing: ${missing[*]}; install them (Debian: apt-get install podman runc mmdebstrap)" >&2
    exit 1
  fi
fi

# ---- podman settings: runc + cgroupfs (crun fails on these hybrid cgroups), ulimits we may not raise ---------------
if [[ -z ${CONTAINERS_CONF:-} ]]; then
  export CONTAINERS_CONF=${TMPDIR:-/tmp}/odata-auth-proxy-containers.conf
  cat >"$CONTAINERS_CONF.$$" <<'CONF'
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
CONF
  mv -f "$CONTAINERS_CONF.$$" "$CONTAINERS_CONF"
fi
echo "[container-image] CONTAINERS_CONF=$CONTAINERS_CONF ($(podman --version))"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# ---- 1. the stand-in base image -------------------------------------------------------------------------------------
if podman image exists "$BASE_IMAGE"; then
  echo "[container-image] base $BASE_IMAGE exists"
else
  if ! podman image exists "$ROOTFS_IMAGE"; then
    step "base: Debian $SUITE root filesystem (mmdebstrap) -> $ROOTFS_IMAGE"
    sources=()
    [[ -f /etc/apt/sources.list.d/debian.sources ]] && sources=(/etc/apt/sources.list.d/debian.sources)
    # minbase, no recommends, no docs/man pages/locales (what -slim leaves out too)
    mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
      --aptopt='APT::Install-Recommends "false"' \
      --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
      --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
      --dpkgopt='path-exclude=/usr/share/locale/*' \
      --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
      "$SUITE" "$work/rootfs.tar" "${sources[@]}"
    podman import --quiet "$work/rootfs.tar" "$ROOTFS_IMAGE" >/dev/null
    rm -f "$work/rootfs.tar"
    done_step
  fi
  step "base: $BASE_IMAGE FROM $ROOTFS_IMAGE, made to behave like python:3.12-slim"
  mkdir "$work/base"
  cat >"$work/base/Containerfile" <<CONTAINERFILE
FROM $ROOTFS_IMAGE
# an imported root filesystem has no configuration at all, not even PATH
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8
RUN rm -f /usr/lib/python3*/EXTERNALLY-MANAGED \\
 && ln -sf /usr/bin/python3 /usr/local/bin/python \\
 && { command -v pip >/dev/null || ln -sf /usr/bin/pip3 /usr/local/bin/pip; } \\
 && python --version && pip --version
CMD ["python3"]
CONTAINERFILE
  podman build --quiet --pull=never --layers=false --format docker -t "$BASE_IMAGE" "$work/base" >/dev/null
  done_step
fi

# ---- 2. the project image -----------------------------------------------------------------------------------------
# What the build reads (.dockerignore lets in pyproject.toml, setup.py, README.md and proxy/ only), the Dockerfile, the base.
source_hash=$(
  {
    podman image inspect --format '{{.Id}}' "$BASE_IMAGE"
    find Dockerfile .dockerignore pyproject.toml setup.py README.md proxy -type f ! -name '*.so' ! -name '*.pyd' \
      ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
  } | sha256sum | cut -c1-16
)
built=""
if podman image exists "$IMAGE"; then
  built=$(podman image inspect --format '{{index .Config.Labels "odata-auth-proxy.source"}}' "$IMAGE" 2>/dev/null || true)
fi
if [[ $rebuild == 0 && $built == "$source_hash" ]]; then
  echo "[container-image] $IMAGE is up to date (sources $source_hash)"
else
  previous=$(podman image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
  step "image: $IMAGE from ./Dockerfile on $BASE_IMAGE (sources $source_hash)"
  mounts=()
  for path in /etc/ssl/certs /etc/pip.conf; do [[ -e $path ]] && mounts+=(-v "$path:$path:ro"); done
  # --no-cache: with a cached build stage, RUN --mount=type=bind,from=build saw an empty directory (podman 4.3);
  # --format docker: the OCI format drops HEALTHCHECK; --network host: pip reaches the index like the host does
  podman build --pull=never --no-cache --layers=false --format docker --network host "${mounts[@]}" \
    --build-arg "PYTHON_IMAGE=$BASE_IMAGE" --label "odata-auth-proxy.source=$source_hash" \
    --label "odata-auth-proxy.base=$BASE_IMAGE" -t "$IMAGE" .
  done_step
  current=$(podman image inspect --format '{{.Id}}' "$IMAGE")
  if [[ -n $previous && $previous != "$current" ]]; then
    podman rmi "$previous" >/dev/null 2>&1 || true # the replaced image, unless a container still uses it
  fi
fi

size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
base_size=$(podman image inspect --format '{{.Size}}' "$BASE_IMAGE")
printf '[container-image] %s: %s MB (base %s: %s MB, the project adds %s MB); total %s s\n' \
  "$IMAGE" "$((size / 1000000))" "$BASE_IMAGE" "$((base_size / 1000000))" "$(((size - base_size) / 1000000))" "$(total)"
