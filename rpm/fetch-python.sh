#!/bin/sh
# The CPython the EL7 RPM bundles: download URL to OUTPUT unless OUTPUT is there already with
# the expected SHA-256, and check it. A download goes to OUTPUT.part and is renamed only once
# its checksum matches; on any failure neither OUTPUT nor OUTPUT.part is left behind, so a
# later make never finds a file it would trust without checking.
#
#   rpm/fetch-python.sh URL SHA256 OUTPUT     download (curl; file:// works too) and check
#   rpm/fetch-python.sh --check SHA256 FILE   only check a tarball given as PYTHON_TARBALL
set -eu
me=rpm/fetch-python.sh

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

refuse() {   # FILE GOT EXPECTED WHERE-FROM
    echo "$me: $1: SHA-256 is $2, expected $3 (PYTHON_SHA256); refusing $4" >&2
    exit 1
}

if [ "${1:-}" = "--check" ]; then
    [ $# -eq 3 ] || { echo "usage: $me --check SHA256 FILE" >&2; exit 2; }
    expected=$(printf %s "$2" | tr A-F a-f) file=$3
    [ -f "$file" ] || { echo "$me: $file: no such file" >&2; exit 1; }
    got=$(sha256_of "$file")
    [ "$got" = "$expected" ] || refuse "$file" "$got" "$expected" "it"
    echo "$file: SHA-256 $got (as PYTHON_SHA256)"
    exit 0
fi

[ $# -eq 3 ] || { echo "usage: $me URL SHA256 OUTPUT" >&2; exit 2; }
url=$1 expected=$(printf %s "$2" | tr A-F a-f) out=$3
case $expected in
    *[!0-9a-f]*|'') echo "$me: PYTHON_SHA256 '$expected' is not a SHA-256 (64 lowercase hex digits)" >&2; exit 2 ;;
esac
[ ${#expected} -eq 64 ] || { echo "$me: PYTHON_SHA256 '$expected' is not a SHA-256 (64 lowercase hex digits)" >&2; exit 2; }

if [ -f "$out" ]; then
    if [ "$(sha256_of "$out")" = "$expected" ]; then
        echo "$out: SHA-256 $expected (downloaded before)"
        exit 0
    fi
    rm -f "$out"     # a stale or damaged copy: never kept next to the pin it does not match
fi
mkdir -p "$(dirname "$out")"
part=$out.part
trap 'rm -f "$part"' EXIT
trap 'exit 1' HUP INT TERM
rm -f "$part"
echo "downloading $url"
curl --fail --silent --show-error --location --retry 3 --output "$part" "$url" || {
    echo "$me: could not download $url (curl failed); nothing kept" >&2
    exit 1
}
got=$(sha256_of "$part")
[ "$got" = "$expected" ] || refuse "$out" "$got" "$expected" "the download from $url (nothing kept)"
mv "$part" "$out"
trap - EXIT
echo "$out: SHA-256 $got"
