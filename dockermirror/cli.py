"""The ``docker-mirror`` command line."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from pathlib import Path

from dockermirror import __version__, config as configuration, smallfile
from dockermirror.config import Config, ConfigError


FLAGS = {"listen": ("listen", "--listen"), "cache.dir": ("cache_dir", "--cache-dir"),
         "upstream.url": ("upstream", "--upstream")}   # key: (argparse name, flag)


def _load(args: argparse.Namespace) -> Config:
    config = configuration.load(args.config)
    overrides = {key: getattr(args, name, None) for key, (name, _) in FLAGS.items()}
    try:
        return config.with_overrides(**overrides)
    except ConfigError as exc:
        raise ConfigError(exc.message, key=FLAGS[exc.key][1]) from None


def _user_error(args: argparse.Namespace, config: Config, key: str, message: str) -> ConfigError:
    """A user's mistake about ``key``: named by its flag if one gave the value, else by key and file."""
    name, flag = FLAGS.get(key, ("", ""))
    if name and getattr(args, name, None) is not None:
        return ConfigError(message, key=flag)
    return ConfigError(message, source=config.source, key=key)


def cmd_serve(args: argparse.Namespace) -> int:
    # First of all: a SIGHUP (reload) while the server starts would otherwise kill it.
    # Remembered here, applied once the server is ready.
    hups: list[int] = []
    signal.signal(signal.SIGHUP, lambda signum, frame: hups.append(signum))
    from dockermirror.service import logs
    from dockermirror.service.server import StartupError, serve

    config = _load(args)
    logs.setup(config.log.level, journal_fields=config.log.journal_fields)
    try:
        return serve(config, reload_config=lambda: _load(args), reload_requested=lambda: bool(hups))
    except StartupError as exc:
        if exc.key:
            raise _user_error(args, config, exc.key, str(exc)) from None
        _say(f"docker-mirror: {_one_line(str(exc))}", priority=3)
        return 1


def cmd_check_config(args: argparse.Namespace) -> int:
    from dockermirror.service.server import StartupError, server_tls

    config = _load(args)
    try:
        server_tls(config)      # what would stop serve: the same checks
    except StartupError as exc:
        raise ConfigError(str(exc)) from None
    _ca_pem(config)             # what client-setup would paste
    if config.auth.htpasswd is not None:    # the server refuses to start without a good one
        from dockermirror.access.htpasswd import Htpasswd, HtpasswdError

        try:
            users = Htpasswd.load(config.auth.htpasswd)
        except HtpasswdError as exc:
            raise ConfigError(str(exc), key="auth.htpasswd") from None
        print(f"# auth.htpasswd: {len(users)} user(s)")
        for warning in users.warnings:
            print(f"# warning: auth.htpasswd: {warning}")
    print(f"# effective configuration (from {config.source})")
    print(configuration.dump(config), end="")
    for line in _rule_warnings(config) + configuration.upstream_loops(config):
        print(f"docker-mirror: warning: {line}", file=sys.stderr)
    return 0


def _rule_warnings(config: Config) -> list[str]:
    """Rules that can never decide: earlier rules match every request they match."""
    if not config.access:
        return []
    from dockermirror.access.rules import Rules
    from dockermirror.routing import RegistryTable

    table = RegistryTable((up.registry, up.aliases) for up in config.registries)
    warnings = [f"{config.source}:{rule.line}: access[{rule.index}] ({rule.action}) never applies: "
                + (f"{earlier[0].where()} ({earlier[0].action}) already matches" if len(earlier) == 1 else
                   ", ".join(f"{e.where()} ({e.action})" for e in earlier) + " together already match")
                + " every request it matches"
                for rule, earlier in Rules(config.access, table).shadowed()]
    if config.auth.htpasswd is None:
        warnings += [f"{config.source}:{rule.line}: access[{rule.index}] names {name}, but there are no users "
                     "without auth.htpasswd" for rule in config.access
                     for name in [next((i for i in rule.identities if i.startswith("user:")), None)] if name]
    return warnings


def cmd_access_check(args: argparse.Namespace) -> int:
    """Print the rule that decides whether IDENTITY may pull REPOSITORY; exit 0 if allowed, 1 if not."""
    from dockermirror.access.guard import Guard
    from dockermirror.access.identity import CERTIFICATE, Identity
    from dockermirror.access.rules import client_address
    from dockermirror.routing import UnknownRegistry

    config = _load(args)
    try:
        identity = Identity.parse(args.identity)
    except ValueError:    # (its own message says what it expects: said once, here)
        raise ConfigError(f"invalid identity {args.identity!r}; give anonymous, user:NAME or cert:COMMON-NAME",
                          key="IDENTITY") from None
    if args.source is not None and client_address(args.source) is None:
        raise ConfigError(f"invalid address {args.source!r}; give an IPv4 or IPv6 address", key="--from")
    # whether a user exists is not asked (nor the file read): the rules decide for a name
    guard = Guard.of(config, htpasswd=object() if config.auth.htpasswd else None)  # type: ignore[arg-type]
    try:
        route = guard.rules.table.route(_repository_of(args.repository).lower())
    except UnknownRegistry as exc:
        raise ConfigError(f"{exc}; name a configured upstream (docker-mirror check-config lists them)",
                          key="REPOSITORY") from None
    who = f"{identity}{f' from {args.source}' if args.source else ''} pulling {route.registry}/{route.repository}"
    if guard.certificate_required and identity.kind != CERTIFICATE:
        print(f"deny: tls.client_auth: required: a client certificate is required ({who})")
        return 1
    if not guard.explicit and guard.htpasswd is None:
        anyone = "anyone with a client certificate" if guard.certificate_required else "anyone"
        print(f"allow: no rules: {anyone} may pull ({who})")
        return 0
    decision = guard.decide(identity, args.source, route.registry, route.repository)
    action = "allow" if decision.allowed else "deny"
    if not guard.explicit:
        print(f"{action}: no rules, and auth.htpasswd is set: users may pull everything, anonymous clients "
              f"nothing ({who})")
    elif decision.rule is None:
        print(f"deny: default deny: no rule of access: matches {who}")
    else:
        print(f"{action}: {decision.rule.where()} of {config.source} decides for {who}")
    return 0 if decision.allowed else 1


def _repository_of(reference: str) -> str:
    """The repository of a reference pasted from ``docker pull``: ``centos:7`` and
    ``docker.io/centos@sha256:...`` name the repository the rules match (a tag or digest does not
    change who may pull it); the :PORT of a registry (``host:5000/app``) stays."""
    name = reference.partition("@")[0]
    head, slash, last = name.rpartition("/")
    return head + slash + last.partition(":")[0]


def cmd_cache(args: argparse.Namespace) -> int:
    from dockermirror import cachectl

    config = _load(args)
    options = {k: v for k, v in vars(args).items() if k not in ("run", "command", "cache_command", "config",
                                                                 "cache_dir")}
    try:
        return cachectl.run(config, args.cache_command, **options)
    except cachectl.NoCache as exc:
        raise _user_error(args, config, "cache.dir", f"{exc}; give the server's cache directory "
                                                     "(--cache-dir DIR, or cache.dir in --config FILE)") from None
    except cachectl.BadTarget as exc:
        raise ConfigError(f"{exc}; give a digest (sha256:...) or [REGISTRY/]REPOSITORY[:TAG], e.g. library/busybox:1",
                          key="TARGET") from None
    except cachectl.CommandError as exc:
        print(f"docker-mirror: {exc}", file=sys.stderr)
        return 1


def cmd_report(args: argparse.Namespace) -> int:
    from dockermirror import report

    try:
        return report.run(args.unit, args.since, args.json, sys.stdout)
    except report.ReportError as exc:
        print(f"docker-mirror: report: {exc}", file=sys.stderr)
        return 1


def _cert_paths(config: Config, args: argparse.Namespace):
    from dockermirror.service.certs import Paths

    if getattr(args, "dir", None) is not None:
        return Paths.under(args.dir)
    return Paths(config.tls.certificate, config.tls.key, config.tls.ca)


def cmd_cert(args: argparse.Namespace) -> int:
    from dockermirror.service import certs

    config = _load(args)
    paths = _cert_paths(config, args)
    try:
        if args.cert_command == "show":
            for label, path in (("server certificate", paths.certificate), ("CA", paths.ca)):
                print(f"# {label}")
                print("\n".join(certs.describe(path)))
            print(f"# CA key: {paths.ca_key_in_use}" + ("" if paths.ca_key_in_use.exists() else " (missing)"))
            if paths.ca_key_in_use == paths.legacy_ca_key:
                print(f"# {certs.legacy_key_note(paths)}")
            return 0
        if args.cert_command in ("client", "revoke"):
            from dockermirror.service import clientcerts

            with certs.ca_lock(paths):     # a revocation reads and rewrites the CRL: one at a time
                if args.cert_command == "client":
                    done = clientcerts.issue_client(paths, args.name, args.out, args.days)
                else:
                    done = clientcerts.revoke(paths, args.name, config.tls.crl)
            print("\n".join(done))
            return 0
    except certs.CertError as exc:      # file errors are CertErrors naming the file; not a closed stdout
        return _cert_failed(exc)
    if args.cert_command == "ensure":
        return _cert_ensure(args, config, paths)
    try:
        lines = _cert_init(args, config, paths)
    except certs.CertError as exc:
        return _cert_failed(exc)
    print("\n".join(lines))
    return 0


def _cert_failed(exc: Exception) -> int:
    from dockermirror.service.certs import UsageError

    message = f"{exc.filename}: {exc.strerror}" if isinstance(exc, OSError) and exc.strerror else str(exc)
    print(f"docker-mirror: {message}", file=sys.stderr)
    return 2 if isinstance(exc, UsageError) else 1


def _cert_init(args: argparse.Namespace, config: Config, paths) -> list[str]:
    """Make the CA if missing and a server certificate; the lines saying what was done."""
    from dockermirror.service import certs

    names, ips = args.hostname or [], args.ip or []
    picked = None
    if not names and not ips:
        names, ips, picked = certs.default_names(config)
    lines = certs.init(paths, names, ips, args.days)
    if picked is not None:
        lines.append(picked.note)
    if args.dir is not None:
        lines.append("to use these files, put this tls: section in the configuration "
                     f"({config.source if config.source != '(defaults)' else '/etc/docker-mirror/config.yml'}):")
        lines += paths.config_lines()
    return lines


def _cert_ensure(args: argparse.Namespace, config: Config, paths) -> int:
    """``cert ensure`` (what the package scripts run): a certificate unless there is one,
    and in every case what clients trust, how the service will speak, and the next commands."""
    from dockermirror.service import certs

    def say(*lines: str) -> None:
        for line in lines:
            print(f"docker-mirror: {line}")

    serving = certs.serving_note(config.tls.enabled, config.source, paths, args.dir is not None)
    next_lines = ["next: for the names clients use, docker-mirror cert init --hostname NAME (repeat for more), "
                  "then systemctl reload docker-mirror",
                  "next: docker-mirror client-setup prints what each client needs"]

    def not_made(exc: Exception) -> int:
        status = _cert_failed(exc)
        say(f"no TLS certificate was made; {certs.no_certificate_note(config.tls.enabled, config.source, paths)}",
            "next: docker-mirror cert init --hostname NAME (the name clients use), then "
            "systemctl restart docker-mirror; docker-mirror client-setup prints what each client needs")
        return status

    with contextlib.ExitStack() as held:
        try:    # whether there is one, and making one, is one step: another run waits for it
            held.enter_context(certs.ca_lock(paths))
        except certs.CertError as exc:
            return not_made(exc)
        return _cert_ensure_locked(args, config, paths, say, serving, next_lines, not_made)


def _cert_ensure_locked(args: argparse.Namespace, config: Config, paths, say, serving: str,
                        next_lines: list[str], not_made) -> int:
    from dockermirror.service import certs

    if paths.certificate.exists() and paths.key.exists():
        from dockermirror.service.tls import TLSError, check

        renew = "docker-mirror cert init --hostname NAME (the name clients use)"
        try:
            names, until = certs.names_of(paths.certificate)
            # what serve checks at start (and at reload): key and certificate match, in date
            checked = check(paths.certificate, paths.key, certs.mirror_name(config).name)
        except (certs.CertError, TLSError) as exc:
            status = _cert_failed(exc)
            if config.tls.enabled != "off" and args.dir is None:
                effect = f"the service will not start with it: run {renew}, then systemctl restart docker-mirror"
            else:
                effect = f"replace it before you use it: {renew}"
            say(f"TLS certificate {paths.certificate} exists already; nothing changed; but it is not usable, so "
                f"{effect}", next_lines[-1])
            return status
        say(f"TLS certificate {paths.certificate} exists already (names: {', '.join(names) or 'none'}; "
            f"valid until {until:%Y-%m-%d}); nothing changed")
        legacy = paths.ca_key_in_use == paths.legacy_ca_key
        if not checked.warnings and not legacy:
            return 0    # nothing to do (every package upgrade): that one line
        for warning in checked.warnings:
            if " expires in " in warning:
                warning += "; renew it: docker-mirror cert init --hostname NAME, then systemctl reload docker-mirror"
            say(f"warning: {warning}")
        say(certs.trust_note(paths), serving)
        if legacy:
            say(certs.legacy_key_note(paths))
        say(*next_lines)
        return 0
    try:
        lines = _cert_init(args, config, paths)
    except certs.CertError as exc:
        return not_made(exc)
    say(*lines, certs.trust_note(paths), serving, *next_lines)
    return 0


def _client_target(wanted: str | None):
    """(target, the line saying how it was picked); ConfigError if --for names none."""
    from dockermirror.service import clienttargets as targets

    if wanted is not None:
        if wanted not in targets.TARGETS:
            raise ConfigError(f"unknown client system {wanted!r}; choose one of {', '.join(targets.TARGETS)}",
                              key="--for")
        return targets.TARGETS[wanted], f"picked with --for {wanted}"
    try:
        fields = targets.parse_os_release(targets.OS_RELEASE.read_text(errors="replace"))
    except OSError:
        fields = {}
    found = targets.detect(fields)
    if found is None:
        return targets.DEFAULT, (f"this system ({targets.describe(fields)} in {targets.OS_RELEASE}) is none of "
                                 f"{', '.join(targets.TARGETS)}: these are the Debian/modern steps;\n"
                                 "for another client system run client-setup --for "
                                 f"{'|'.join(targets.TARGETS)}")
    return found, (f"detected from {targets.OS_RELEASE} ({targets.describe(fields)}); for another client "
                   f"system run client-setup --for {'|'.join(targets.TARGETS)}")


def cmd_client_setup(args: argparse.Namespace) -> int:
    from dockermirror.service.certs import mirror_name
    from dockermirror.service.clientsetup import instructions

    target, how = _client_target(args.target)
    config = _load(args)
    if args.host:
        host = args.host
    else:   # the configured hostname:, else this host's FQDN, and the output says which
        picked = mirror_name(config)
        if not picked.name:
            raise ConfigError(f"{picked.unknown}; set hostname: in {config.source} to the name clients use, or give "
                              "--host NAME:PORT", key="--host")
        host = configuration.host_port(picked.name, config.listen_address[1])
        how += f"\n{picked.note}; or give --host NAME:PORT"
        if config.node:     # one node of several: clients should be given the balancer's name
            how += (f"\nnode: {config.node} is set: if clients reach this mirror through a load balancer, "
                    "run client-setup --host BALANCER:PORT (the balancer's name and port)")
    tls = config.tls.active
    ca_pem = _ca_pem(config) if tls else None
    registries = [(upstream.registry, upstream.aliases) for upstream in config.registries]
    urls = {name: upstream.url for upstream in config.registries for name in (upstream.registry, *upstream.aliases)}
    print(instructions(host, tls=tls, ca_pem=ca_pem, ca_path=config.tls.ca, registries=registries, urls=urls,
                       client_auth=config.tls.client_auth, target=target, picked=how), end="")
    return 0


def _ca_pem(config: Config) -> str | None:
    """The certificate(s) of tls.ca clients are told to trust (None: TLS off, or not readable here);
    ConfigError for a file that holds a private key or no certificate."""
    if not config.tls.active:
        return None
    from dockermirror.service.tls import TLSError, ca_pem

    try:
        return ca_pem(config.tls.ca)
    except TLSError as exc:
        raise ConfigError(str(exc), source=config.source, key="tls.ca") from None


def cmd_lb_config(args: argparse.Namespace) -> int:
    import os

    from dockermirror.service import lbconfig

    def absolute(path: str | None) -> str | None:
        return os.path.abspath(path) if path else path

    options = lbconfig.Options(listen=args.listen, nodes=tuple(args.node or ()), tls_cert=absolute(args.tls_cert),
                               node_tls=args.node_tls, node_ca=absolute(args.node_ca),
                               node_tls_name=args.node_tls_name, passthrough=args.passthrough,
                               node_client_cert=absolute(args.node_client_cert))
    try:
        text = lbconfig.ENGINES[args.engine](options)
    except lbconfig.OptionError as exc:
        raise ConfigError(str(exc), key=exc.flag) from None
    print(text, end="")
    return 0


def _read_password(name: str, from_stdin: bool) -> str:
    """Twice with getpass on a terminal (unless --password-stdin), else the first line of stdin."""
    if not from_stdin and sys.stdin.isatty():
        import getpass

        first = getpass.getpass(f"Password for {name}: ")
        if getpass.getpass("Again: ") != first:
            raise _UserError("the two passwords differ")
        return first
    return sys.stdin.readline(4096).rstrip("\r\n")


class _UserError(Exception):
    pass


def cmd_user(args: argparse.Namespace) -> int:
    from dockermirror.access import users

    path, config = args.file, None
    if path is None:
        config = _load(args)
        path = config.auth.htpasswd
        if path is None:
            raise ConfigError("no htpasswd file is set; set auth.htpasswd in the configuration, or give --file FILE",
                              source=config.source, key="auth.htpasswd")
    try:
        if args.user_command == "list":
            for name in users.names(path):
                print(_printable(name))
        elif args.user_command == "add":
            password = _read_password(args.name, args.password_stdin)
            new = users.add(path, args.name, password, cost=args.cost)
            print(f"{'added' if new else 'changed the password of'} {args.name} in {path}; "
                  "reload the service to apply it (systemctl reload docker-mirror)")
        else:
            users.remove(path, args.name)
            print(f"removed {args.name} from {path}; reload the service to apply it (systemctl reload docker-mirror)")
    except users.BadName as exc:
        raise ConfigError(f"{exc}; choose another name", key="NAME") from None
    except users.BadFile as exc:
        raise (ConfigError(str(exc), key="--file") if config is None else
               ConfigError(str(exc), source=config.source, key="auth.htpasswd")) from None
    except (users.BadPassword, _UserError) as exc:
        raise ConfigError(f"{exc}; give it again (user add {_printable(args.name)})", key="password") from None
    except users.CommandError as exc:
        print(f"docker-mirror: {exc}", file=sys.stderr)
        return 1
    problem = users.problem(path)
    if problem:
        print(f"docker-mirror: the server refuses this file as it is: {problem}", file=sys.stderr)
        return 1
    return 0


def _printable(text: str) -> str:
    """A name from a file, safe on a terminal: control characters (an escape sequence) shown escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _config_file(text: str) -> Path:
    if not text.strip():     # Path("") is ".", the current directory
        raise ValueError("expected a file name, got an empty one; give the configuration file, or leave out "
                         "--config")
    return Path(text)


def _parsed(parse, what: str):
    """An argparse type from a config parser, so flags get the config's syntax and messages."""

    def convert(text: str):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = what
    return convert


def _host_port(text: str) -> str:
    """--host: HOST:PORT (or HOST) as clients write it in an image name: a DNS name, an IPv4
    address, or an IPv6 address in brackets; no scheme, no path."""
    import ipaddress

    bad = (f"{text!r} is not HOST:PORT; give the name and port clients use, e.g. mirror.example.com:5000 or "
           "[fd00::5]:5000 (no https://, no path)")
    if text.startswith("["):
        inner, closed, rest = text[1:].partition("]")
        try:
            address = ipaddress.IPv6Address(inner) if closed else None
        except ValueError:
            address = None
        if address is None or address.scope_id or (rest and not rest.startswith(":")):
            raise ValueError(bad)
        port = rest[1:] if rest else None
    else:
        host, _, port = text.partition(":") if ":" in text else (text, "", None)
        if port is not None and ":" in port:    # fd00::5 or fd00::5:5000
            raise ValueError(f"{bad}; put an IPv6 address in brackets")
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            if not configuration.is_dns_name(host.removesuffix(".")):
                raise ValueError(bad) from None
    if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(bad)
    return text


class _Parser(argparse.ArgumentParser):
    """argparse, with its mistakes in one line (``docker-mirror: <what>; <what to do>``, exit 2)."""

    def error(self, message: str):
        self.exit(2, f"docker-mirror: {message.removeprefix('argument ')}; see {self.prog} --help\n")


def parser() -> argparse.ArgumentParser:
    top = _Parser(prog="docker-mirror", description="A pull-through cache for OCI registries.")
    top.add_argument("--version", action="version", version=f"docker-mirror {__version__}")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config_help = f"configuration file (default {configuration.DEFAULT_PATH}, if it exists)"
    serve = commands.add_parser("serve", help="run the mirror")
    serve.add_argument("--config", type=_parsed(_config_file, "FILE"), help=config_help)
    serve.add_argument("--listen", metavar="HOST:PORT", help="address to listen on (default 0.0.0.0:5000)")
    serve.add_argument("--cache-dir", metavar="DIR", help="cache directory (default /var/cache/docker-mirror)")
    serve.add_argument("--upstream", metavar="URL", help="upstream registry (default https://registry-1.docker.io)")
    serve.set_defaults(run=cmd_serve)

    check = commands.add_parser("check-config", help="validate the configuration and print the effective values")
    check.add_argument("--config", type=_parsed(_config_file, "FILE"), help=config_help)
    check.set_defaults(run=cmd_check_config)

    access = commands.add_parser("access", help="the access: rules")
    access_commands = access.add_subparsers(dest="access_command", required=True, metavar="COMMAND")
    access_check = access_commands.add_parser(
        "check", help="print the rule that decides whether IDENTITY may pull REPOSITORY (exit 0: allowed, 1: not)")
    access_check.add_argument("identity", metavar="IDENTITY", help="anonymous, user:NAME or cert:COMMON-NAME")
    access_check.add_argument("repository", metavar="REPOSITORY",
                              help="as a client names it: library/centos, ghcr.io/myorg/app (a :TAG or @DIGEST, "
                                   "as docker pull takes it, is dropped: rules match the repository)")
    access_check.add_argument("--from", dest="source", metavar="ADDRESS", help="the client's address")
    access_check.add_argument("--config", type=_parsed(_config_file, "FILE"), help=config_help)
    access_check.set_defaults(run=cmd_access_check)

    cache = commands.add_parser("cache", help="look after the cache (also while the server runs)")
    cache_commands = cache.add_subparsers(dest="cache_command", required=True, metavar="COMMAND")

    def cache_command(name: str, help: str) -> argparse.ArgumentParser:
        sub = cache_commands.add_parser(name, help=help)
        sub.add_argument("--config", type=_parsed(_config_file, "FILE"), help=config_help)
        sub.add_argument("--cache-dir", metavar="DIR", help="cache directory (default: from the configuration)")
        sub.set_defaults(run=cmd_cache)
        return sub

    stats = cache_command("stats", "size, entries, hit ratio, traffic")
    stats.add_argument("--json", action="store_true", help="print JSON")
    prune = cache_command("prune", "remove old or least recently used content (default: apply the TTLs and "
                                   "max_size once)")
    prune.add_argument("--older-than", metavar="DURATION", type=_parsed(configuration.parse_duration, "duration"),
                       help="remove content not pulled for this long (e.g. 30d)")
    prune.add_argument("--to-size", metavar="SIZE", type=_parsed(configuration.parse_size, "size"),
                       help="then remove least recently used content until the cache holds at most SIZE")
    prune.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    verify = cache_command("verify", "re-hash every cached file; exit 1 if any is missing or corrupt")
    verify.add_argument("--repair", action="store_true", help="remove the missing and corrupt entries")
    rm = cache_command("rm", "remove a digest, a repository, or forget a tag (a repository of another upstream "
                             "than the default: REGISTRY/REPOSITORY, e.g. ghcr.io/org/app:1)")
    rm.add_argument("target", metavar="[REGISTRY/]REPOSITORY[:TAG]|DIGEST")

    from dockermirror.report import since_argument, unit_argument

    report = commands.add_parser("report", help="hit ratio, bytes and upstream pulls saved, the most pulled and "
                                                "slowest repositories: from the journal's request entries")
    report.add_argument("--since", default="24h", type=_parsed(lambda v: since_argument(v) and v, "time"),
                        help="from when: 1h, 30m, 2d (that long ago; default 24h), or anything journalctl --since "
                             "takes (today, '2026-12-01 10:00')")
    report.add_argument("--unit", default="docker-mirror", type=_parsed(lambda v: unit_argument(v), "unit"),
                        help="the systemd unit (default docker-mirror)")
    report.add_argument("--json", action="store_true", help="print JSON")
    report.set_defaults(run=cmd_report)

    cert = commands.add_parser("cert", help="the private CA and the server certificate (paths from tls:)")
    cert_commands = cert.add_subparsers(dest="cert_command", required=True, metavar="COMMAND")
    for name, text in (("init", "create the CA if missing, and a new server certificate signed by it"),
                       ("ensure", "like init, but only if there is no server certificate yet (for packages)"),
                       ("show", "print subject, names, issuer and expiry of the certificate and the CA")):
        sub = cert_commands.add_parser(name, help=text)
        sub.add_argument("--config", type=_parsed(_config_file, "FILE"), help=config_help)
        sub.add_argument("--dir", type=Path, metavar="DIR",
                         help="use DIR/ca.crt (its key in DIR/private/ca.key) and DIR/server/docker-mirror.crt, "
                              ".key instead of the tls: paths (to try TLS outside /etc/pki)")
        sub.set_defaults(run=cmd_cert)
        if name != "show":
            sub.add_argument("--hostname", action="append", metavar="NAME",
                             help="a DNS name for the certificate (repeat for more); default: the configured "
                                  "hostname: (else this host's FQDN and short name), and localhost")
            sub.add_argument("--ip", action="append", metavar="ADDRESS",
                             help="an IP address for it (repeat); default with no --hostname: 127.0.0.1, ::1")
            sub.add_argument("--days", type=int, default=825, help="validity of the server certificate")

    client = cert_commands.add_parser("client", help="issue a client certificate signed by the CA (for "
                                                     "tls.client_auth): DIR/client.cert, client.key, ca.crt")
    client.add_argument("name", metavar="NAME", help="the client's name (the certificate's CN)")
    client.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="where to write client.cert, client.key and ca.crt")
    client.add_argument("--days", type=int, default=365, help="validity (default 365)")
    client.add_argument("--config", type=_parsed(_config_file, "FILE"), help=config_help)
    client.set_defaults(run=cmd_cert)
    revoke = cert_commands.add_parser("revoke", help="add every client certificate issued to NAME to the CRL "
                                                     "(tls.crl); then reload the server")
    revoke.add_argument("name", metavar="NAME")
    revoke.add_argument("--config", type=_parsed(_config_file, "FILE"), help=config_help)
    revoke.set_defaults(run=cmd_cert)

    setup = commands.add_parser("client-setup", help="print the steps that point docker, containerd and podman "
                                                     "here (for every upstream)")
    setup.add_argument("--config", type=_parsed(_config_file, "FILE"), help=config_help)
    setup.add_argument("--host", metavar="HOST:PORT", type=_parsed(_host_port, "HOST:PORT"),
                       help="how clients reach the mirror, [V6]:PORT for an IPv6 address (default: hostname: and "
                            "the port of listen:)")
    setup.add_argument("--for", dest="target", metavar="el7|el8|el9|debian",
                       help="the client system (default: this one, from /etc/os-release)")
    setup.set_defaults(run=cmd_client_setup)

    lb = commands.add_parser("lb-config", help="print an HAProxy or nginx configuration that spreads clients over "
                                               "several mirrors by content (each blob fetched once per cluster)")
    lb.add_argument("engine", choices=("haproxy", "nginx"), help="the load balancer")
    lb.add_argument("--listen", metavar="HOST:PORT", required=True, help="where the balancer listens")
    lb.add_argument("--node", metavar="HOST:PORT", action="append",
                    help="a docker-mirror behind it (once per node; HAProxy: append new nodes at the end)")
    lb.add_argument("--tls-cert", metavar="PEM", help="end TLS at the balancer: certificate chain and key in one PEM")
    lb.add_argument("--node-tls", action="store_true", help="the nodes speak HTTPS")
    lb.add_argument("--node-ca", metavar="CA", help="check the nodes' certificates against this CA")
    lb.add_argument("--node-tls-name", metavar="NAME", help="the DNS name every node's certificate carries "
                                                             "(checked with --node-ca; nginx needs it)")
    lb.add_argument("--node-client-cert", metavar="PEM",
                    help="certificate chain and key in one PEM shown to the nodes (tls.client_auth: required)")
    lb.add_argument("--passthrough", action="store_true",
                    help="pass TLS through to the nodes (by client address: no content routing)")
    lb.set_defaults(run=cmd_lb_config)

    user = commands.add_parser("user", help="the users of the htpasswd file (auth.htpasswd)")
    user_commands = user.add_subparsers(dest="user_command", required=True, metavar="COMMAND")
    for name, text in (("add", "add a user, or change their password (bcrypt)"),
                       ("del", "remove a user"), ("list", "print the user names")):
        sub = user_commands.add_parser(name, help=text)
        sub.add_argument("--config", type=_parsed(_config_file, "FILE"), help=config_help)
        sub.add_argument("--file", type=Path, help="the htpasswd file (default: auth.htpasswd of the configuration)")
        sub.set_defaults(run=cmd_user)
        if name != "list":
            sub.add_argument("name", metavar="NAME")
        if name == "add":
            sub.add_argument("--password-stdin", action="store_true",
                             help="read the password from the first line of stdin (also without this flag "
                                  "when stdin is not a terminal)")
            sub.add_argument("--cost", type=int, choices=range(10, 18), default=12, metavar="10..17",
                             help="bcrypt cost (default 12)")
    return top


EXIT_USAGE = 2       # a user's mistake: one line on stderr, ``docker-mirror: <flag or key>: ...``
EXIT_BUG = 70        # EX_SOFTWARE: an exception nobody expected; its traceback is shown


def main(argv: list[str] | None = None) -> int:
    """The one edge where exceptions leave the commands: a user's mistake (:class:`ConfigError`,
    raised by the configuration, the flags and the commands) is one line and exit status 2;
    anything else is a bug, shown in full (on stderr, or to the log once ``serve`` set it up:
    the journal then has it at priority crit) and ends with a line that says it is one."""
    args = parser().parse_args(argv)
    out = sys.stdout = _Output(sys.stdout)
    try:
        status = args.run(args)
        out.flush()
        return status
    except _OutputError as exc:    # `check-config > /dev/full`: not a bug, and not the user's mistake either
        _say(f"docker-mirror: cannot write the output: {exc.reason}; write it to a file system with room "
             "(or to a terminal)", priority=3)
        return 1
    except ConfigError as exc:
        _say(f"docker-mirror: {_one_line(str(exc))}", priority=3)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:     # `docker-mirror client-setup | head`: the reader has what it wanted
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:
        import logging
        import traceback

        line = (f"docker-mirror: bug: {type(exc).__name__} in {args.command}: {_one_line(str(exc))}; "
                f"this is not your mistake: please report it with the lines above (docker-mirror {__version__})")
        if logging.getLogger().handlers:     # serve's logging (journal or stderr)
            logging.getLogger("dockermirror").critical("%s", line.removeprefix("docker-mirror: "), exc_info=True)
        else:
            traceback.print_exc()
            _say(line, priority=2)
        return EXIT_BUG
    finally:
        if sys.stdout is out:    # (main called again in one process wraps the stream once)
            sys.stdout = out.stream


class _OutputError(Exception):
    def __init__(self, error: OSError):
        super().__init__(error)
        self.reason = error.strerror or str(error)


class _Output:
    """stdout, whose write errors (ENOSPC, EIO; a closed pipe stays BrokenPipeError) are told
    apart from the commands' own OSErrors."""

    def __init__(self, stream):
        self.stream = self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise _OutputError(exc) from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise _OutputError(exc) from None

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _say(line: str, priority: int) -> None:
    """A line on stderr; when stderr is the journal (the service), with its syslog priority, so
    that ``journalctl -p warning`` shows why the service does not start."""
    from dockermirror.service.logs import stderr_is_journal

    print(f"<{priority}>{line}" if stderr_is_journal() else line, file=sys.stderr)


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in text.splitlines() if part.strip())
