#!/bin/sh
# Install those of the given Debian packages that are missing (as root), nothing else.
#   tests/apt-ensure.sh PACKAGE...
# Or unpack one package into DIR without installing it (no maintainer scripts, no service started,
# nothing written outside DIR); DIR/.version says which version is there, and is kept while current:
#   tests/apt-ensure.sh --unpack DIR PACKAGE
# When another apt or dpkg holds its lock (a fresh cloud machine runs unattended-upgrades
# at first boot), wait for it, saying so every 30 s, for up to APT_LOCK_WAIT seconds (1200).
# APT_GET and DPKG_QUERY name the commands to use (the tests point them at stand-ins).
set -eu
APT_GET=${APT_GET:-apt-get}
DPKG_QUERY=${DPKG_QUERY:-dpkg-query}
LOCK_WAIT=${APT_LOCK_WAIT:-1200}
POLL=${APT_LOCK_POLL:-5}
err=$(mktemp)
trap 'rm -f "$err"' EXIT

# apt-get "$@", retried while it fails for a lock another process holds
apt_get() {
    started=$(date +%s)
    said=0
    while :; do
        status=0
        "$APT_GET" -o DPkg::Lock::Timeout="$POLL" "$@" 2>"$err" || status=$?
        if [ "$status" -eq 0 ]; then
            cat "$err" >&2
            return 0
        fi
        waited=$(( $(date +%s) - started ))
        if grep -q -i -e "could not get lock" -e "unable to acquire the dpkg frontend lock" -e "unable to lock" "$err" \
                && [ "$waited" -lt "$LOCK_WAIT" ]; then
            if [ "$said" -eq 0 ] || [ $((waited - said)) -ge 30 ]; then
                holder=$(grep -o -i "held by process [0-9]* ([^)]*)" "$err" | head -1)
                echo "tests/apt-ensure.sh: apt-get $1: another package manager holds the lock${holder:+ ($holder)}; waiting (${waited} s of ${LOCK_WAIT} s)" >&2
                said=$waited
                [ "$said" -gt 0 ] || said=1
            fi
            sleep "$POLL"
            continue
        fi
        cat "$err" >&2
        if [ "$waited" -ge "$LOCK_WAIT" ]; then
            echo "tests/apt-ensure.sh: gave up waiting for the apt/dpkg lock after ${waited} s (APT_LOCK_WAIT=${LOCK_WAIT})" >&2
        fi
        return "$status"
    done
}

if [ "${1:-}" = "--unpack" ]; then
    dir=$2
    package=$3
    candidate() { apt-cache policy "$package" 2>/dev/null | awk '/Candidate:/ {print $2}'; }
    version=$(candidate)
    if [ -z "$version" ] || [ "$version" = "(none)" ]; then
        apt_get update -q
        version=$(candidate)
    fi
    if [ -f "$dir/.version" ] && [ "$(cat "$dir/.version")" = "$version" ]; then
        exit 0
    fi
    echo "tests/apt-ensure.sh: unpacking $package $version into $dir (not installed)" >&2
    work=$(mktemp -d)
    trap 'rm -f "$err"; rm -rf "$work"' EXIT
    (cd "$work" && "$APT_GET" download -q "$package=$version" >&2 2>"$err") || { cat "$err" >&2; exit 1; }
    rm -rf "$dir.new"
    mkdir -p "$dir.new"
    dpkg-deb -x "$work"/*.deb "$dir.new"
    echo "$version" >"$dir.new/.version"
    rm -rf "$dir"
    mv "$dir.new" "$dir"
    exit 0
fi

missing=""
for p in "$@"; do
    "$DPKG_QUERY" -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    export DEBIAN_FRONTEND=noninteractive
    echo "tests/apt-ensure.sh: installing${missing}" >&2
    apt_get update -q
    # shellcheck disable=SC2086
    apt_get install -y -q --no-install-recommends $missing
fi
