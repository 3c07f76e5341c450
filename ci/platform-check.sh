#!/usr/bin/env bash
# Windows and macOS, checked from Linux (issue 14): what can be proven without such a machine.
#
#   (a) Every runtime dependency in pyproject.toml, transitive ones included, installs from wheels -- nothing
#       to compile -- on win_amd64, macOS arm64 and macOS x86_64, for CPython 3.11 and 3.13.
#   (b) mypy finds no POSIX-only call left unguarded for win32 and darwin (`mypy --platform …`).
#
# (a), how: `pip download --platform` alone is not enough. pip evaluates the environment markers of the
# requirements against the interpreter running it (Linux), not the target, so `uvloop; sys_platform != 'win32'`
# would be demanded for Windows and Windows-only dependencies (pywin32-ctypes, via keyring) never looked at.
# So uv (from PyPI, cached below) resolves the dependency tree for each target platform and Python version,
# markers evaluated for that target:
#   1. `uv pip compile --python-platform T --python-version V --only-binary :all:` must succeed: every package
#      has a version with a wheel for T (uv names the one that has none);
#   2. the same without --only-binary must pick the same versions: otherwise the newest version of some package
#      has no wheel for T, and pip on such a machine would try to build it from source (this is how the
#      cryptography >= 49 gap for Intel Macs was found; pyproject.toml caps it there);
#   3. `pip download --no-deps --only-binary=:all: --platform P --python-version V` of exactly those pins must
#      find a wheel for each (pip's own tag matching, as a user's pip would do it). A pin list that passed once
#      is remembered (a stamp per platform, version and list), so a warm run only resolves (~1 s each).
# macOS targets are macOS 11 (MACOSX_DEPLOYMENT_TARGET, the first with arm64): a wheel that needs a newer
# macOS does not count.
#
# (b) ruff has no target-platform option (it does not evaluate sys.platform checks), so only mypy is run
# per platform; ruff runs once in .ci/run.
#
# Needs the network to PyPI (uv and the wheels); state lives in .ci-cache/platform-check (git-ignored).
#   ci/platform-check.sh           # both checks
#   ci/platform-check.sh wheels    # (a) only
#   ci/platform-check.sh mypy      # (b) only
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE=${PLATFORM_CHECK_CACHE:-.ci-cache/platform-check}
VENV=${VENV:-.venv}
PYTHONS=(3.11 3.13)
# uv's target triple | pip's platform tag | what users call it
TARGETS=(
  "x86_64-pc-windows-msvc|win_amd64|Windows x64"
  "aarch64-apple-darwin|macosx_11_0_arm64|macOS arm64"
  "x86_64-apple-darwin|macosx_11_0_x86_64|macOS x86_64"
)
export MACOSX_DEPLOYMENT_TARGET=11.0
export UV_CACHE_DIR=$CACHE/uv UV_PYTHON_DOWNLOADS=never UV_NO_CONFIG=1
export PIP_DISABLE_PIP_VERSION_CHECK=1

what=${1:-all}
case $what in
  all | wheels | mypy) ;;
  -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  *) echo "unknown argument: $what (see --help)" >&2; exit 2 ;;
esac

start=$EPOCHREALTIME
failed=0
fail() { printf '[platform-check] FAIL %s\n' "$*" >&2; failed=1; }

check_wheels() {
  mkdir -p "$CACHE/stamps" "$CACHE/logs"
  if [[ ! -x $CACHE/venv/bin/uv ]]; then
    python3 -m venv "$CACHE/venv"
    "$CACHE/venv/bin/pip" install -q 'uv>=0.5,<1' >"$CACHE/logs/uv-install.txt" 2>&1 ||
      { cat "$CACHE/logs/uv-install.txt" >&2; exit 1; }
  fi
  local uv=$CACHE/venv/bin/uv pip=$CACHE/venv/bin/pip
  local -a jobs=() labels=() logs=()
  for target in "${TARGETS[@]}"; do
    IFS='|' read -r triple tag name <<<"$target"
    for version in "${PYTHONS[@]}"; do
      local label="$tag-py$version" pins="$CACHE/$tag-py$version.txt" newest="$CACHE/$tag-py$version.newest.txt"
      local -a compile=("$uv" pip compile pyproject.toml --python-platform "$triple" --python-version "$version"
        --no-header --no-annotate --quiet)
      if ! "${compile[@]}" --only-binary :all: -o "$pins" 2>"$CACHE/logs/$label.uv"; then
        fail "$name, Python $version: the runtime dependencies cannot all be installed from wheels:"
        sed 's/^/    /' "$CACHE/logs/$label.uv" >&2
        continue
      fi
      if ! "${compile[@]}" -o "$newest" 2>"$CACHE/logs/$label.uv"; then
        fail "$name, Python $version: resolving the newest versions failed:"
        sed 's/^/    /' "$CACHE/logs/$label.uv" >&2
        continue
      fi
      if ! cmp -s "$pins" "$newest"; then
        fail "$name, Python $version: the newest version of a dependency has no wheel there, so pip would build" \
          "it from source (cap it in pyproject.toml with a marker for that platform): newest vs. newest with a wheel:"
        diff "$newest" "$pins" | grep '^[<>]' | sed 's/^/    /' >&2 || true
        continue
      fi
      local stamp
      stamp="$CACHE/stamps/$label-$(sha256sum <"$pins" | cut -c1-16)"
      [[ -e $stamp ]] && continue # these exact pins were downloaded as wheels for this platform before
      labels+=("$name, Python $version")
      logs+=("$CACHE/logs/$label.pip")
      (
        "$pip" download --quiet --no-deps --only-binary=:all: --platform "$tag" --python-version "$version" \
          --implementation cp --dest "$CACHE/wheels/$label" -r "$pins" >"$CACHE/logs/$label.pip" 2>&1 &&
          touch "$stamp"
      ) &
      jobs+=($!)
    done
  done
  local i
  for i in "${!jobs[@]}"; do
    if ! wait "${jobs[$i]}"; then
      fail "${labels[$i]}: pip found no wheel for a pinned dependency:"
      grep -v 'is ignored: it is neither' "${logs[$i]}" | sed 's/^/    /' >&2 || true
    fi
  done
  if ((!failed)); then
    local count
    count=$(cat "$CACHE"/*-py3.1[13].txt | grep -c '==' || true)
    printf '[platform-check] wheels: every runtime dependency has a wheel for %s x Python %s (%d pins checked)\n' \
      "$(printf '%s, ' "${TARGETS[@]##*|}" | sed 's/, $//')" "${PYTHONS[*]}" "$count"
  fi
}

check_mypy() {
  local platform
  for platform in win32 darwin; do
    if ! "$VENV/bin/mypy" --platform "$platform" proxy >"$CACHE/logs/mypy-$platform.txt" 2>&1; then
      fail "mypy --platform $platform proxy:"
      sed 's/^/    /' "$CACHE/logs/mypy-$platform.txt" >&2
    fi
  done
  ((failed)) || printf '[platform-check] mypy --platform win32 / darwin: clean\n'
}

mkdir -p "$CACHE/logs"
[[ $what == mypy ]] || check_wheels
[[ $what == wheels ]] || check_mypy
printf '[platform-check] %s in %s s\n' "$( ((failed)) && echo FAILED || echo passed)" \
  "$(awk "BEGIN { printf \"%.1f\", $EPOCHREALTIME - $start }")"
exit "$failed"
