"""CentOS 7's registries.conf rewrite (client-setup --for el7), pasted with tests/support/pasted.py:
hand edits to the written file survive a second paste as a copy, a registry both insecure and
blocked in the v1 file becomes one entry, a refused conversion leaves no copy behind, and the v1
lists EL7's docker package took as flags are printed as /etc/sysconfig/docker lines."""

from __future__ import annotations

import tomllib

from tests.support.pasted import run_pasted
from tests.unit.test_clientsetup_targets import BACKUP, CONF, EL7_SEARCH, EL7_V1, TWO, assert_podman_1_6_reads, \
    paste_el7, steps

PREV = CONF + ".docker-mirror-prev"
HAND_EDIT = '\n[[registry]]\nlocation = "registry.internal:5000"\ninsecure = true\n'


def v1_with(insecure: str = "", block: str = "") -> str:
    return (EL7_V1.replace("[registries.insecure]\nregistries = []", f"[registries.insecure]\nregistries = [{insecure}]")
            .replace("[registries.block]\nregistries = []", f"[registries.block]\nregistries = [{block}]"))


def test_hand_edits_survive_a_second_paste(tmp_path):
    first = paste_el7(tmp_path, {CONF: EL7_V1})
    conf = tmp_path / "pasted" / CONF.lstrip("/")
    conf.write_text(first.files[CONF] + HAND_EDIT)
    second = run_pasted(steps("el7", registries=TWO), tmp_path / "pasted")
    assert second.files[CONF] == first.files[CONF]          # written again from the v1 copy
    assert second.files[PREV] == first.files[CONF] + HAND_EDIT
    assert second.files[BACKUP] == EL7_V1
    assert (f"docker-mirror: {CONF} differs from what these steps write (edited by hand, or written for other "
            f"registries): kept as {PREV}; add your edits to the new {CONF}") in second.stderr.splitlines()
    # pasted once more, nothing changed since: no copy made, nothing said about one
    (tmp_path / "pasted" / PREV.lstrip("/")).unlink()
    third = run_pasted(steps("el7", registries=TWO), tmp_path / "pasted")
    assert third.files[CONF] == first.files[CONF] and PREV not in third.files
    assert "differs" not in third.stderr


def test_a_registry_both_insecure_and_blocked_is_one_entry(tmp_path):
    v1 = v1_with(insecure="'x.example', 'registry.internal:5000'", block="'evil.example', 'x.example'")
    result = paste_el7(tmp_path, {CONF: v1})
    entries = assert_podman_1_6_reads(result.files[CONF])
    locations = [entry["location"] for entry in entries]
    assert len(locations) == len(set(locations))       # containers/image: "defined multiple times"
    assert entries[:3] == [{"location": "x.example", "insecure": True, "blocked": True},
                           {"location": "registry.internal:5000", "insecure": True},
                           {"location": "evil.example", "blocked": True}]


def test_a_refused_conversion_leaves_no_copy(tmp_path):
    blocked = v1_with(block="'docker.io'")
    first = paste_el7(tmp_path, {CONF: blocked})
    assert first.files[CONF] == blocked and BACKUP not in first.files
    assert (f"docker-mirror: {CONF} lists docker.io as insecure or blocked, and the mirror serves it: merge "
            "/etc/containers/docker-mirror.registries.conf into /etc/containers/registries.conf by hand"
            in first.stderr)
    # the admin removes the clash and pastes again: converted, the copy is the file as it is now
    (tmp_path / "pasted" / CONF.lstrip("/")).write_text(EL7_V1)
    second = run_pasted(steps("el7", registries=TWO), tmp_path / "pasted")
    assert second.files[BACKUP] == EL7_V1
    assert second.files[CONF].startswith("# written by docker-mirror client-setup")
    assert tomllib.loads(second.files[CONF])["unqualified-search-registries"] == EL7_SEARCH


def test_the_docker_package_flags_of_the_v1_file_are_printed(tmp_path):
    v1 = v1_with(insecure="'registry.internal:5000', '10.0.0.5:5000'", block="'evil.example'")
    head = ("docker-mirror: EL7's docker package took the lists of the v1 file "
            f"({BACKUP}) as flags, through registries.service, which cannot read the v2 file: to keep them, put in "
            "/etc/sysconfig/docker (then systemctl restart docker):")
    add = "ADD_REGISTRY='" + " ".join(f"--add-registry {name}" for name in EL7_SEARCH) + "'"
    block = "BLOCK_REGISTRY='--block-registry evil.example'"
    result = paste_el7(tmp_path, {CONF: v1}, name="tls")
    assert result.stderr.splitlines() == [
        head, add, block, "INSECURE_REGISTRY='--insecure-registry registry.internal:5000 --insecure-registry "
        "10.0.0.5:5000'"]
    # plain HTTP: daemon.json has insecure-registries, and the flag with it would stop dockerd
    result = paste_el7(tmp_path, {CONF: v1}, tls=False, name="plain")
    assert result.stderr.splitlines() == [
        head, add, block, 'and add "registry.internal:5000", "10.0.0.5:5000" to "insecure-registries" in '
        "/etc/docker/daemon.json (INSECURE_REGISTRY= there would clash with it: dockerd would not start)"]
    # no v1 file, or one with empty lists: nothing to say
    assert paste_el7(tmp_path, {}, name="none").stderr == ""
    empty = EL7_V1.replace("registries = ['registry.access.redhat.com', 'docker.io', 'registry.fedoraproject.org', "
                           "'quay.io', 'registry.centos.org']", "registries = []")
    assert paste_el7(tmp_path, {CONF: empty}, name="empty").stderr == ""
