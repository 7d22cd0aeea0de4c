#!/bin/sh
# Install everything the tests need on Debian 12 (as root), then run them.
#   tests/run.sh [pytest arguments]     both tiers (the README's test command, and CI's)
#   tests/run.sh --fast [arguments]     only the fast tier: no root, no Debian packages, seconds
# The tests start their own registry, mirrors, dockerd and containerd on 127.0.0.1 and stop
# them again; the services these packages bring are not used. Clients run in mount
# namespaces with a private /etc and /var/lib (tests/support/sandbox.py): the host's files
# are never written. The systemd tests boot a Debian 12 container (systemd-nspawn); its root
# filesystem is made with debootstrap once and kept in /var/cache/docker-mirror-tests
# (DM_TEST_CACHE) for later runs, with the stand-in CPython for the EL7 RPM; remove that
# directory to reclaim the space. The package tests build the .deb and RPMs with the Makefile.
set -eu
cd "$(dirname "$0")/.."
say() { echo "[tests $(date +%H:%M:%S)] $*"; }

fast=""
if [ "${1:-}" = "--fast" ]; then
    fast=1
    shift
fi

PACKAGES="python3 python3-venv ca-certificates curl openssl git make docker-registry skopeo podman docker.io
          containerd iproute2 systemd systemd-container debootstrap util-linux chromium
          dh-virtualenv debhelper devscripts fakeroot lintian rpm rpmlint createrepo-c apt-utils gnupg dnf
          build-essential dpkg-dev xz-utils libssl-dev zlib1g-dev libffi-dev libbz2-dev liblzma-dev libsqlite3-dev"
if [ -z "$fast" ]; then
    say "checking the Debian packages the tests need"
    # shellcheck disable=SC2086
    tests/apt-ensure.sh $PACKAGES
    # prometheus and promtool from Debian's package, unpacked, not installed: the package would
    # start a prometheus.service listening on every address of the machine
    tests/apt-ensure.sh --unpack "${DM_TEST_CACHE:-/var/cache/docker-mirror-tests}/prometheus" prometheus
    # firewalld's own code reads the packaged service file (tests/support/firewalld.py): unpacked, not
    # installed (the package would start firewalld and load its rules); it runs on Debian's python3
    tests/apt-ensure.sh python3-gi python3-dbus gir1.2-glib-2.0
    for p in firewalld python3-firewall python3-nftables; do
        tests/apt-ensure.sh --unpack "${DM_TEST_CACHE:-/var/cache/docker-mirror-tests}/firewalld/$p" "$p"
    done
    # HAProxy and nginx for the generated balancer configurations (tests/support/balancers.py): unpacked,
    # not installed (either package would start a server on every address of the machine); haproxy runs
    # with LD_LIBRARY_PATH on the libraries it links that are unpacked next to it; nginx is nginx-core's
    # binary, with the stream module (a dynamic module in Debian) for TLS passthrough
    for p in haproxy liblua5.3-0 libopentracing-c-wrapper0 libopentracing1; do
        tests/apt-ensure.sh --unpack "${DM_TEST_CACHE:-/var/cache/docker-mirror-tests}/haproxy/$p" "$p"
    done
    for p in nginx libnginx-mod-stream; do
        tests/apt-ensure.sh --unpack "${DM_TEST_CACHE:-/var/cache/docker-mirror-tests}/nginx/$p" "$p"
    done
fi

# Debian's python3, in a virtualenv of the clone, with the pinned versions
if [ ! -x .venv/bin/python ]; then
    say "creating .venv"
    /usr/bin/python3 -m venv .venv
fi
say "installing docker-mirror and the test tools into .venv (pinned: requirements.lock, tests/requirements.txt)"
.venv/bin/pip install -q --disable-pip-version-check --use-pep517 -c requirements.lock \
    -r tests/requirements.txt -e .
# what tests keep for people to look at (the status page's screenshot), in the clone's build/
export DM_TEST_ARTIFACTS="${DM_TEST_ARTIFACTS:-$PWD/build/test-artifacts}"
say "running the tests (artefacts: $DM_TEST_ARTIFACTS)"
if [ -n "$fast" ]; then
    exec .venv/bin/pytest -m "not system" "$@"
fi
exec .venv/bin/pytest -v "$@"
