"""CentOS 7's podman 1.6.4 and skopeo 0.1.40: the mirror in ``/etc/containers/registries.conf`` itself.

Their containers/image (v5.0.0, read at that tag: ``pkg/sysregistriesv2``) reads that one file
and no ``registries.conf.d`` drop-ins. The file EL7 ships is in the v1 format
(``[registries.search]``, ``[registries.insecure]``, ``[registries.block]``), and a file with
both v1 tables and v2 ``[[registry]]`` entries is refused ("mixing sysregistry v1/v2 is not
supported"), so the steps keep a copy of the file and write it again in v2: the v1 search list as
``unqualified-search-registries``, each v1 insecure or blocked registry as one ``[[registry]]`` with
``insecure``/``blocked`` or both (what v5.0.0's own ConvertToV2 does: a location defined twice is
refused), then the mirror entries. v5.0.0's
v2 keys: ``prefix``, ``location``, ``insecure``, ``blocked``, ``mirror-by-digest-only``,
``[[registry.mirror]]`` with ``location`` and ``insecure``; ``unqualified-search-registries``.

The steps are plain sh with grep, sed, tr, cp and mv (all in EL7's base), safe to run again: the
copy is made once, only when the file is converted (a clash is checked first), and a file they
wrote is written again from that copy, after keeping it as ``PREV`` if it changed since (hand
edits, or other upstreams). A file already in v2 that they did not write is left alone (its owner
adds the entries by hand). EL7's docker package took the v1 lists as flags (registries.service,
v1 only): the steps print the ``/etc/sysconfig/docker`` lines that keep them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

CONF = "/etc/containers/registries.conf"
BACKUP = f"{CONF}.before-docker-mirror"
BLOCKS = "/etc/containers/docker-mirror.registries.conf"      # the mirror entries alone
PREV = f"{CONF}.docker-mirror-prev"                           # a written file changed since, kept
MARK = "# written by docker-mirror client-setup"
SYSCONFIG = "/etc/sysconfig/docker"


def el7_registries_conf(blocks: str, mirrored: Sequence[str], write_file: Callable[[str, str], str],
                        insecure_in_daemon_json: bool = False) -> list[str]:
    """The steps: ``blocks``, the v2 ``[[registry]]`` entries of the mirror, for the registries
    ``mirrored`` (a v1 insecure or blocked registry among them stops the steps: the two
    would be one registry with conflicting settings, which containers/image refuses);
    ``insecure_in_daemon_json``: the steps set dockerd's insecure-registries in daemon.json (so
    the v1 insecure registries go there, not to an --insecure-registry flag)."""
    names = " ".join(mirrored)
    return [
        "# CentOS 7's podman 1.6.4 and skopeo 0.1.40 (containers/image v5.0) read no registries.conf.d",
        f"# drop-ins: the mirror goes into {CONF} itself, in the v2 format. EL7 ships that file in",
        "# the v1 format ([registries.search]), and v1 and v2 cannot be mixed in one file: the steps keep a",
        f"# copy ({BACKUP}) and write the file again in v2, with the v1 search list as",
        "# unqualified-search-registries, its insecure and blocked registries as [[registry]] entries, and",
        f"# the mirror's entries (kept alone in {BLOCKS}). A file already in v2 is left alone:",
        "# add those entries to it by hand.",
        write_file(BLOCKS, blocks),
        f"conf={CONF} backup={BACKUP} prev={PREV} mirrored='{names}'",
        f"mark='{MARK}'",
        "# v1 lists of $v1file: registries of [registries.search], .insecure, .block as a TOML array",
        "v1() { sed 's/#.*//' \"$v1file\" | tr '\\n' ' ' |",
        "  sed -n \"s/.*\\[registries\\.$1\\][^[]*registries[[:space:]]*=[[:space:]]*\\(\\[[^]]*\\]\\).*/\\1/p\"; }",
        "names() { v1 \"$1\" | tr -d \"[]'\\\"\" | tr ',' ' '; }",
        "if [ -f \"$conf\" ] && ! grep -q \"^$mark\" \"$conf\" &&",
        "   grep -Eq '^[[:space:]]*(\\[\\[registry\\]\\]|unqualified-search-registries)' \"$conf\"; then",
        "  echo \"docker-mirror: $conf is in the v2 format already: add the entries of "
        f"{BLOCKS} to it by hand\" >&2",
        "elif [ -f \"$conf\" ] && ! grep -q \"^$mark\" \"$conf\" && [ -f \"$backup\" ]; then",
        "  echo \"docker-mirror: $conf and an earlier copy $backup both exist: keep the one you want as "
        "$backup, remove $conf, and run these steps again\" >&2",
        "else",
        "  # the v1 file: the one there (the first time), or the copy (a file these steps wrote)",
        "  v1file=$backup",
        "  if [ -f \"$conf\" ] && ! grep -q \"^$mark\" \"$conf\"; then v1file=$conf; fi",
        "  clash=''",
        "  if [ -f \"$v1file\" ]; then",
        "    for r in $(names insecure) $(names block); do",
        "      case \" $mirrored \" in *\" $r \"*) clash=\"$clash $r\";; esac",
        "    done",
        "  fi",
        "  if [ -n \"$clash\" ]; then",
        "    echo \"docker-mirror: $v1file lists$clash as insecure or blocked, and the mirror serves it: "
        f"merge {BLOCKS} into $conf by hand\" >&2",
        "  elif [ \"$v1file\" = \"$conf\" ] && ! cp -p \"$conf\" \"$backup\"; then",
        "    echo \"docker-mirror: could not copy $conf to $backup: $conf left as it was\" >&2",
        "  else",
        "    v1file=$backup",
        "    {",
        "      echo \"$mark: v2 format for podman 1.6 (the file before: $backup)\"",
        "      if [ -f \"$backup\" ] && [ -n \"$(v1 search)\" ]; then",
        "        echo \"unqualified-search-registries = $(v1 search)\"",
        "      fi",
        "      if [ -f \"$backup\" ]; then",
        "        # one entry per registry (containers/image refuses a location defined twice)",
        "        seen=' ' insecure=\" $(names insecure) \" blocked=\" $(names block) \"",
        "        for r in $insecure $blocked; do",
        "          case \"$seen\" in *\" $r \"*) continue;; esac",
        "          seen=\"$seen$r \"",
        "          printf '\\n[[registry]]\\nlocation = \"%s\"\\n' \"$r\"",
        "          case \"$insecure\" in *\" $r \"*) echo 'insecure = true';; esac",
        "          case \"$blocked\" in *\" $r \"*) echo 'blocked = true';; esac",
        "        done",
        "      fi",
        "      echo",
        f"      cat {BLOCKS}",
        "    } > \"$conf.new\"",
        "    # pasted again: a file changed since it was written (by hand, or for other registries) is kept",
        "    if [ -f \"$conf\" ] && [ \"$(cat \"$conf\")\" != \"$(cat \"$conf.new\")\" ] && grep -q \"^$mark\" \"$conf\"; then",
        "      cp -p \"$conf\" \"$prev\"",
        "      echo \"docker-mirror: $conf differs from what these steps write (edited by hand, or written for other "
        "registries): kept as $prev; add your edits to the new $conf\" >&2",
        "    fi",
        "    mv \"$conf.new\" \"$conf\"",
        "    if command -v restorecon >/dev/null; then restorecon \"$conf\"; fi    # its SELinux label",
        *_docker_flags(insecure_in_daemon_json),
        "  fi",
        "fi",
    ]


def _docker_flags(insecure_in_daemon_json: bool) -> list[str]:
    """EL7's docker package took the v1 lists as flags (registries.service runs /usr/libexec/registries,
    which knows only v1, into /run/containers/registries.conf, passed as $REGISTRIES): after the
    conversion it gets none, so the steps print what it had, as /etc/sysconfig/docker lines (its
    docker.service passes $ADD_REGISTRY $BLOCK_REGISTRY $INSECURE_REGISTRY too)."""
    insecure = ('        echo "and add $(printf \'"%s", \' $(names insecure) | sed \'s/, $//\') to '
                '\\"insecure-registries\\" in /etc/docker/daemon.json (INSECURE_REGISTRY= there would clash '
                'with it: dockerd would not start)"'
                if insecure_in_daemon_json else '        echo "INSECURE_REGISTRY=\'$(flags insecure insecure-registry)\'"')
    return [
        "    flags() { for r in $(names \"$1\"); do printf -- '--%s %s ' \"$2\" \"$r\"; done | sed 's/ $//'; }",
        "    if [ -f \"$backup\" ] && [ -n \"$(names search)$(names block)$(names insecure)\" ]; then",
        "      {",
        "      echo \"docker-mirror: EL7's docker package took the lists of the v1 file ($backup) as flags,"
        " through registries.service, which cannot read the v2 file: to keep them, put in"
        f" {SYSCONFIG} (then systemctl restart docker):\"",
        "      if [ -n \"$(names search)\" ]; then echo \"ADD_REGISTRY='$(flags search add-registry)'\"; fi",
        "      if [ -n \"$(names block)\" ]; then echo \"BLOCK_REGISTRY='$(flags block block-registry)'\"; fi",
        "      if [ -n \"$(names insecure)\" ]; then",
        insecure,
        "      fi",
        "      } >&2",
        "    fi",
    ]
