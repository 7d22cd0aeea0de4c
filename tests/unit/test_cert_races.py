"""`cert init` / `cert ensure` run at the same time (the package script and an admin, two
terminals): whatever order they run in, the CA key matches ca.crt, the server certificate is
signed by the CA and its key matches it, and what each run prints is what it did."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from dockermirror import cli
from dockermirror.service import certs  # noqa: F401  (imported once here, not in every child)
from dockermirror.service.tls import check

cli.parser()    # its imports too

RUNS = 3
ROUNDS = 20          # init; ensure runs half as many


def concurrently(workdir: Path, argvs: list[list[str]]) -> list[tuple[int, str, str]]:
    """Each argv run by cli.main in a forked child; the children start together (a pipe they all
    wait on), so their loads, writes and renames overlap. (status, stdout, stderr) for each."""
    go_read, go_write = os.pipe()
    children = []
    for number, argv in enumerate(argvs):
        out, err = workdir / f"out{number}", workdir / f"err{number}"
        pid = os.fork()
        if pid == 0:    # the child: never returns into pytest
            status = 70
            try:
                os.close(go_write)
                os.read(go_read, 1)         # returns when the parent closes the pipe
                for fd, path in ((1, out), (2, err)):
                    os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
                import sys
                sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115  (the child's, until os._exit)
                sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
                status = cli.main(argv)
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(status)
        children.append((pid, out, err))
    os.close(go_read)
    os.close(go_write)                      # every child starts now
    results = []
    for pid, out, err in children:
        _, wait_status = os.waitpid(pid, 0)
        results.append((os.waitstatus_to_exitcode(wait_status), out.read_text(), err.read_text()))
    return results


def public(key_or_cert) -> bytes:
    return key_or_cert.public_key().public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)


def assert_consistent(directory: Path) -> x509.Certificate:
    """The CA key matches ca.crt; the server certificate is signed by ca.crt and
    its key matches it (the server's own check); no temporary file is left."""
    ca = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((directory / "private" / "ca.key").read_bytes(), None)
    assert public(ca) == public(ca_key), "the CA key does not match ca.crt"
    server = directory / "server"
    certificate = x509.load_pem_x509_certificates((server / "docker-mirror.crt").read_bytes())[0]
    certificate.verify_directly_issued_by(ca)      # InvalidSignature / ValueError if not
    check(server / "docker-mirror.crt", server / "docker-mirror.key")
    leftovers = [p.name for d in (directory, directory / "private", server) for p in d.iterdir()
                 if p.name.startswith(".")]
    assert leftovers == []
    return certificate


def serials(out: str) -> list[str]:
    return re.findall(r"\(serial ([0-9a-f]+), valid until", out)


@pytest.mark.parametrize("command", ["init", "ensure"])
def test_runs_at_the_same_time_leave_a_working_ca_and_say_what_they_did(tmp_path: Path, command: str):
    config = tmp_path / "empty.yml"
    config.write_text("{}\n")
    for round_number in range(ROUNDS if command == "init" else ROUNDS // 2):
        directory = tmp_path / f"round{round_number}" / "pki"
        argv = ["cert", command, "--config", str(config), "--dir", str(directory), "--hostname", "m.example"]
        results = concurrently(tmp_path, [argv] * RUNS)
        for status, _, err in results:
            assert (status, err) == (0, ""), (round_number, results)
        certificate = assert_consistent(directory)
        created = [out for _, out, _ in results if "created a private CA" in out]
        assert len(created) == 1, (round_number, results)      # one CA was made, by one run
        issued = [serial for _, out, _ in results for serial in serials(out)]
        if command == "init":
            assert len(issued) == RUNS, results                 # each run issued one
        else:
            assert len(issued) == 1, results                    # the others found it there
            assert sum("exists already" in out for _, out, _ in results) == RUNS - 1, results
        assert f"{certificate.serial_number:x}" in issued       # the one in place is one a run reported
