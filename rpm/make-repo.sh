#!/bin/sh
# Signed yum and apt repositories from the packages in dist/ (`make repo` runs this).
#
#   OUT/RPM-GPG-KEY-docker-mirror      the public key, armored (yum's gpgkey=, rpm --import)
#   OUT/docker-mirror.gpg              the same key, binary (apt's Signed-By: keyring)
#   OUT/docker-mirror.repo             for /etc/yum.repos.d: gpgcheck=1, repo_gpgcheck=1
#   OUT/docker-mirror.sources          for /etc/apt/sources.list.d (deb822, Signed-By:)
#   OUT/yum/el7/x86_64/                the .el7 RPM (also V3-signed: EL7's rpm 4.11 checks that)
#   OUT/yum/el8/x86_64/, el9/x86_64/   the .el9 RPM (EL8 and EL9 run the same build)
#                                      each: signed RPMs, repodata/ (createrepo_c), repomd.xml.asc
#   OUT/apt/pool/main/d/docker-mirror/ the .debs; OUT/apt/dists/stable/{Release,InRelease,Release.gpg}
#                                      and main/binary-amd64/Packages(.gz)
#
# Input (environment): DIST, BUILD, OUT, REPO_URL, and the signing key: SIGNING_KEY (an exported
# secret key, imported into a throw-away GNUPGHOME under BUILD that is removed afterwards), or
# KEY_HOME (a GnuPG home) with SIGNING_KEY_ID. dist/'s own packages are never modified: the RPMs
# are signed as copies.
set -eu

say() { echo "make repo: $*"; }
die() { echo "make repo: $*" >&2; exit 2; }

[ -n "${REPO_URL:-}" ] ||
    die "set REPO_URL to where $OUT will be published (e.g. REPO_URL=https://packages.example.com/docker-mirror)"
REPO_URL=${REPO_URL%/}
mkdir -p "$BUILD"
DIST=$(cd "$DIST" 2>/dev/null && pwd) || die "no $DIST directory: build the packages first (make deb rpm)"
BUILD=$(cd "$BUILD" && pwd)
OUT=$(mkdir -p "$OUT" && cd "$OUT" && pwd)
# OUT is emptied and rebuilt: never a directory that holds anything else
case $OUT in
    / | "$DIST" | "$BUILD" | "$(pwd)" | "$HOME") die "REPO_DIR: $OUT would be emptied; give a directory of its own" ;;
esac
for tool in gpg:gnupg rpmsign:rpm createrepo_c:createrepo-c apt-ftparchive:apt-utils; do
    command -v "${tool%%:*}" >/dev/null || die "${tool%%:*} is missing; install Debian's ${tool#*:} package"
done

ls "$DIST"/docker-mirror_*_amd64.deb "$DIST"/docker-mirror-*.el[79].x86_64.rpm >/dev/null 2>&1 ||
    die "no packages in $DIST: build them first (make deb rpm)"

# --- the signing key ------------------------------------------------------------------
throwaway=""
cleanup() {
    if [ -n "$throwaway" ]; then
        gpgconf --homedir "$throwaway" --kill all 2>/dev/null || true
        rm -rf "$throwaway"
    fi
    rm -rf "$BUILD/repo-rpmdb" "$BUILD/repo-rpmsign.err" "$BUILD/repo-Release"
}
trap cleanup EXIT
trap 'exit 1' INT TERM HUP

if [ -n "${SIGNING_KEY:-}" ]; then
    [ -r "$SIGNING_KEY" ] || die "SIGNING_KEY: cannot read $SIGNING_KEY"
    throwaway=$BUILD/repo-gnupg
    rm -rf "$throwaway"
    mkdir -m 0700 "$throwaway"
    export GNUPGHOME="$throwaway"
    gpg --batch --quiet --import "$SIGNING_KEY" 2>/dev/null || die "SIGNING_KEY: $SIGNING_KEY is not a GnuPG key file"
elif [ -n "${KEY_HOME:-}" ] && [ -n "${SIGNING_KEY_ID:-}" ]; then
    [ -d "$KEY_HOME" ] || die "GNUPGHOME: $KEY_HOME is not a directory"
    export GNUPGHOME="$KEY_HOME"
else
    die "no signing key: set SIGNING_KEY=path/to/secret-key.asc, or GNUPGHOME=dir and SIGNING_KEY_ID=fingerprint"
fi

# the fingerprint of the (primary) secret key meant: SIGNING_KEY_ID if given, else the only one there
keys=$(gpg --batch --with-colons --list-secret-keys ${SIGNING_KEY_ID:+"$SIGNING_KEY_ID"} 2>/dev/null |
       awk -F: '$1 == "sec" {want = 1} $1 == "fpr" && want {print $10; want = 0}')
case $(printf '%s' "$keys" | grep -c .) in
    0) die "no secret key${SIGNING_KEY_ID:+ $SIGNING_KEY_ID} in ${SIGNING_KEY:-$GNUPGHOME}" ;;
    1) FPR=$keys ;;
    *) die "several secret keys in ${SIGNING_KEY:-$GNUPGHOME}; choose one with SIGNING_KEY_ID=fingerprint" ;;
esac
sign() { gpg --batch --yes --quiet --digest-algo SHA256 --local-user "$FPR" "$@"; }

rm -rf "$OUT"
mkdir -p "$OUT"
gpg --batch --armor --export --export-options export-minimal "$FPR" >"$OUT/RPM-GPG-KEY-docker-mirror"
gpg --batch --export --export-options export-minimal "$FPR" >"$OUT/docker-mirror.gpg"

# --- yum --------------------------------------------------------------------------------
# one repository per EL major version, reached through yum's $releasever
rpmdb=$BUILD/repo-rpmdb
rm -rf "$rpmdb" && mkdir -p "$rpmdb"
rpm --dbpath "$rpmdb" --import "$OUT/RPM-GPG-KEY-docker-mirror"
yum_dists=""
for el in 7 8 9; do
    build=el$el
    [ "$el" = 7 ] || build=el9
    set -- "$DIST"/docker-mirror-*."$build".x86_64.rpm
    [ -e "$1" ] || continue
    dir="$OUT/yum/el$el/x86_64"
    mkdir -p "$dir"
    cp "$@" "$dir/"
    # EL7's rpm 4.11 reads no payload digest: give its packages a header+payload (V3) signature too
    v3=""
    [ "$el" = 7 ] && v3=--rpmv3
    # (rpmsign warns when GPG_TTY is unset, as under make without a terminal: that line is dropped)
    rpmsign --addsign $v3 --define "__gpg $(command -v gpg)" --define "_gpg_path $GNUPGHOME" \
        --define "_gpg_name $FPR" --define "_gpg_digest_algo sha256" "$dir"/*.rpm \
        >/dev/null 2>"$BUILD/repo-rpmsign.err" ||
        { cat "$BUILD/repo-rpmsign.err" >&2; die "rpmsign failed"; }
    grep -v "Could not set GPG_TTY" "$BUILD/repo-rpmsign.err" >&2 || true
    for rpm in "$dir"/*.rpm; do
        rpm --dbpath "$rpmdb" -K "$rpm" | grep -q ": digests signatures OK$" ||
            die "$rpm: no good signature after signing: $(rpm --dbpath "$rpmdb" -K "$rpm")"
    done
    createrepo_c --quiet --general-compress-type gz "$dir" >/dev/null
    sign --armor --detach-sign --output "$dir/repodata/repomd.xml.asc" "$dir/repodata/repomd.xml"
    yum_dists="$yum_dists el$el"
done

if [ -n "$yum_dists" ]; then
    cat >"$OUT/docker-mirror.repo" <<EOF
# docker-mirror: put this file in /etc/yum.repos.d/ (EL7, EL8, EL9)
# RHEL 7 and Oracle Linux 7 call their release 7Server: there, write el7 for el\$releasever
[docker-mirror]
name=docker-mirror for EL\$releasever
baseurl=$REPO_URL/yum/el\$releasever/\$basearch/
enabled=1
gpgcheck=1
repo_gpgcheck=1
gpgkey=$REPO_URL/RPM-GPG-KEY-docker-mirror
EOF
    say "yum repositories:$yum_dists"
else
    say "no RPMs in $DIST: no yum repository"
fi

# --- apt ----------------------------------------------------------------------------------
set -- "$DIST"/docker-mirror_*_amd64.deb
if [ -e "$1" ]; then
    apt="$OUT/apt"
    mkdir -p "$apt/pool/main/d/docker-mirror" "$apt/dists/stable/main/binary-amd64"
    cp "$@" "$apt/pool/main/d/docker-mirror/"
    (cd "$apt" && apt-ftparchive packages pool/main >dists/stable/main/binary-amd64/Packages)
    gzip -9 -n -k "$apt/dists/stable/main/binary-amd64/Packages"
    (cd "$apt/dists/stable" && apt-ftparchive \
        -o APT::FTPArchive::Release::Origin=docker-mirror -o APT::FTPArchive::Release::Label=docker-mirror \
        -o APT::FTPArchive::Release::Suite=stable -o APT::FTPArchive::Release::Codename=stable \
        -o APT::FTPArchive::Release::Architectures=amd64 -o APT::FTPArchive::Release::Components=main \
        -o "APT::FTPArchive::Release::Description=docker-mirror packages" \
        release . >"$BUILD/repo-Release")
    mv "$BUILD/repo-Release" "$apt/dists/stable/Release"
    sign --clearsign --output "$apt/dists/stable/InRelease" "$apt/dists/stable/Release"
    sign --armor --detach-sign --output "$apt/dists/stable/Release.gpg" "$apt/dists/stable/Release"
    cat >"$OUT/docker-mirror.sources" <<EOF
# docker-mirror: put this file in /etc/apt/sources.list.d/ and docker-mirror.gpg in /etc/apt/keyrings/
Types: deb
URIs: $REPO_URL/apt
Suites: stable
Components: main
Architectures: amd64
Signed-By: /etc/apt/keyrings/docker-mirror.gpg
EOF
    say "apt repository: $(ls "$apt/pool/main/d/docker-mirror" | tr '\n' ' ')"
else
    say "no .deb in $DIST: no apt repository"
fi

say "signed with $FPR; publish $OUT as $REPO_URL (the key's fingerprint is what users check)"
