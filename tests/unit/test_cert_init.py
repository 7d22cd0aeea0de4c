"""`docker-mirror cert init|ensure|show` in-process: all or nothing, the default name, --dir,
the CA key in private/ (and an older install's ca.key), what ensure tells a package's user,
and one line with the flag or file for every mistake."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from dockermirror import cli, config as configuration
from dockermirror.service import certs, clientcerts
from dockermirror.service.tls import check, sans


def listing(root: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every file and directory under root: mode and content."""
    found = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory) / name
            info = path.lstat()
            found[str(path.relative_to(root))] = (info.st_mode, path.read_bytes() if stat.S_ISREG(info.st_mode)
                                                  else None)
    return found


def run(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    status = cli.main(["cert", *args])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """tmp_path/etc/config.yml naming tls: paths under tmp_path/pki (nothing there yet)."""
    (tmp_path / "etc").mkdir()
    (tmp_path / "pki").mkdir()
    write_config(tmp_path, {})
    return tmp_path


def write_config(site: Path, extra: dict, **tls: str) -> Path:
    config = site / "etc" / "config.yml"
    paths = {"certificate": str(site / "pki" / "certs" / "docker-mirror.crt"),
             "key": str(site / "pki" / "private" / "docker-mirror.key"),
             "ca": str(site / "pki" / "docker-mirror" / "ca.crt"), **tls}
    config.write_text(yaml.safe_dump({**extra, "tls": paths}))
    return config


def names_in(path: Path) -> list[str]:
    return sans(x509.load_pem_x509_certificates(path.read_bytes())[0])


def one_error_line(err: str) -> str:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# --- all or nothing


def test_a_server_key_that_cannot_be_written_leaves_no_ca_behind(site: Path, capsys):
    (site / "pki" / "private").write_text("a file where the key's directory should be\n")
    before = listing(site)
    status, out, err = run(capsys, "init", "--config", str(site / "etc" / "config.yml"), "--hostname", "m.example")
    assert status == 1 and out == ""
    assert one_error_line(err) == (f"docker-mirror: {site}/pki/private/docker-mirror.key: Not a directory: "
                                   "nothing was changed\n")
    assert listing(site) == before          # no CA, no private/, no temporary file


def test_a_failure_keeps_the_existing_ca_and_certificate_as_they_were(site: Path, capsys):
    config = str(site / "etc" / "config.yml")
    assert run(capsys, "init", "--config", config, "--hostname", "m.example")[0] == 0
    # the certificate's directory becomes a file: the new key is written, the certificate cannot be
    cert_dir = site / "pki" / "certs"
    os.rename(cert_dir, site / "certs-away")
    cert_dir.write_text("in the way\n")
    before = listing(site)
    status, out, err = run(capsys, "init", "--config", config, "--hostname", "other.example")
    assert status == 1 and out == ""
    assert one_error_line(err) == f"docker-mirror: {cert_dir}/docker-mirror.crt: Not a directory: nothing was changed\n"
    assert listing(site) == before          # the key (written before) is not replaced either


@pytest.mark.parametrize("args, flag", [
    (["--hostname", "bad name"], "--hostname: 'bad name' is not a DNS name"),
    (["--hostname", "x-.example"], "--hostname: 'x-.example' is not a DNS name"),
    (["--hostname", "10.1.2.3"], "--hostname: 10.1.2.3 is an IP address; give it with --ip 10.1.2.3"),
    (["--ip", "10.1.2"], "--ip: '10.1.2' is not an IP address; give one such as 10.1.2.3"),
    (["--hostname", "m.example", "--days", "0"], "--days: 0 is not a number of days"),
    (["--hostname", "m.example", "--days", "5000"], "--days: the CA expires on "),
    (["--hostname", "m.example", "--days", "999999999"], "--days: 999999999 is more than 36500 days; give 1 to "
                                                         "36500 (default 825)"),
    (["--hostname", "m.example", "--days", "-5"], "--days: -5 is not a number of days; give 1 to 36500"),
    (["--ip", "fd00::5%eth0"], "--ip: 'fd00::5%eth0' is a scoped address (%eth0): a certificate cannot hold the "
                               "scope; give the address without it"),
])
def test_a_bad_flag_is_a_usage_error_and_writes_nothing(site: Path, capsys, args: list[str], flag: str):
    before = listing(site)
    status, out, err = run(capsys, "init", "--config", str(site / "etc" / "config.yml"), *args)
    assert status == 2 and out == ""
    assert one_error_line(err).startswith(f"docker-mirror: {flag}")
    assert listing(site) == before


def test_a_configured_hostname_that_is_no_dns_name_is_named_with_its_file(site: Path, capsys):
    config = write_config(site, {"hostname": "my_mirror!"})
    before = listing(site)
    status, _, err = run(capsys, "init", "--config", str(config))
    assert status == 2
    # refused where the configuration is read (as check-config and serve do), with its line
    assert one_error_line(err) == (f"docker-mirror: {config}:1: hostname: 'my_mirror!' is not a DNS name or an IP "
                                   "address; give the name clients use, e.g. mirror.example.com\n")
    assert listing(site) == before


# --- the CA key in private/


def test_the_ca_key_is_in_private_and_the_ca_directory_holds_no_key(site: Path, capsys):
    assert run(capsys, "init", "--config", str(site / "etc" / "config.yml"), "--hostname", "m.example")[0] == 0
    ca_dir = site / "pki" / "docker-mirror"
    assert sorted(p.name for p in ca_dir.iterdir()) == ["ca.crt", "private"]
    assert stat.S_IMODE((ca_dir / "private").stat().st_mode) == 0o700
    assert stat.S_IMODE((ca_dir / "private" / "ca.key").stat().st_mode) == 0o600
    assert not list(ca_dir.glob("*.key"))


def older_install(site: Path, capsys) -> certs.Paths:
    """A CA as versions before private/ left it: ca.key beside ca.crt."""
    config = str(site / "etc" / "config.yml")
    assert run(capsys, "init", "--config", config, "--hostname", "m.example")[0] == 0
    ca_dir = site / "pki" / "docker-mirror"
    os.rename(ca_dir / "private" / "ca.key", ca_dir / "ca.key")
    (ca_dir / "private").rmdir()
    return certs.Paths(site / "pki" / "certs" / "docker-mirror.crt", site / "pki" / "private" / "docker-mirror.key",
                       ca_dir / "ca.crt")


def test_an_older_installs_ca_key_still_signs(site: Path, capsys):
    paths = older_install(site, capsys)
    clientcerts.issue_client(paths, "ci", site / "out", days=5)
    issued = x509.load_pem_x509_certificate((site / "out" / "client.cert").read_bytes())
    assert issued.issuer == x509.load_pem_x509_certificate(paths.ca.read_bytes()).subject
    assert not paths.ca_key.exists()


def test_ensure_leaves_an_older_key_where_it_is_and_says_how_to_move_it(site: Path, capsys):
    paths = older_install(site, capsys)
    before = listing(site)
    status, out, _ = run(capsys, "ensure", "--config", str(site / "etc" / "config.yml"))
    assert status == 0 and listing(site) == before
    assert (f"docker-mirror: the CA key is at {paths.legacy_ca_key}, where older versions kept it: it still works; "
            f"move it so that a copy of {paths.ca.parent} as a client's certs.d directory holds no *.key: "
            f"install -d -m 0700 {paths.ca_key.parent} && mv {paths.legacy_ca_key} {paths.ca_key}") in out


def test_init_moves_an_older_key_to_private_and_says_so(site: Path, capsys):
    paths = older_install(site, capsys)
    key = paths.legacy_ca_key.read_bytes()
    ca = paths.ca.read_bytes()
    status, out, _ = run(capsys, "init", "--config", str(site / "etc" / "config.yml"), "--hostname", "m.example")
    assert status == 0
    assert f"moved the CA key {paths.legacy_ca_key} to {paths.ca_key} (mode 0600)" in out
    assert not paths.legacy_ca_key.exists() and paths.ca_key.read_bytes() == key and paths.ca.read_bytes() == ca
    assert stat.S_IMODE(paths.ca_key.parent.stat().st_mode) == 0o700


# --- the default name


def test_init_without_names_takes_the_configured_hostname(site: Path, capsys):
    config = write_config(site, {"hostname": "Mirror.Example.org"})
    status, out, _ = run(capsys, "init", "--config", str(config))
    assert status == 0
    assert names_in(site / "pki" / "certs" / "docker-mirror.crt") == ["mirror.example.org", "localhost",
                                                                     "127.0.0.1", "::1"]
    assert f"name: Mirror.Example.org (hostname: in {config})" in out


def test_a_configured_hostname_that_is_an_address_goes_in_as_one(site: Path, capsys):
    config = write_config(site, {"hostname": "10.9.8.7"})
    assert run(capsys, "init", "--config", str(config))[0] == 0
    assert names_in(site / "pki" / "certs" / "docker-mirror.crt") == ["localhost", "10.9.8.7", "127.0.0.1", "::1"]


def test_without_hostname_the_fqdn_and_it_says_so(site: Path, capsys, monkeypatch):
    monkeypatch.setattr(certs.socket, "getfqdn", lambda: "box.lan.example")
    monkeypatch.setattr(certs.socket, "gethostname", lambda: "box")
    config = site / "etc" / "config.yml"
    status, out, _ = run(capsys, "init", "--config", str(config))
    assert status == 0
    assert names_in(site / "pki" / "certs" / "docker-mirror.crt") == ["box.lan.example", "box", "localhost",
                                                                     "127.0.0.1", "::1"]
    assert (f"name: box.lan.example (this host's FQDN: hostname: is not set in {config}; set it to the name "
            "clients use)") in out


def test_mirror_name_is_the_one_answer_for_every_command(monkeypatch):
    monkeypatch.setattr(certs.socket, "getfqdn", lambda: "box.lan.example")
    assert certs.mirror_name(configuration.loads("hostname: m.example\n", "c.yml")) == certs.MirrorName(
        "m.example", True, "name: m.example (hostname: in c.yml)")
    fallback = certs.mirror_name(configuration.loads("listen: 0.0.0.0:5000\n", "c.yml"))
    assert (fallback.name, fallback.configured) == ("box.lan.example", False)


def test_a_host_name_no_certificate_can_hold_is_left_out(site: Path, capsys, monkeypatch):
    monkeypatch.setattr(certs.socket, "getfqdn", lambda: "under_score.example")
    monkeypatch.setattr(certs.socket, "gethostname", lambda: "under_score")
    assert run(capsys, "init", "--config", str(site / "etc" / "config.yml"))[0] == 0
    assert names_in(site / "pki" / "certs" / "docker-mirror.crt") == ["localhost", "127.0.0.1", "::1"]


# --- --dir


def test_dir_writes_there_and_prints_the_tls_section_that_uses_it(site: Path, capsys, tmp_path: Path):
    before = listing(site / "pki")
    status, out, _ = run(capsys, "init", "--config", str(site / "etc" / "config.yml"), "--dir", str(tmp_path / "try"),
                         "--hostname", "m.example")
    assert status == 0 and listing(site / "pki") == before        # the configured paths are untouched
    section = out[out.index("tls:\n"):]
    assert yaml.safe_load(section) == {"tls": {"certificate": f"{tmp_path}/try/server/docker-mirror.crt",
                                               "key": f"{tmp_path}/try/server/docker-mirror.key",
                                               "ca": f"{tmp_path}/try/ca.crt"}}
    assert sorted(p.name for p in (tmp_path / "try").iterdir()) == ["ca.crt", "private", "server"]
    config = configuration.loads(section, "pasted.yml")
    assert config.tls.active
    assert check(config.tls.certificate, config.tls.key, "m.example").warnings == []
    status, out, _ = run(capsys, "show", "--dir", str(tmp_path / "try"))
    assert status == 0 and "names:    m.example" in out and f"# CA key: {tmp_path}/try/private/ca.key" in out


# --- what ensure says (the package scripts show it)


def test_ensure_says_the_names_the_ca_and_the_next_commands(site: Path, capsys):
    config = write_config(site, {"hostname": "mirror.example.org"})
    pki = site / "pki"
    status, out, _ = run(capsys, "ensure", "--config", str(config))
    assert status == 0
    lines = out.splitlines()
    assert all(line.startswith("docker-mirror: ") for line in lines)
    assert f"docker-mirror: created a private CA: {pki}/docker-mirror/ca.crt" in out
    assert f"issued {pki}/certs/docker-mirror.crt for mirror.example.org, localhost, 127.0.0.1, ::1 (serial" in out
    assert f"docker-mirror: clients trust the CA {pki}/docker-mirror/ca.crt\n" in out
    assert "docker-mirror: the service speaks HTTPS with it (tls.enabled: auto)" in out
    assert ("docker-mirror: next: for the names clients use, docker-mirror cert init --hostname NAME (repeat for "
            "more), then systemctl reload docker-mirror\n") in out
    assert "docker-mirror: next: docker-mirror client-setup prints what each client needs\n" in out

    # again (a package upgrade): a certificate the service starts with, for the configured name,
    # not about to expire: one line, what there is
    before = listing(site)
    status, out, _ = run(capsys, "ensure", "--config", str(config))
    assert status == 0 and listing(site) == before
    assert re.fullmatch(f"docker-mirror: TLS certificate {pki}/certs/docker-mirror.crt exists already \\(names: "
                        r"mirror\.example\.org, localhost, 127\.0\.0\.1, ::1; valid until \d{4}-\d\d-\d\d\); "
                        r"nothing changed\n", out), out

    # one for another name: the warning, and what to do about it
    write_config(site, {"hostname": "other.example.org"})
    before = listing(site)
    status, out, _ = run(capsys, "ensure", "--config", str(config))
    assert status == 0 and listing(site) == before
    assert "is not valid for other.example.org" in out and "cert init --hostname NAME" in out
    assert f"docker-mirror: clients trust the CA {pki}/docker-mirror/ca.crt\n" in out


@pytest.mark.parametrize("enabled, speaks", [
    ("auto", "the service speaks plain HTTP (tls.enabled: auto, and there is no {cert})"),
    (True, "the service will not start (tls.enabled is true in {config}, and there is no {cert})"),
    (False, "the service speaks plain HTTP (tls.enabled is false in {config})"),
])
def test_ensure_that_cannot_make_one_says_how_the_service_speaks(site: Path, capsys, enabled, speaks: str):
    cert = site / "pki" / "certs" / "docker-mirror.crt"
    config = write_config(site, {})
    text = yaml.safe_load(config.read_text())
    text["tls"]["enabled"] = enabled
    config.write_text(yaml.safe_dump(text))
    (site / "pki" / "private").write_text("in the way\n")
    before = listing(site)
    status, out, err = run(capsys, "ensure", "--config", str(config))
    assert status == 1 and listing(site) == before
    assert one_error_line(err) == (f"docker-mirror: {site}/pki/private/docker-mirror.key: Not a directory: "
                                   "nothing was changed\n")
    assert out.splitlines() == [
        "docker-mirror: no TLS certificate was made; " + speaks.format(cert=cert, config=config),
        "docker-mirror: next: docker-mirror cert init --hostname NAME (the name clients use), then systemctl "
        "restart docker-mirror; docker-mirror client-setup prints what each client needs"]
    # what the ensure output claims is what the server decides
    assert configuration.load(config).tls.active is (enabled is True)


def test_ensure_with_a_certificate_that_is_no_certificate_says_so_and_changes_nothing(site: Path, capsys):
    config = str(site / "etc" / "config.yml")
    assert run(capsys, "init", "--config", config, "--hostname", "m.example")[0] == 0
    cert = site / "pki" / "certs" / "docker-mirror.crt"
    cert.write_text("not a certificate\n")
    before = listing(site)
    status, out, err = run(capsys, "ensure", "--config", config)
    assert status == 1 and listing(site) == before
    assert one_error_line(err) == f"docker-mirror: {cert} is not a PEM certificate\n"
    assert out.startswith(f"docker-mirror: TLS certificate {cert} exists already; nothing changed; but it is not "
                          "usable, so the service will not start with it: run docker-mirror cert init --hostname "
                          "NAME (the name clients use), then systemctl restart docker-mirror\n")


# --- ensure checks an existing certificate as serve does at start


def bad_pair(site: Path, case: str) -> tuple[Path, Path]:
    """A certificate and key in the configured places that serve refuses (or warns about)."""
    from tests.support.certs import make_pki

    kwargs = {"expired": {"start_days": -40, "days": -1}, "soon": {"days": 10}}.get(case, {})
    pki = make_pki(site / "made", names=("m.example",), **kwargs)
    cert, key = site / "pki" / "certs" / "docker-mirror.crt", site / "pki" / "private" / "docker-mirror.key"
    for path, source in ((cert, pki.certificate), (key, pki.key)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(source.read_bytes())
    if case == "other key":
        key.write_bytes(make_pki(site / "other").key.read_bytes())
    return cert, key


@pytest.mark.parametrize("case, problem", [
    ("expired", "TLS certificate {cert} expired on "),
    ("other key", "TLS key {key} does not belong to certificate {cert}"),
])
def test_ensure_with_a_certificate_serve_refuses_says_the_service_will_not_start(site: Path, capsys, case, problem):
    config = str(write_config(site, {"hostname": "m.example"}))
    cert, key = bad_pair(site, case)
    before = listing(site)
    status, out, err = run(capsys, "ensure", "--config", config)
    assert status == 1 and listing(site) == before
    assert one_error_line(err).startswith("docker-mirror: " + problem.format(cert=cert, key=key))
    assert out.startswith(f"docker-mirror: TLS certificate {cert} exists already; nothing changed; but it is not "
                          "usable, so the service will not start with it: run docker-mirror cert init --hostname "
                          "NAME (the name clients use), then systemctl restart docker-mirror\n"), out
    assert "speaks HTTPS" not in out and "reload" not in out
    # and serve's own check says the same
    with pytest.raises(Exception, match=problem.format(cert=cert, key=key).split(" {")[0]):
        check(cert, key)


def test_ensure_warns_of_a_certificate_that_expires_within_30_days(site: Path, capsys):
    config = str(write_config(site, {"hostname": "m.example"}))
    cert, _ = bad_pair(site, "soon")
    status, out, err = run(capsys, "ensure", "--config", config)
    assert status == 0 and err == ""
    assert f"docker-mirror: TLS certificate {cert} exists already (names: m.example, 127.0.0.1, ::1; " in out
    assert re.search(rf"\ndocker-mirror: warning: TLS certificate {re.escape(str(cert))} expires in (9|10) day\(s\), "
                     r"on \d{4}-\d\d-\d\d; renew it: docker-mirror cert init --hostname NAME, then systemctl reload "
                     r"docker-mirror\n", out), out
    assert "the service speaks HTTPS with it" in out


def test_an_fqdn_of_localhost_is_no_mirror_name(site: Path, capsys, monkeypatch):
    monkeypatch.setattr(certs.socket, "getfqdn", lambda: "localhost")
    monkeypatch.setattr(certs.socket, "gethostname", lambda: "box")
    config = site / "etc" / "config.yml"
    status, out, _ = run(capsys, "init", "--config", str(config))
    assert status == 0
    assert names_in(site / "pki" / "certs" / "docker-mirror.crt") == ["box", "localhost", "127.0.0.1", "::1"]
    assert (f"name: box (this host's name: its FQDN 'localhost' is no name clients can use, and hostname: is not "
            f"set in {config}; set it to the name clients use)") in out
    monkeypatch.setattr(certs.socket, "gethostname", lambda: "localhost")
    picked = certs.mirror_name(configuration.load(config))
    assert (picked.name, picked.configured) == ("", False)
    assert picked.note.startswith("name: unknown (this host's FQDN is 'localhost', its host name 'localhost');")


# --- a closed stdout is not a failure; a file that cannot be written is named


@pytest.mark.parametrize("command", [["show"], ["init", "--hostname", "m.example"]])
def test_a_reader_that_stops_early_is_no_error(tmp_path: Path, capsys, command: list[str]):
    """`docker-mirror cert show | head -1`: exit 141, nothing on stderr (as every command)."""
    import subprocess
    import sys

    pki = tmp_path / "pki"
    assert run(capsys, "init", "--dir", str(pki), "--hostname", "m.example")[0] == 0
    proc = subprocess.Popen([sys.executable, "-m", "dockermirror", "cert", *command, "--dir", str(pki)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(60) == 141 and err == b""


def test_a_client_directory_that_cannot_be_made_is_named(site: Path, capsys):
    config = str(site / "etc" / "config.yml")
    assert run(capsys, "init", "--config", config, "--hostname", "m.example")[0] == 0
    (site / "afile").write_text("x\n")
    status, out, err = run(capsys, "client", "c1", "--out", str(site / "afile" / "c1"), "--config", config)
    assert status == 1 and out == ""
    assert one_error_line(err) == f"docker-mirror: {site}/afile/c1: Not a directory\n"


@pytest.mark.parametrize("days, problem", [
    ("999999999", "--days: 999999999 is more than 36500 days; give 1 to 36500 (default 365)"),
    ("0", "--days: 0 is not a number of days; give 1 to 36500 (default 365)"),
])
def test_a_client_certificate_with_days_out_of_range_is_a_usage_error(site: Path, capsys, days, problem):
    config = str(site / "etc" / "config.yml")
    assert run(capsys, "init", "--config", config, "--hostname", "m.example")[0] == 0
    before = listing(site)
    status, out, err = run(capsys, "client", "c1", "--out", str(site / "c1"), "--days", days, "--config", config)
    assert status == 2 and out == "" and listing(site) == before
    assert one_error_line(err) == f"docker-mirror: {problem}\n"


# --- replacing a pair that a server reads


def test_a_reload_between_the_renames_of_key_and_certificate_loads_the_new_pair(tmp_path: Path, monkeypatch):
    """cert init renames the new key and certificate into place one after the other; a reload
    landing between them reads a key that does not belong to the certificate. The server
    looks again a moment later instead of failing the reload."""
    from dockermirror.service import tls

    live, fresh = certs.Paths.under(tmp_path / "live"), certs.Paths.under(tmp_path / "fresh")
    certs.init(live, ["localhost"], [])
    server = tls.ServerTLS(live.certificate, live.key, "localhost")
    certs.init(fresh, ["localhost"], [])
    live.key.write_bytes(fresh.key.read_bytes())            # the first rename has happened
    waited = []

    def second_rename(seconds: float) -> None:
        waited.append(seconds)
        live.certificate.write_bytes(fresh.certificate.read_bytes())

    monkeypatch.setattr(tls.time, "sleep", second_rename)
    checked = server.reload(live.certificate, live.key, "localhost")
    new_serial = x509.load_pem_x509_certificates(fresh.certificate.read_bytes())[0].serial_number
    assert checked.certificate.serial_number == new_serial and server.checked.certificate.serial_number == new_serial
    assert len(waited) == 1
    # a pair that stays mismatched is still refused (after one look more), and the old one kept
    other = certs.Paths.under(tmp_path / "other")
    certs.init(other, ["localhost"], [])
    live.key.write_bytes(other.key.read_bytes())
    monkeypatch.setattr(tls.time, "sleep", lambda seconds: waited.append(seconds))
    with pytest.raises(tls.TLSError, match="does not belong to certificate"):
        server.reload(live.certificate, live.key, "localhost")
    assert len(waited) == 2 and server.checked.certificate.serial_number == new_serial


def test_a_rename_that_fails_leaves_the_old_files_and_no_backup(site: Path, capsys, monkeypatch):
    config = str(site / "etc" / "config.yml")
    assert run(capsys, "init", "--config", config, "--hostname", "old.example")[0] == 0
    before = listing(site)
    cert = site / "pki" / "certs" / "docker-mirror.crt"
    real_replace = os.replace

    def replace(source, target):
        if Path(target) == cert:
            raise OSError(28, "No space left on device", str(source))
        return real_replace(source, target)

    monkeypatch.setattr(certs.os, "replace", replace)
    status, out, err = run(capsys, "init", "--config", config, "--hostname", "new.example")
    assert status == 1 and out == ""
    assert one_error_line(err) == f"docker-mirror: {cert}: No space left on device: nothing was changed\n"
    assert listing(site) == before          # the old key back in place, no .old or .new file left


@pytest.mark.parametrize("which", ["certificate", "key"])
def test_a_symlinked_file_is_not_replaced_by_a_file(site: Path, capsys, which: str):
    """A tls: path that is a symbolic link (to a certificate managed elsewhere): init refuses, in
    one line, rather than put a file of its own in place of the link or write through it."""
    elsewhere = site / "elsewhere"
    elsewhere.mkdir()
    target = elsewhere / "managed.pem"
    target.write_text("managed elsewhere\n")
    link = {"certificate": site / "pki" / "certs" / "docker-mirror.crt",
            "key": site / "pki" / "private" / "docker-mirror.key"}[which]
    link.parent.mkdir(parents=True)
    link.symlink_to(target)
    before = listing(site)
    status, out, err = run(capsys, "init", "--config", str(site / "etc" / "config.yml"), "--hostname", "m.example")
    assert status == 1 and out == "" and listing(site) == before
    assert one_error_line(err) == (f"docker-mirror: {link} is a symbolic link (to {target}): cert init does not "
                                   "replace it; remove the link, or point tls: at other paths: nothing was "
                                   "changed\n")
