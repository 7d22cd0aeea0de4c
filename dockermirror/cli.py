"""The ``docker-mirror`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dockermirror import __version__, config as configuration
from dockermirror.config import Config, ConfigError


def _load(args: argparse.Namespace) -> Config:
    config = configuration.load(args.config)
    overrides = {
        "listen": getattr(args, "listen", None),
        "cache.dir": getattr(args, "cache_dir", None),
        "upstream.url": getattr(args, "upstream", None),
    }
    try:
        return config.with_overrides(**overrides)
    except ConfigError as exc:
        flag = {"listen": "--listen", "cache.dir": "--cache-dir", "upstream.url": "--upstream"}[exc.key]
        raise ConfigError(exc.message, key=flag) from None


def cmd_serve(args: argparse.Namespace) -> int:
    from dockermirror.service import logs
    from dockermirror.service.server import StartupError, serve

    config = _load(args)
    logs.setup(config.log.level)
    try:
        return serve(config)
    except StartupError as exc:
        print(f"docker-mirror: {exc}", file=sys.stderr)
        return 1


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args)
    print(f"# effective configuration (from {config.source})")
    print(configuration.dump(config), end="")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from dockermirror import cachectl

    config = _load(args)
    options = {k: v for k, v in vars(args).items() if k not in ("run", "command", "cache_command", "config",
                                                                 "cache_dir")}
    try:
        return cachectl.run(config, args.cache_command, **options)
    except cachectl.CommandError as exc:
        print(f"docker-mirror: {exc}", file=sys.stderr)
        return 1


def _parsed(parse, what: str):
    """An argparse type from a config parser, so flags get the config's syntax and messages."""

    def convert(text: str):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = what
    return convert


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="docker-mirror", description="A pull-through cache for OCI registries.")
    top.add_argument("--version", action="version", version=f"docker-mirror {__version__}")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config_help = f"configuration file (default {configuration.DEFAULT_PATH}, if it exists)"
    serve = commands.add_parser("serve", help="run the mirror")
    serve.add_argument("--config", type=Path, help=config_help)
    serve.add_argument("--listen", metavar="HOST:PORT", help="address to listen on (default 0.0.0.0:5000)")
    serve.add_argument("--cache-dir", metavar="DIR", help="cache directory (default /var/cache/docker-mirror)")
    serve.add_argument("--upstream", metavar="URL", help="upstream registry (default https://registry-1.docker.io)")
    serve.set_defaults(run=cmd_serve)

    check = commands.add_parser("check-config", help="validate the configuration and print the effective values")
    check.add_argument("--config", type=Path, help=config_help)
    check.set_defaults(run=cmd_check_config)

    cache = commands.add_parser("cache", help="look after the cache (also while the server runs)")
    cache_commands = cache.add_subparsers(dest="cache_command", required=True, metavar="COMMAND")

    def cache_command(name: str, help: str) -> argparse.ArgumentParser:
        sub = cache_commands.add_parser(name, help=help)
        sub.add_argument("--config", type=Path, help=config_help)
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
    rm = cache_command("rm", "remove a digest, a repository, or forget a tag")
    rm.add_argument("target", metavar="REPOSITORY[:TAG]|DIGEST")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except ConfigError as exc:
        print(f"docker-mirror: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
