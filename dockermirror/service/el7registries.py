"""CentOS 7's podman 1.6.4 and skopeo 0.1.40: the mirror in ``/etc/containers/registries.conf`` itself.

Their containers/image (v5.0.0, read at that tag: ``pkg/sysregistriesv2``) reads that one file
and no ``registries.conf.d`` drop-ins. The file EL7 ships is in the v1 format
(``[registries.search]``, ``[registries.insecure]``, ``[registries.block]``), and a file with
both v1 tables and v2 ``[[registry]]`` entries is refused ("mixing sysregistry v1/v2 is not
supported"), so the steps keep a copy of the file and write it again in v2: the v1 search list as
``unqualified-search-registries``, each v1 insecure or blocked registry as a ``[[registry]]`` with
``insecure``/``blocked`` (what v5.0.0's own ConvertToV2 does), then the mirror entries. v5.0.0's
v2 keys: ``prefix``, ``location``, ``insecure``, ``blocked``, ``mirror-by-digest-only``,
``[[registry.mirror]]`` with ``location`` and ``insecure``; ``unqualified-search-registries``.

The steps are plain sh with grep, sed, tr, cp and mv (all in EL7's base), safe to run again: the
copy is made once, and a file they wrote is written again from that copy. A file already in v2
that they did not write is left alone (its owner adds the entries by hand).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

CONF = "/etc/containers/registries.conf"
BACKUP = f"{CONF}.before-docker-mirror"
BLOCKS = "/etc/containers/docker-mirror.registries.conf"      # the mirror entries alone
MARK = "# written by docker-mirror client-setup"


def el7_registries_conf(blocks: str, mirrored: Sequence[str], write_file: Callable[[str, str], str]) -> list[str]:
    """The steps: ``blocks``, the v2 ``[[registry]]`` entries of the mirror, for the registries
    ``mirrored`` (a v1 insecure or blocked registry among them stops the steps: the two
    would be one registry with conflicting settings, which containers/image refuses)."""
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
        f"conf={CONF} backup={BACKUP} mirrored='{names}'",
        f"mark='{MARK}'",
        "# v1 lists of the copy: registries of [registries.search], .insecure, .block as a TOML array",
        "v1() { sed 's/#.*//' \"$backup\" | tr '\\n' ' ' |",
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
        "  copied=yes clash=''",
        "  if [ -f \"$conf\" ] && ! grep -q \"^$mark\" \"$conf\"; then cp -p \"$conf\" \"$backup\" || copied=''; fi",
        "  if [ -f \"$backup\" ]; then",
        "    for r in $(names insecure) $(names block); do",
        "      case \" $mirrored \" in *\" $r \"*) clash=\"$clash $r\";; esac",
        "    done",
        "  fi",
        "  if [ -z \"$copied\" ]; then",
        "    echo \"docker-mirror: could not copy $conf to $backup: $conf left as it was\" >&2",
        "  elif [ -n \"$clash\" ]; then",
        "    echo \"docker-mirror: $backup lists$clash as insecure or blocked, and the mirror serves it: "
        f"merge {BLOCKS} into $conf by hand\" >&2",
        "  else",
        "    {",
        "      echo \"$mark: v2 format for podman 1.6 (the file before: $backup)\"",
        "      if [ -f \"$backup\" ] && [ -n \"$(v1 search)\" ]; then",
        "        echo \"unqualified-search-registries = $(v1 search)\"",
        "      fi",
        "      if [ -f \"$backup\" ]; then",
        "        for r in $(names insecure); do",
        "          printf '\\n[[registry]]\\nlocation = \"%s\"\\ninsecure = true\\n' \"$r\"; done",
        "        for r in $(names block); do",
        "          printf '\\n[[registry]]\\nlocation = \"%s\"\\nblocked = true\\n' \"$r\"; done",
        "      fi",
        "      echo",
        f"      cat {BLOCKS}",
        "    } > \"$conf.new\" && mv \"$conf.new\" \"$conf\"",
        "    if command -v restorecon >/dev/null; then restorecon \"$conf\"; fi    # its SELinux label",
        "  fi",
        "fi",
        "# EL7's docker package reads this file too, through registries.service (/usr/libexec/registries), which",
        "# knows only v1: after the conversion docker gets no --add-registry/--insecure-registry/--block-registry",
        "# flags from it. If docker needs them, put them in /etc/sysconfig/docker (ADD_REGISTRY=, INSECURE_REGISTRY=,",
        "# BLOCK_REGISTRY=, which docker.service passes too); what it got from the v1 file:",
        f"#   /usr/libexec/registries -i {BACKUP}",
    ]
