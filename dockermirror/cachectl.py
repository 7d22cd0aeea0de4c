"""``docker-mirror cache stats | prune | verify | rm``: look after a cache directory.

They work while the server runs: SQLite serialises the index writes, and a file
removed under a response stays readable through its open descriptor.
"""

from __future__ import annotations

import datetime
import json
import os
import sqlite3
import sys
import time
from dataclasses import dataclass
from typing import Any

from dockermirror.humanize import age, printable, size
from dockermirror.cache import INDEX_NAME, maintenance
from dockermirror.cache.index import ForeignDatabase, Index
from dockermirror.cache.space import filesystem, resolve
from dockermirror.cache.store import BlobStore
from dockermirror.cacheresults import CACHE_RESULTS, FROM_CACHE, hit_ratio
from dockermirror.config import Config
from dockermirror.routing import RegistryTable, looks_like_host, registry_key, upstream_repository
from dockermirror.oci import Digest, InvalidDigest, valid_name, valid_tag


class CommandError(Exception):
    """A problem to report in one line, with exit status 1."""


class BadTarget(CommandError):
    """cache rm's argument is no digest or reference: the user's mistake (exit status 2)."""


class NoCache(CommandError):
    """The cache directory does not exist, or holds no cache: the user named the wrong one."""


@dataclass
class Opened:
    config: Config
    store: BlobStore
    index: Index
    table: RegistryTable    # the configured upstreams, the default first

    @property
    def upstream(self) -> str:
        """The default upstream's key, as in the index."""
        return self.table.default

    def capacity(self) -> int:
        return resolve(self.config.cache.max_size, filesystem(self.store.root).total)


def open_cache(config: Config) -> Opened:
    root = config.cache.dir
    if not root.is_dir():
        raise NoCache(f"no cache at {root}: " + ("it is a file, not a directory" if root.exists()
                                                 else "the directory does not exist"))
    if not (root / INDEX_NAME).is_file():
        raise NoCache(f"{root} is not a docker-mirror cache: it has no {INDEX_NAME}")
    table = config.registry_table()
    pins = tuple(table.pattern(p) for p in config.cache.pin)
    try:
        index = Index(root / INDEX_NAME, pins=pins, create=False)
    except ForeignDatabase as exc:
        raise CommandError(f"{exc}: not a docker-mirror cache") from None
    except sqlite3.Error as exc:
        raise CommandError(f"cannot open {root / INDEX_NAME}: {exc} (run as root or as the cache's owner)") from None
    return Opened(config, BlobStore(root), index, table)


def when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    moment = datetime.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M")
    return f"{moment} ({age(time.time() - timestamp)} ago)"


# --- stats


def traffic(counters: dict[str, int]) -> dict[str, Any]:
    """Requests by result, hit ratio and bytes, from the counters (all, or one upstream's)."""
    requests = {k.removeprefix("requests_"): v for k, v in counters.items() if k.startswith("requests_")}
    served = {k.removeprefix("bytes_served_"): v for k, v in counters.items() if k.startswith("bytes_served_")}
    return {
        "requests": requests,
        "hit_ratio": hit_ratio({result: requests.get(result.lower(), 0) for result in CACHE_RESULTS}),
        "bytes_served": served,
        "bytes_served_from_cache": sum(served.get(result.lower(), 0) for result in FROM_CACHE),
        "bytes_fetched_upstream": counters.get("bytes_fetched", 0),
    }


def per_upstream(opened: Opened, counters: dict[str, int]) -> dict[str, dict[str, Any]]:
    """Every configured upstream (the default first) and every other one the index or the
    counters know (an upstream removed from the configuration): its content, tags and traffic."""
    index = opened.index
    usage, tags = index.upstream_usage(), index.upstream_tag_counts()
    own: dict[str, dict[str, int]] = {}
    for name, value in counters.items():
        if name.startswith("upstream/") and name.count("/") == 2:
            _, key, counter = name.split("/")
            own.setdefault(key, {})[counter] = value
    keys = list(opened.table.keys) + sorted((set(usage) | set(tags) | set(own)) - set(opened.table.keys))
    out = {}
    for key in keys:
        entries, stored, shared, shared_bytes = usage.get(key, (0, 0, 0, 0))
        out[key] = {
            "configured": key in opened.table.keys,
            "default": key == opened.table.default,
            "entries": entries,
            "bytes": stored,
            "shared": {"entries": shared, "bytes": shared_bytes},
            "tags": tags.get(key, 0),
            **traffic(own.get(key, {})),
        }
    return out


def stats(opened: Opened) -> dict[str, Any]:
    index = opened.index
    entries, stored = index.totals()
    kinds = index.kinds()
    pinned_entries, pinned_bytes = index.pinned_totals()
    counters = index.counters()
    tags = index.tag_count()
    unattributed = index.unattributed_totals()
    return {
        "cache_dir": str(opened.store.root),
        "bytes": stored,
        "max_bytes": opened.capacity(),
        "entries": entries,
        "blobs": {"entries": kinds.get("blob", (0, 0))[0], "bytes": kinds.get("blob", (0, 0))[1]},
        "manifests": {"entries": kinds.get("manifest", (0, 0))[0], "bytes": kinds.get("manifest", (0, 0))[1]},
        "tags": tags,
        "pinned": {"entries": pinned_entries, "bytes": pinned_bytes},
        "oldest_access": index.oldest_access(),
        **traffic(counters),
        # content several upstreams use is stored once and counted in each of them
        "upstreams": per_upstream(opened, counters),
        "no_upstream": {"entries": unattributed[0], "bytes": unattributed[1]},
    }


def print_stats(data: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(data, indent=2))
        return
    share = data["bytes"] / data["max_bytes"] * 100 if data["max_bytes"] else 0.0
    ratio = "-" if data["hit_ratio"] is None else f"{data['hit_ratio'] * 100:.1f}%"
    requests = ", ".join(f"{k} {v}" for k, v in sorted(data["requests"].items())) or "none yet"
    print(f"cache:          {data['cache_dir']}")
    print(f"size:           {size(data['bytes'])} of {size(data['max_bytes'])} ({share:.1f}%)")
    print(f"entries:        {data['entries']}: {data['blobs']['entries']} blobs ({size(data['blobs']['bytes'])}),"
          f" {data['manifests']['entries']} manifests ({size(data['manifests']['bytes'])}); {data['tags']} tags")
    print(f"pinned:         {data['pinned']['entries']} entries ({size(data['pinned']['bytes'])})")
    print(f"oldest access:  {when(data['oldest_access'])}")
    print(f"requests:       {requests}")
    print(f"hit ratio:      {ratio}")
    print(f"from cache:     {size(data['bytes_served_from_cache'])} served")
    print(f"from upstream:  {size(data['bytes_fetched_upstream'])} fetched")
    if len(data["upstreams"]) < 2:
        return      # the totals say it all
    print("per upstream (content that several upstreams use is stored once and counted in each):")
    for key, up in data["upstreams"].items():
        note = " (default)" if up["default"] else "" if up["configured"] else " (not configured any more)"
        shared = (f"; {up['shared']['entries']} of them ({size(up['shared']['bytes'])}) also used by other upstreams"
                  if up["shared"]["entries"] else "")
        ratio = "-" if up["hit_ratio"] is None else f"{up['hit_ratio'] * 100:.1f}%"
        requests = ", ".join(f"{k} {v}" for k, v in sorted(up["requests"].items())) or "none yet"
        print(f"  {key}{note}")
        print(f"    content:    {up['entries']} entries ({size(up['bytes'])}){shared}; {up['tags']} tags")
        print(f"    requests:   {requests}; hit ratio {ratio}")
        print(f"    traffic:    {size(up['bytes_served_from_cache'])} served from cache, "
              f"{size(up['bytes_fetched_upstream'])} fetched")
    if data["no_upstream"]["entries"]:
        print(f"  of no upstream: {data['no_upstream']['entries']} entries ({size(data['no_upstream']['bytes'])}),"
              " files found without a record of their repository (after a crash, or by verify) and kept")


# --- prune


def prune(opened: Opened, *, older_than: float | None, to_size: int | None, dry_run: bool) -> int:
    cache = opened.config.cache
    now = time.time()
    if older_than is None and to_size is None:  # the configured policy, once
        cutoffs = {kind: now - ttl for kind, ttl in (("blob", cache.blob_ttl), ("manifest", cache.manifest_ttl))
                   if ttl > 0}
        to_size = opened.capacity()
    else:
        cutoffs = {} if older_than is None else {"blob": now - older_than, "manifest": now - older_than}
    removed = maintenance.prune(opened.store, opened.index, cutoffs=cutoffs, to_size=to_size, dry_run=dry_run)
    if not dry_run:
        maintenance.count_manual(opened.index, len(removed), sum(e.size for e in removed))
    verb = "would remove" if dry_run else "removed"
    if dry_run:
        for entry in removed:
            print(f"{entry.digest}  {size(entry.size):>10}  {entry.kind:8}  last used {when(entry.last_access)}")
    print(f"{verb} {len(removed)} entries ({size(sum(e.size for e in removed))}); "
          f"the cache {'would hold' if dry_run else 'holds'} "
          f"{size(opened.index.totals()[1] - (sum(e.size for e in removed) if dry_run else 0))}")
    return 0


# --- verify


def verify(opened: Opened, *, repair: bool) -> int:
    def progress(entry, problem: str) -> None:
        print(f"{entry.digest}: {problem}", flush=True)

    report = maintenance.verify(opened.store, opened.index, repair=repair, progress=progress)
    for adopted in report.adopted:
        print(f"{adopted}: file without an index entry, matches its digest: adopted")
    for name in report.misplaced:
        print(f"{name}: not a directory, in the place of the cache's directory of files"
              + (": removed (and the directory made)" if repair else " (--repair removes it)"))
    for unusable in report.unusable:    # (escaped as the stray names are)
        print(f"{printable(os.fsencode(unusable.path), quote=False)}: {unusable.problem}")
    for stray in report.stray:
        stray = printable(os.fsencode(stray), quote=False)   # (a name may hold ESC, CR...: shown escaped)
        print(f"{stray}: file without an index entry " + (
            "that does not match its name: removed" if repair else "(not served; --repair adopts or removes it)"))
    print(f"{report.checked} entries checked: {len(report.missing)} missing, {len(report.corrupt)} corrupt"
          + (f"; {report.removed} removed" if repair and report.problems else "")
          + ("; the server re-hashes the corrupt ones before serving them, and removes them"
             if report.corrupt and not repair else ""))
    return 1 if report.problems else 0


# --- rm


def rm(opened: Opened, target: str) -> int:
    index = opened.index
    if target.startswith(("sha256:", "sha512:")):
        try:
            digest = Digest.parse(target)
        except InvalidDigest as exc:
            raise BadTarget(str(exc)) from None
        entry = index.content(str(digest))
        tags = index.tags_pointing_to(str(digest))
        if entry is None and not tags:
            raise CommandError(f"{digest} is not in the cache")
        if entry is not None:
            maintenance.remove(opened.store, index, [entry.digest])
            maintenance.count_manual(index, 1, entry.size)
        for upstream, repository, tag in tags:
            index.delete_tag(upstream, repository, tag)
        print(f"removed {digest}" + (f" ({size(entry.size)})" if entry else "")
              + (f" and {len(tags)} tag(s) pointing at it" if tags else ""))
        return 0
    key, repository, tag = route(opened, target)
    shown = repository if opened.table.keys == [key] else f"{key}/{repository}"
    if tag:
        row = index.tag(key, repository, tag)
        if row is None:
            raise CommandError(f"{shown}:{tag} is not in the cache")
        index.delete_tag(key, repository, tag)
        print(f"forgot {shown}:{tag} (was {row.digest}); the next pull asks the upstream")
        return 0
    digests = index.repository_digests(key, repository)
    tags = index.tags_of(key, repository)
    if not digests and not tags:
        raise CommandError(f"{shown} is not in the cache")
    own = [d for d, shared in digests.items() if not shared and index.content(d) is not None]
    freed = sum(e.size for e in (index.content(d) for d in own) if e)
    maintenance.remove(opened.store, index, own)
    maintenance.count_manual(index, len(own), freed)
    index.delete_repository(key, repository)
    kept = len(digests) - len(own)
    print(f"removed {shown}: {len(tags)} tag(s), {len(own)} entries ({size(freed)})"
          + (f"; kept {kept} entries other repositories use" if kept else ""))
    return 0


def route(opened: Opened, target: str) -> tuple[str, str, str]:
    """(upstream key, repository, tag or '') of ``[REGISTRY/]REPOSITORY[:TAG]``, as the server
    routes a path: a first component that looks like a host names the registry (a configured
    one, or one the index still holds, such as an upstream removed from the configuration);
    anything else is the default upstream's (``busybox`` is docker.io's library/busybox)."""
    head, _, last = target.rpartition("/")
    last, colon, tag = last.partition(":")
    name = f"{head}/{last}" if head else last
    if (colon and not valid_tag(tag)) or not name:
        raise BadTarget(f"{target!r} is neither a digest nor [REGISTRY/]REPOSITORY[:TAG]")
    first, _, rest = name.partition("/")
    if looks_like_host(first):
        key = opened.table.lookup(first) or registry_key(first)
        if not rest:
            raise BadTarget(f"{first} is a registry: name a repository in it, as in {first}/<repository>")
        if key not in opened.table.keys and not opened.index.knows_upstream(key):
            raise BadTarget(f"{first} is not a configured upstream ({', '.join(opened.table.keys)}) and the "
                               "cache holds nothing of it")
        name = rest
    else:
        key = opened.upstream
    if not valid_name(name):
        raise BadTarget(f"{target!r} is neither a digest nor [REGISTRY/]REPOSITORY[:TAG]")
    return key, upstream_repository(key, name), tag


def run(config: Config, command: str, **options: Any) -> int:
    opened = open_cache(config)
    try:
        if command == "stats":
            print_stats(stats(opened), options["json"])
            return 0
        if command == "prune":
            return prune(opened, older_than=options["older_than"], to_size=options["to_size"],
                         dry_run=options["dry_run"])
        if command == "verify":
            return verify(opened, repair=options["repair"])
        if command == "rm":
            return rm(opened, options["target"])
        raise AssertionError(command)
    except BrokenPipeError:
        sys.stderr.close()
        return 0
    finally:
        opened.index.close()

