#!/bin/sh
# Benchmark docker-mirror against the reference mirror on Debian 12 (run as root).
#   bench/run.sh [--rounds 5] [--only warm,warm-tls,clients,cold,cold-tls,herd,many,idle,pull,docker-pull] [--duration 20] [--big-mib 300]
# Installs what it needs (only missing packages), then runs python -m bench from the
# clone's .venv. Everything it starts listens on 127.0.0.1 and is stopped at the end.
set -eu
cd "$(dirname "$0")/.."

PACKAGES="python3 python3-venv ca-certificates docker-registry skopeo wrk curl docker.io"
tests/apt-ensure.sh $PACKAGES

# Debian's python3, in a virtualenv of the clone (the benchmark imports tests.support)
[ -x .venv/bin/python ] || /usr/bin/python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e .
exec .venv/bin/python -m bench "$@"
