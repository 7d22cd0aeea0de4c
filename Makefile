# Packages of docker-mirror. Everything lands in dist/.
#
#   make wheelhouse                  the only step that uses the network: pinned dependencies
#                                    (requirements.lock) as manylinux2014 wheels, for PYVER
#   make deb                         Debian 12 / Ubuntu 24.04 .deb (dh-virtualenv on python3)
#   make rpm                         EL8/EL9 RPM: a venv on the system's python$(PYVER)
#   make rpm-el7                     EL7 RPM bundling CPython in /opt/docker-mirror/python: the
#                                    python-build-standalone "install_only" tarball pinned below
#                                    (PYTHON_URL, PYTHON_SHA256), downloaded into build/python/
#                                    and refused when its SHA-256 differs
#   make python-tarball              only that download and check (the network, like wheelhouse)
#   make rpm-el7 PYTHON_TARBALL=F    bundle the install_only tarball F instead, used as given
#                                    (its SHA-256 is printed; checked when PYTHON_SHA256 is given too)
#   make repo REPO_URL=... SIGNING_KEY=key.asc   signed yum (el7, el8, el9) and apt repositories in
#                                    dist/repo from the packages in dist/, to publish as REPO_URL;
#                                    or GNUPGHOME=dir SIGNING_KEY_ID=fingerprint instead of SIGNING_KEY
#
# Options: REPO_DIR (dist/repo), PYVER (3.11), DEB_VERSION / RPM_RELEASE (rebuilds with a higher version),
# ALLOW_NEWER_GLIBC_PYTHON=1 (accept a bundled interpreter built against a newer glibc:
# only for the stand-in from rpm/standin-python.sh, which cannot run on EL7 anyway).

VERSION      := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' dockermirror/__init__.py)
PYVER        ?= 3.11
BUILD        := build
DIST         := dist
TOOLS        := $(BUILD)/tools
PIP          := $(TOOLS)/bin/python -m pip --disable-pip-version-check --quiet
RPM_RELEASE  ?= 1
DEB_VERSION  ?=
WHEELS        = $(BUILD)/wheelhouse-py$(PYVER)
REPO_DIR     ?= $(DIST)/repo
# The interpreter of the EL7 RPM. To move to a newer build: take the asset's URL and the SHA-256
# published with the release of astral-sh/python-build-standalone, set both here,
# `make python-tarball`, then `make rpm-el7` and the package tests (README: Building packages).
PYTHON_URL     ?= https://github.com/astral-sh/python-build-standalone/releases/download/20251014/cpython-3.12.12%2B20251014-x86_64-unknown-linux-gnu-install_only.tar.gz
PYTHON_SHA256  ?= 1ab2b6594d1c3d76cbebea09d6bc3e6ba68d8eb3b6322080375c4cc3dd188f34
PYTHON_TARBALL ?=
PYTHON_DOWNLOAD = $(BUILD)/python/$(subst %2B,+,$(notdir $(PYTHON_URL)))
EL7_PYTHON      = $(or $(PYTHON_TARBALL),$(PYTHON_DOWNLOAD))

.PHONY: all wheelhouse deb rpm rpm-sources python-tarball rpm-el7 repo clean
all: deb rpm

$(TOOLS)/bin/python:
	/usr/bin/python3 -m venv $(TOOLS)

# --- wheelhouse (network) -----------------------------------------------------------

wheelhouse: $(WHEELS)/.complete

$(WHEELS)/.complete: requirements.lock | $(TOOLS)/bin/python
	rm -rf $(WHEELS) && mkdir -p $(WHEELS)
	grep -v -E '^(#|sdnotify)' requirements.lock > $(BUILD)/binary-requirements.txt
	$(PIP) download --only-binary=:all: --no-deps -d $(WHEELS) -r $(BUILD)/binary-requirements.txt \
	    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
	    --python-version $(PYVER) --implementation cp --abi cp$(subst .,,$(PYVER)) --abi abi3 --abi none
	$(PIP) wheel --use-pep517 --no-deps -w $(WHEELS) "$$(grep '^sdnotify==' requirements.lock)"   # sdist only: pure Python
	$(PIP) download --only-binary=:all: --no-deps -d $(WHEELS) setuptools wheel        # to build the app offline
	python3 rpm/glibc-floor.py --max 2.17 $(WHEELS)
	touch $@

# The application's own wheel, built offline from the wheelhouse.
$(BUILD)/app/docker_mirror-$(VERSION)-py3-none-any.whl: $(WHEELS)/.complete $(shell git ls-files dockermirror pyproject.toml 2>/dev/null)
	rm -rf $(BUILD)/app && mkdir -p $(BUILD)/app
	$(PIP) wheel --no-deps --no-index --find-links $(WHEELS) -w $(BUILD)/app .

# --- deb ----------------------------------------------------------------------------

DEB_SRC := $(BUILD)/deb/docker-mirror-$(VERSION)

deb: $(WHEELS)/.complete
	rm -rf $(BUILD)/deb && mkdir -p $(DEB_SRC) $(DIST)
	git ls-files -z | xargs -0 cp --parents -t $(DEB_SRC)
	cp -r $(WHEELS) $(DEB_SRC)/wheelhouse
	if [ -n "$(DEB_VERSION)" ]; then cd $(DEB_SRC) && DEBFULLNAME="docker-mirror build" \
	    DEBEMAIL=maintainers@users.noreply.r-seed-7d2fe5c4.example dch --preserve --newversion $(DEB_VERSION) --distribution unstable "Rebuild."; fi
	cd $(DEB_SRC) && dpkg-buildpackage -us -uc -b
	cp $(BUILD)/deb/docker-mirror_*.deb $(DIST)/
	lintian --fail-on error,warning $(BUILD)/deb/docker-mirror_*.deb

# --- rpm ----------------------------------------------------------------------------

RPMTOP    := $(abspath $(BUILD)/rpm)
# Debian's rpm lacks EL's systemd macros and %rhel: supply EL7's definitions (rpm/macros.el).
RPM_MACROS = $(if $(filter /usr/lib/systemd/system,$(shell rpm --eval '%{_unitdir}')),,--load rpm/macros.el)
RPMBUILD   = rpmbuild --nodeps $(RPM_MACROS) --define "_topdir $(RPMTOP)" --define "version_ $(VERSION)" \
             --define "release_ $(RPM_RELEASE)" --define "pip $(CURDIR)/$(TOOLS)/bin/python -m pip"

$(RPMTOP)/SOURCES/docker-mirror-$(VERSION).tar.gz: $(shell git ls-files 2>/dev/null)
	mkdir -p $(RPMTOP)/SOURCES
	git ls-files -z | tar -czf $@ --null -T - --transform 's,^,docker-mirror-$(VERSION)/,'


rpm-sources: $(RPMTOP)/SOURCES/docker-mirror-$(VERSION).tar.gz $(BUILD)/app/docker_mirror-$(VERSION)-py3-none-any.whl
	rm -rf $(RPMTOP)/wheels && mkdir -p $(RPMTOP)/wheels
	cp $(WHEELS)/*.whl $(BUILD)/app/*.whl $(RPMTOP)/wheels/
	tar -czf $(RPMTOP)/SOURCES/wheelhouse-py$(PYVER).tar.gz -C $(RPMTOP) wheels

rpm: rpm-sources
	mkdir -p $(DIST)
	$(RPMBUILD) --define "pyver $(PYVER)" --define "dist .el9" -bb rpm/docker-mirror.spec
	cp $(RPMTOP)/RPMS/x86_64/docker-mirror-$(VERSION)-$(RPM_RELEASE).el9.x86_64.rpm $(DIST)/
	rpmlint -r rpm/docker-mirror.rpmlintrc $(DIST)/docker-mirror-$(VERSION)-$(RPM_RELEASE).el9.x86_64.rpm

# The EL7 interpreter: the pinned download (kept in build/python/ while its checksum matches),
# or PYTHON_TARBALL as given. The pin guards what comes from the network; a tarball named on the
# command line is the builder's own (a local build, a mirror's copy, the tests' stand-in) and is
# checked only against a PYTHON_SHA256 given with it (command line or environment).
python-tarball:
ifeq ($(PYTHON_TARBALL),)
	sh rpm/fetch-python.sh '$(PYTHON_URL)' '$(PYTHON_SHA256)' '$(PYTHON_DOWNLOAD)'
else ifneq ($(origin PYTHON_SHA256),file)
	sh rpm/fetch-python.sh --check '$(PYTHON_SHA256)' '$(PYTHON_TARBALL)'
else
	@echo "$(PYTHON_TARBALL): SHA-256 $$(sha256sum '$(PYTHON_TARBALL)' | cut -d' ' -f1) (PYTHON_TARBALL, not checked: set PYTHON_SHA256 to check it)"
endif

# python/lib/python3.X/os.py names the interpreter's version (the wheels and the venv follow it)
EL7_PYVER = tar -tzf '$(EL7_PYTHON)' | sed -n 's|^python/lib/python\(3\.[0-9]*\)/os.py$$|\1|p'

rpm-el7: python-tarball
	@test -n "$$($(EL7_PYVER))" || { echo "$(EL7_PYTHON): not a CPython install_only tarball (no python/lib/python3.X/os.py)" >&2; exit 2; }
	$(MAKE) rpm-sources PYVER=$$($(EL7_PYVER))
	cp '$(EL7_PYTHON)' $(RPMTOP)/SOURCES/python-install-only.tar.gz
	if [ -z "$(ALLOW_NEWER_GLIBC_PYTHON)" ]; then python3 rpm/glibc-floor.py --max 2.17 '$(EL7_PYTHON)'; fi
	mkdir -p $(DIST)
	$(RPMBUILD) --with bundled_python --define "pyver $$($(EL7_PYVER))" --define "dist .el7" -bb rpm/docker-mirror.spec
	cp $(RPMTOP)/RPMS/x86_64/docker-mirror-$(VERSION)-$(RPM_RELEASE).el7.x86_64.rpm $(DIST)/
	rpmlint -r rpm/docker-mirror-el7.rpmlintrc $(DIST)/docker-mirror-$(VERSION)-$(RPM_RELEASE).el7.x86_64.rpm

# --- repositories -------------------------------------------------------------------
# rpm/make-repo.sh says what lands where. The key is an input, never a file of the clone:
# SIGNING_KEY is imported into a throw-away GnuPG home under build/ that is removed afterwards.

repo:
	@DIST=$(DIST) BUILD=$(BUILD) OUT=$(REPO_DIR) REPO_URL="$(REPO_URL)" SIGNING_KEY="$(SIGNING_KEY)" \
	    KEY_HOME="$(GNUPGHOME)" SIGNING_KEY_ID="$(SIGNING_KEY_ID)" sh rpm/make-repo.sh

clean:
	rm -rf $(BUILD) $(DIST)
