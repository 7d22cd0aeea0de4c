#!/bin/sh
# Install everything the tests need on Debian 12 (run as root), then run them.
#   tests/run.sh [pytest arguments]
# The tests start their own registry, mirrors, dockerd and containerd on 127.0.0.1
# and stop them again; the services these packages bring are not used. The systemd
# tests boot a Debian 12 container (systemd-nspawn); its root filesystem is made with
# debootstrap once and kept in /var/cache/docker-mirror-tests for later runs. The package
# tests build the .deb and RPMs with the Makefile (`make wheelhouse` downloads the pinned
# wheels), and compile a stand-in CPython for the EL7 RPM once (cached there too).
set -eu
cd "$(dirname "$0")/.."

PACKAGES="python3 python3-venv ca-certificates curl openssl git make docker-registry skopeo podman docker.io
          containerd systemd systemd-container debootstrap
          dh-virtualenv debhelper devscripts fakeroot lintian rpm rpmlint
          build-essential dpkg-dev xz-utils libssl-dev zlib1g-dev libffi-dev libbz2-dev liblzma-dev libsqlite3-dev"
tests/apt-ensure.sh $PACKAGES

# Debian's python3, in a virtualenv of the clone
[ -x .venv/bin/python ] || /usr/bin/python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
exec .venv/bin/pytest "$@"
