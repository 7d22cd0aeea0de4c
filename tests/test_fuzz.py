"""A bounded fuzz run against a real mirror process in front of the seeded upstream.

One seeded run of malformed requests (tests/support/fuzzing.py: paths, references, methods,
Accept, Range/If-Range, hostile headers, query strings, HTTP/1.1 framing, pipelining, early
closes), sent on raw sockets to a mirror whose cache already holds every image named; then each
test below checks one property of what happened. The seed and every failing case are printed;
``DM_FUZZ_SEED=N`` (and ``DM_FUZZ_REQUESTS``) replay a run, ``python -m bench.fuzz --seed N
--requests M --only K`` one case of it. The longer run is ``python -m bench.fuzz``.

Before issue 10 was fixed these tests failed (items 1, 2, 6, 16, 17); each still names the
items it guards.
"""

from __future__ import annotations

import os

import pytest

from tests.conftest import Upstream
from tests.support import fuzzing
from tests.support.procs import Mirror

SEED = int(os.environ.get("DM_FUZZ_SEED", "20261202"))
REQUESTS = int(os.environ.get("DM_FUZZ_REQUESTS", "2000"))
IMAGES = [("library/hello", "latest"), ("library/busybox", "latest"), ("library/alpine", "3"), ("acme/tool", "1.0")]


@pytest.fixture(scope="module")
def fuzzed(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> fuzzing.Report:
    mirror = Mirror(tmp_path_factory.mktemp("fuzz"), {"upstream": {"url": upstream.url, "registry": "docker.io"}})
    mirror.start()
    try:
        targets = fuzzing.warm(mirror.url, IMAGES)
        report = fuzzing.fuzz_mirror(mirror, upstream.registry, targets, seed=SEED, count=REQUESTS)
    finally:
        mirror.stop()
    print(report.text())
    return report


def check(report: fuzzing.Report, *names: str) -> None:
    failed = [f"{name}: {message}" for name in names for message in report.checks.get(name, [])]
    if failed:
        shown = "\n  ".join(failed[:25]) + (f"\n  ... and {len(failed) - 25} more" if len(failed) > 25 else "")
        pytest.fail(f"fuzz seed {report.seed} ({len(report.run.cases)} cases; replay: DM_FUZZ_SEED={report.seed} "
                    f"DM_FUZZ_REQUESTS={len(report.run.cases)}, or python -m bench.fuzz --seed {report.seed} "
                    f"--requests {len(report.run.cases)} --only CASE):\n  {shown}", pytrace=False)


def test_the_mirror_survives(fuzzed):
    check(fuzzed, "process")


def test_no_5xx_and_no_traceback_for_malformed_requests(fuzzed):
    check(fuzzed, "5xx")                    # issue 10 items 6 (Range digits) and 16


def test_every_well_framed_request_is_answered(fuzzed):
    check(fuzzed, "unanswered")             # item 6 (?ns= with CR/LF: dropped connection)


def test_invalid_framing_is_refused(fuzzed):
    check(fuzzed, "invalid framing accepted")


def test_answers_the_spec_asks_for(fuzzed):
    check(fuzzed, "spec")                   # item 16 (.INVALID_MANIFEST_NAME)


def test_descriptors_are_back_to_their_starting_count(fuzzed):
    check(fuzzed, "descriptors")            # item 6


def test_the_index_and_cache_files_are_unchanged(fuzzed):
    check(fuzzed, "index", "cache files")   # items 1 and 2 (Accept-dependent tag rows)


def test_cache_verify_is_clean_and_a_real_pull_still_correct(fuzzed):
    check(fuzzed, "cache verify", "pull")   # item 1 (the tag now points at another manifest)


def test_the_log_has_no_internal_error_and_no_raw_control_character(fuzzed):
    check(fuzzed, "log: internal errors", "log: exceptions", "log: control characters")   # items 16, 17
