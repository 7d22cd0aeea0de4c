"""Issue 14: three docker-mirror nodes behind a balancer configured by ``docker-mirror lb-config``.

Three nodes on 127.0.0.1, each with its own cache, one upstream (Debian's docker-registry, seeded
with ten small images that share layers across images and across repository names:
tests/support/cluster.py), HAProxy or nginx in front. Three skopeo clients pull all ten images at
once through the balancer. Then one node is killed (SIGKILL) and three fresh clients pull them all
again. What is asserted is what the upstream saw (its access log), what each node's cache holds,
and the bytes the clients wrote: each blob is fetched from the upstream once for the whole cluster
and lives on one node; losing a node costs its share of blobs, fetched again once each, and
nothing else. The node is started again on the same cache: it gets its own share back, and the
upstream is asked nothing.

That these tests catch broken routing can be seen with a hand-written configuration instead of
``lb-config``'s (tests/support/cluster.py ``hand_config``): ``DM_CLUSTER_BALANCE=roundrobin`` (keys
ignored) or ``=uri`` (a layer routed by repository and digest) fail the first pull's counts; ``=map``
(no consistent hashing) fails HAProxy once a node is lost (nginx's plain ``hash`` keeps the other
nodes' keys where they are while one is down: it passes); ``=hash`` (routing as it should be) passes.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

from tests.support.balancers import haproxy_binary, nginx_binary
from tests.support.cluster import Cluster, ClusterUpstream, hand_config, pull_all, seed
from tests.support.procs import Registry


@pytest.fixture(scope="module")
def cluster_upstream(tmp_path_factory: pytest.TempPathFactory) -> ClusterUpstream:
    work = tmp_path_factory.mktemp("cluster-upstream")
    up = ClusterUpstream(Registry(work / "registry"))
    up.registry.start()
    try:
        yield seed(up, work)
    finally:
        up.registry.stop()


@pytest.fixture(params=["haproxy", "nginx"])
def cluster(request: pytest.FixtureRequest, tmp_path: Path, cluster_upstream: ClusterUpstream) -> Cluster:
    (haproxy_binary if request.param == "haproxy" else nginx_binary)()     # skips if not unpacked
    balance = os.environ.get("DM_CLUSTER_BALANCE")      # see above: the tests' own check
    configure = functools.partial(hand_config, balance=balance) if balance else None
    cluster = Cluster(tmp_path, cluster_upstream, request.param, configure=configure)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def _once_each(counts, expected: set[str], what: str) -> str:
    """What differs from each of ``expected`` asked of the upstream exactly once (and nothing else)."""
    problems = [f"{what} {key}: {counts[key]} times, expected once" for key in sorted(expected) if counts[key] != 1]
    problems += [f"{what} {key}: {n} times, expected never" for key, n in sorted(counts.items()) if key not in expected]
    return "\n".join(problems)


def _at_most_once(counts, allowed: set[str], what: str) -> str:
    """What was asked of the upstream more than once, or was not in ``allowed``."""
    problems = [f"{what} {key}: {n} times, expected at most once" for key, n in sorted(counts.items()) if n > 1]
    problems += [f"{what} {key}: {n} times, expected never" for key, n in sorted(counts.items()) if key not in allowed]
    return "\n".join(problems)


def _on_one_node(cluster: Cluster, digests: set[str], nodes) -> str:
    """Each digest committed to exactly one of ``nodes``; else what is wrong."""
    cluster.wait_stored(digests, nodes)
    stored = {d: cluster.holders(d, nodes) for d in sorted(digests)}
    return "\n".join(f"{d} stored on {names or 'no node'}" for d, names in stored.items() if len(names) != 1)


def test_each_blob_fetched_once_per_cluster_and_a_lost_node_costs_its_share(cluster: Cluster, tmp_path: Path):
    up = cluster.upstream
    blobs = up.blobs
    # the plan does what it says: layers carried by several repositories
    shared = {d for d in blobs if sum(d in p.blobs for p in up.pullables) > 1}
    assert len(blobs) > 20 and len(shared) >= 6

    # three clients, ten images, all at once, through the balancer
    mark = up.mark()
    problems = pull_all(cluster.address, up.pullables, tmp_path / "first")
    assert not problems, "\n".join(problems) + "\n" + cluster.logs()
    # blobs by digest: from the upstream once for the whole cluster, kept by one node
    assert not (wrong := _once_each(up.blob_gets(mark), blobs, "GET blob")), wrong
    assert not (wrong := _on_one_node(cluster, blobs, cluster.nodes)), wrong
    # manifests by repository: each tag asked once for the cluster; each manifest downloaded at most
    # once per repository (not at all when its node has it from another repository: mirror/alpha)
    assert not (wrong := _once_each(up.tag_heads(mark), up.tags_of(up.repos), "HEAD tag")), wrong
    assert not (wrong := _at_most_once(up.manifest_gets(mark), up.manifests_of(up.repos), "GET manifest")), wrong

    # the node holding most blobs dies (SIGKILL); three fresh clients pull everything again
    victim = max(cluster.nodes, key=lambda node: len(cluster.held(node, blobs)))
    lost, lost_repos = cluster.held(victim, blobs), cluster.manifest_repos(victim)
    assert lost and lost_repos <= up.repos
    victim.kill()
    survivors = cluster.live()
    mark = up.mark()
    problems = pull_all(cluster.address, up.pullables, tmp_path / "second")
    assert not problems, "\n".join(problems) + "\n" + cluster.logs()
    # what it held comes from the upstream again, once each, onto one survivor; nothing else does
    assert not (wrong := _once_each(up.blob_gets(mark), lost, "GET blob after the loss")), wrong
    assert not (wrong := _on_one_node(cluster, blobs, survivors)), wrong
    # its repositories' tags are revalidated on the next node, once; the others' are not asked for
    assert not (wrong := _once_each(up.tag_heads(mark), up.tags_of(lost_repos), "HEAD tag after the loss")), wrong
    assert not (wrong := _at_most_once(up.manifest_gets(mark), up.manifests_of(lost_repos),
                                       "GET manifest after the loss")), wrong

    # the node comes back on its cache: once the balancer sends it its keys again, it serves its
    # own share again (every blob it had, nothing else) and the upstream is asked nothing
    offset = len(victim.log_text())
    victim.restart()
    probe = next(p for p in up.pullables if lost & p.blobs)
    cluster.back_in_rotation(victim, probe, min(lost & probe.blobs))
    mark = up.mark()
    problems = pull_all(cluster.address, up.pullables, tmp_path / "third")
    assert not problems, "\n".join(problems) + "\n" + cluster.logs()
    assert not (asked := up.registry.requests(mark)), "asked of the upstream after the return:\n" + "\n".join(asked)
    served = cluster.blobs_served(victim, offset)
    assert served == lost, f"back, it served {sorted(served - lost)} it did not have; not {sorted(lost - served)}"
