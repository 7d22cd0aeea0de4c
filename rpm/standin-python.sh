#!/bin/sh
# Build a stand-in for a python-build-standalone "install_only" tarball from Debian's
# python3.11 source package, for building and testing the EL7 RPM where the real one
# cannot be downloaded. It is laid out the same way (python/bin/python3, python/lib/...)
# and relocatable, but it links against THIS machine's glibc and OpenSSL: it does not
# run on CentOS 7. Ship the real thing (CPython 3.12 from python-build-standalone).
#
#   rpm/standin-python.sh OUTPUT.tar.gz
#
# Needs: build-essential, libssl-dev, zlib1g-dev, libffi-dev, libbz2-dev, liblzma-dev,
# libsqlite3-dev, libreadline-dev? (not needed), xz-utils, dpkg-dev. The source comes
# from Debian's archive through a private apt configuration (the host's is not touched).
set -eu
out=$(realpath -m "$1")
work=$(mktemp -d /var/tmp/dm-standin-XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/apt/lists/partial" "$work/apt/archives/partial"
cat > "$work/apt/sources.list" <<SOURCES
deb-src http://deb.debian.org/debian bookworm main
SOURCES
APT="-o Dir::Etc::SourceList=$work/apt/sources.list -o Dir::Etc::SourceParts=/nonexistent -o Dir::State::Lists=$work/apt/lists -o Dir::Cache::Archives=$work/apt/archives -o Debug::NoLocking=1"
# shellcheck disable=SC2086
apt-get $APT -q update >/dev/null
cd "$work"
# shellcheck disable=SC2086
apt-get $APT -q source --download-only python3.11 >/dev/null
orig=$(ls python3.11_*.orig.tar.* | head -1)
mkdir src && tar -xf "$orig" -C src --strip-components=1
cd src
./configure --prefix=/opt/docker-mirror/python --without-ensurepip --with-ensurepip=no \
    --disable-test-modules >/dev/null
make -j"$(nproc)" >/dev/null 2>&1 || make >/dev/null
make install DESTDIR="$work/stage" >/dev/null
cd "$work/stage/opt/docker-mirror"
# drop what an install_only tarball does not carry
rm -rf python/lib/python3.11/test python/lib/python3.11/idlelib python/lib/python3.11/tkinter \
       python/lib/python3.11/turtledemo python/share
find python -name __pycache__ -prune -exec rm -rf {} +
ln -sf python3.11 python/bin/python3
tar -czf "$out" python
echo "$out: $(du -h "$out" | cut -f1), $(python/bin/python3 --version 2>&1)"
