"""``docker-mirror lb-config``: an HAProxy or nginx configuration for several mirrors.

Pure text generation. The balancer routes by content so that each blob is fetched from the
upstream once per cluster:

- ``/v2/<name>/blobs/<algorithm>:<hex>``                 key = the digest (whatever repository names it)
- ``/v2/<name>/(manifests|tags|referrers)/<one segment>`` key = the repository: ``<name>`` without a
  leading registry host (a first component with ``.`` or ``:``, or ``localhost``: the node's rule,
  dockermirror/routing.py ``looks_like_host``), ``library/`` added to a one-component name, ``?ns=``
  ignored; so dockerd (``/v2/library/alpine``), containerd (``?ns=docker.io``, override_path) and
  podman (a prefixed location: ``/v2/docker.io/library/alpine``) meet on one node. Same-named
  repositories of two registries share a node, which is harmless.
- anything else (``/v2/``, ``/healthz``, malformed digests) no key: any node (a node answers a
  malformed digest with an error itself)

with consistent hashing, so a node that goes away moves only its own keys and gets them back.
:func:`route_key` is the same rule in Python, for the tests and for reading.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# The digest grammar of the OCI image spec: algorithm [a-z0-9]+ with + . _ - separators, ':',
# then the encoded part [a-zA-Z0-9=_-]+.
_ALGORITHM = r"[a-z0-9]+([+._-][a-z0-9]+)*"
_ENCODED = r"[a-zA-Z0-9=_-]+"
BLOB_PATH = rf"^/v2/.+/blobs/{_ALGORITHM}:{_ENCODED}$"
REPO_PATH = r"^/v2/.+/(manifests|tags|referrers)/[^/]+$"
_BLOB = re.compile(rf"^/v2/.+/blobs/(?P<digest>{_ALGORITHM}:{_ENCODED})$")
# the node's registry prefix (routing.looks_like_host) is stripped; HAProxy uses this regex as is
_HOST = r"[^/]*[.:][^/]*|localhost"
REPO_KEY = rf"^/v2/(({_HOST})/)?(.+)/(manifests|tags|referrers)/[^/]+$"      # group 3: the repository
_REPO = re.compile(REPO_KEY)

KEY_HEADER = "X-Docker-Mirror-Route"     # HAProxy only: carries the key to `balance hdr()`
UPSTREAM = "docker_mirror_nodes"
HAPROXY_VERSIONS = ("Needs HAProxy >= 1.5: 1.5 (EL7), 1.8 (EL8, EL7's rh-haproxy18), 2.4 (EL9),",
                    "2.6 (Debian 12: tested). The key is made with replace-header, not regsub (1.6+); a",
                    "percent-encoded /v2/ path is refused with a plain 'http-request deny' (403: deny_status is 1.6+).")
NGINX_VERSIONS = ("Needs nginx >= 1.12 (a map value of text and variables, $request_id): 1.14 and 1.20",
                  "(EL8), 1.20 (EL7 EPEL, EL9), 1.22 (Debian 12: tested).")
NGINX_TLS_VERSIONS = ("Needs nginx >= 1.13 (ssl_protocols TLSv1.3; a map value of text and variables,",
                      "$request_id): 1.14 and 1.20 (EL8), 1.20 (EL7 EPEL, EL9), 1.22 (Debian 12: tested).")
CLIENT_AUTH_NOTE = ("nodes with tls.client_auth: required pass /healthz but refuse (401) every request "
                    "from the balancer unless it shows one: give --node-client-cert PEM")
TIMEOUT = "10m"      # between two reads or writes of a big blob; not the whole transfer


def route_key(path: str, query: str = "") -> str | None:
    """The balancing key of a request (``None``: no key, any node), as the generated configurations compute it."""
    blob = _BLOB.match(path)
    if blob:
        return blob.group("digest")
    repo = _REPO.match(path)
    if repo:
        name = repo.group(3)      # ?ns= plays no part: the node serves the same repository with or without it
        return name if "/" in name else f"library/{name}"
    return None


@dataclass(frozen=True)
class Options:
    listen: str                               # HOST:PORT
    nodes: tuple[str, ...]                    # HOST:PORT each
    tls_cert: str | None = None               # PEM with certificate chain and key: TLS ends at the balancer
    node_tls: bool = False                    # nodes speak HTTPS
    node_ca: str | None = None                # verify nodes against this CA
    node_tls_name: str | None = None          # the name every node's certificate carries
    node_client_cert: str | None = None       # PEM (certificate and key) shown to nodes that ask for one
    passthrough: bool = False                 # TLS passed through to the nodes: no content routing


class OptionError(ValueError):
    """A user's mistake: ``flag`` and a message that says what to do."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(message)
        self.flag = flag


_ADDRESS = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(?P<port>[0-9]{1,5})$")
_UNSAFE = re.compile(r"[\s\"'`;#{}\\$]")


def check_address(flag: str, text: str) -> str:
    found = _ADDRESS.match(text)
    if not found or not 0 < int(found.group("port")) < 65536:
        raise OptionError(flag, f"{text!r} is not HOST:PORT; give e.g. 10.0.0.11:5000 or [2001:db8::1]:5000 "
                                "(no scheme, no path)")
    return text


def check_path(flag: str, text: str) -> str:
    if not text.startswith("/") or _UNSAFE.search(text):
        raise OptionError(flag, f"{text!r} is not an absolute path without spaces, quotes, ';', '#', '{{', '}}' "
                                "or '$'; give the path the balancer reads, e.g. /etc/haproxy/docker-mirror.pem")
    return text


def check(options: Options, engine: str) -> Options:
    """The options, or :class:`OptionError` for the first mistake."""
    check_address("--listen", options.listen)
    if not options.nodes:
        raise OptionError("--node", "no nodes; give --node HOST:PORT once for each docker-mirror")
    for node in options.nodes:
        check_address("--node", node)
    duplicates = sorted({n for n in options.nodes if options.nodes.count(n) > 1})
    if duplicates:
        raise OptionError("--node", f"{duplicates[0]} is given twice; give each node once")
    if options.tls_cert is not None:
        check_path("--tls-cert", options.tls_cert)
    if options.node_client_cert is not None:
        check_path("--node-client-cert", options.node_client_cert)
        if options.passthrough:
            raise OptionError("--node-client-cert", "with --passthrough the clients' own certificates reach the "
                                                    "nodes; drop --node-client-cert")
        if not options.node_tls:
            raise OptionError("--node-client-cert", "the nodes speak plain HTTP; add --node-tls")
    if options.node_ca is not None:
        check_path("--node-ca", options.node_ca)
        if not (options.node_tls or options.passthrough):
            raise OptionError("--node-ca", "the nodes speak plain HTTP; add --node-tls if they speak HTTPS")
    if options.node_tls_name is not None and not _ADDRESS.match(f"{options.node_tls_name}:1"):
        raise OptionError("--node-tls-name", f"{options.node_tls_name!r} is not a host name; give the DNS name "
                                             "every node's certificate carries")
    if options.node_tls_name is not None and options.node_ca is None:
        raise OptionError("--node-tls-name", "names are checked only with --node-ca; add --node-ca CA")
    if options.passthrough and options.tls_cert is not None:
        raise OptionError("--passthrough", "TLS passes through to the nodes, so the balancer needs no certificate; "
                                           "drop --tls-cert, or drop --passthrough to end TLS at the balancer")
    if (engine == "nginx" and options.node_ca is not None and options.node_tls_name is None
            and not options.passthrough):
        raise OptionError("--node-ca", "nginx checks one name on every node's certificate; add --node-tls-name "
                                       "NAME (a DNS name all node certificates carry)")
    return options


def command(options: Options, engine: str) -> str:
    """The command line that prints this configuration (the first line of its header)."""
    words = ["docker-mirror", "lb-config", engine, "--listen", options.listen]
    for node in options.nodes:
        words += ["--node", node]
    if options.tls_cert:
        words += ["--tls-cert", options.tls_cert]
    if options.node_tls:
        words.append("--node-tls")
    if options.node_ca:
        words += ["--node-ca", options.node_ca]
    if options.node_tls_name:
        words += ["--node-tls-name", options.node_tls_name]
    if options.node_client_cert:
        words += ["--node-client-cert", options.node_client_cert]
    if options.passthrough:
        words.append("--passthrough")
    return " ".join(words)


def _header(options: Options, engine: str, lines: list[str]) -> list[str]:
    versions = HAPROXY_VERSIONS if engine == "haproxy" else (NGINX_TLS_VERSIONS if options.tls_cert
                                                             else NGINX_VERSIONS)
    head = [f"# {command(options, engine)}",
            f"# {engine} configuration for {len(options.nodes)} docker-mirror node(s), printed by the command above.",
            *(f"# {line}" for line in versions)]
    return head + [f"# {line}" if line else "#" for line in lines]


def haproxy(options: Options) -> str:
    o = check(options, "haproxy")
    if o.passthrough:
        return _haproxy_passthrough(o)
    tls_node = o.node_tls
    out = _header(o, "haproxy", [
        "Routing: blobs by digest, manifests, tags and referrers by repository (without a registry",
        "prefix, ?ns= ignored: every client's form of one repository meets on one node), with",
        "consistent hashing: each blob is fetched from the upstream by one node, whatever repository",
        "names it; a node that fails its /healthz check gives only its own keys to the others, and",
        "gets them back when it passes again. Requests without a key (/v2/, tokens) go round-robin.",
        "Bodies stream (HAProxy buffers no body to disk); Range and HEAD pass unchanged.",
        "The ring follows the server ids: keep each node's 'id N' when adding or removing nodes",
        "(a new node gets a new id; never renumber), or keys of surviving nodes move.",
        "",
        "A file of its own (haproxy -f DIR, or append it to haproxy.cfg); its defaults section",
        "applies to the sections below it only. Add 'log' lines to suit your logging.",
    ])
    out += ["", "defaults",
            "    mode http",
            "    option forwardfor    # X-Forwarded-For: the client's address",
            "    option redispatch    # a refused connection is retried on another node",
            "    retries 2",
            "    timeout connect 5s",
            f"    timeout client {TIMEOUT}    # idle time within a big blob's transfer, not its whole length",
            f"    timeout server {TIMEOUT}    # a cold blob: the node waits for its upstream",
            "    timeout http-request 30s",
            "    timeout http-keep-alive 1m",
            "    timeout queue 1m",
            "    timeout check 5s",
            "",
            "frontend docker_mirror"]
    if o.tls_cert:
        out += [f"    bind {o.listen} ssl crt {o.tls_cert} no-sslv3 no-tlsv10 no-tlsv11    # TLS ends here: "
                "certificate chain and key in one PEM; TLS 1.2 or later",
                "    http-request set-header X-Forwarded-Proto https"]
    else:
        out += [f"    bind {o.listen}"]
    out += ["    # no repository name or digest needs percent-encoding; the node would decode what the key",
            "    # was made from undecoded, so such a path is refused (403) instead of going round-robin",
            "    http-request deny if { path_beg /v2/ } { path_sub % }",
            f"    default_backend {UPSTREAM}",
            "",
            f"backend {UPSTREAM}",
            f"    # the key travels in {KEY_HEADER} to 'balance hdr'; a client's own value is dropped,",
            "    # and http-send-name-header replaces it with the chosen server's name on the way out,",
            "    # so no node ever sees a key",
            f"    acl dm_blob path_reg {BLOB_PATH}",
            f"    acl dm_repo path_reg {REPO_PATH}",
            f"    http-request del-header {KEY_HEADER}",
            f"    http-request set-header {KEY_HEADER} %[path] if dm_blob",
            f"    http-request replace-header {KEY_HEADER} ^/v2/.+/blobs/([^/]+)$ \\1 if dm_blob",
            "    # a repository's key: its name without a registry host prefix, library/ added to one component",
            f"    http-request set-header {KEY_HEADER} %[path] if dm_repo !dm_blob",
            f"    http-request replace-header {KEY_HEADER} {REPO_KEY} \\3 if dm_repo !dm_blob",
            f"    http-request replace-header {KEY_HEADER} ^([^/]+)$ library/\\1 if dm_repo !dm_blob",
            f"    http-send-name-header {KEY_HEADER}",
            f"    balance hdr({KEY_HEADER})",
            "    hash-type consistent",
            "    option httpchk GET /healthz    # answers without asking the upstream",
            "    http-check expect status 200",
            "    default-server inter 2s fall 3 rise 2 observe layer4 error-limit 1 on-error mark-down"]
    if tls_node:
        if o.node_ca:
            verify = f"ssl verify required ca-file {o.node_ca}" + (f" verifyhost {o.node_tls_name}"
                                                                   if o.node_tls_name else "")
            if not o.node_tls_name:
                out.append("    # node certificates are checked against the CA; add --node-tls-name to check a name")
        else:
            verify = "ssl verify none"
            out.append("    # HTTPS to the nodes WITHOUT checking their certificates: give --node-ca CA to check them")
        if o.node_client_cert:
            verify += f" crt {o.node_client_cert}"     # for nodes with tls.client_auth: required
        else:
            out.append(f"    # {CLIENT_AUTH_NOTE}")
    for number, node in enumerate(o.nodes, 1):
        out.append(f"    server node{number} {node} id {number} check" + (f" {verify}" if tls_node else ""))
    return "\n".join(out) + "\n"


PASSTHROUGH_TAIL = [
    "cluster. The nodes terminate TLS with their own certificates, and see the balancer's",
    "address, not the client's. Prefer TLS terminated at the balancer (--tls-cert) unless TLS",
    "must reach the nodes (client certificates checked by docker-mirror itself).",
]


def _haproxy_passthrough(o: Options) -> str:
    out = _header(o, "haproxy", [
        "TLS PASSTHROUGH (mode tcp): the balancer sees no URL, so there is NO content routing:",
        "clients are spread by their source address (consistent hashing), and the same blob pulled",
        "by clients on different nodes is fetched from the upstream once per NODE, not once per",
        *PASSTHROUGH_TAIL,
    ])
    check_opts = (f"check-ssl verify required ca-file {o.node_ca}" + (f" verifyhost {o.node_tls_name}"
                                                                       if o.node_tls_name else "")
                  if o.node_ca else "check-ssl verify none")     # on each server: 1.5 has none in default-server
    out += ["", "defaults",
            "    mode tcp",
            "    timeout connect 5s",
            f"    timeout client {TIMEOUT}",
            f"    timeout server {TIMEOUT}",
            "    timeout check 5s",
            "",
            "frontend docker_mirror",
            f"    bind {o.listen}",
            f"    default_backend {UPSTREAM}",
            "",
            f"backend {UPSTREAM}",
            "    balance source",
            "    hash-type consistent",
            "    option httpchk GET /healthz    # over TLS to each node (check-ssl)",
            "    http-check expect status 200",
            "    default-server inter 2s fall 3 rise 2 observe layer4 error-limit 1 on-error mark-down"]
    out += [f"    server node{number} {node} id {number} check {check_opts}"
            for number, node in enumerate(o.nodes, 1)]
    return "\n".join(out) + "\n"


def nginx(options: Options) -> str:
    o = check(options, "nginx")
    if o.passthrough:
        return _nginx_passthrough(o)
    scheme = "https" if o.node_tls else "http"
    out = _header(o, "nginx", [
        "For the http {} context: e.g. /etc/nginx/conf.d/docker-mirror.conf (Debian's and EL's",
        "nginx.conf include conf.d/*.conf inside http {}).",
        "Routing: blobs by digest, manifests, tags and referrers by repository (without a registry",
        "prefix, ?ns= ignored: every client's form of one repository meets on one node), with",
        "consistent hashing (on the node addresses: their order does not matter): each blob is",
        "fetched from the upstream by one node, whatever repository names it. Requests without a",
        "key (/v2/, tokens) are spread by $request_id.",
        "Health: open-source nginx has no active health checks. A node is taken out passively",
        "(max_fails failed connections within fail_timeout, then for fail_timeout), and the request",
        "is retried on the next node (proxy_next_upstream); /healthz is the URL to watch from your",
        "monitoring. Bodies stream (no buffering, no temporary files); Range and HEAD pass unchanged.",
    ])
    out += ["",
            "# $uri is decoded (%xx) and normalised, as the node decodes the path it serves: the key is",
            "# made from what the node sees. A repository: its name without a registry host prefix,",
            "# library/ added to a one-component name (the first matching regex wins).",
            "map $uri $docker_mirror_key {",
            f'    "~^/v2/.+/blobs/(?<docker_mirror_digest>{_ALGORITHM}:{_ENCODED})$"  $docker_mirror_digest;',
            f'    "~^/v2/(?:(?:{_HOST})/)?(?<docker_mirror_one>[^/]+)/(?:manifests|tags|referrers)/[^/]+$"  '
            '"library/$docker_mirror_one";',
            f'    "~^/v2/(?:(?:{_HOST})/)?(?<docker_mirror_repo>.+)/(?:manifests|tags|referrers)/[^/]+$"  '
            '$docker_mirror_repo;',
            "    default  $request_id;",
            "}",
            "",
            f"upstream {UPSTREAM} {{",
            "    hash $docker_mirror_key consistent;"]
    out += [f"    server {node} max_fails=2 fail_timeout=10s;" for node in o.nodes]
    out += ["    keepalive 32;",
            "}",
            "",
            "server {"]
    if o.tls_cert:
        out += [f"    listen {o.listen} ssl;    # TLS ends here",
                f"    ssl_certificate {o.tls_cert};    # certificate chain and key in one PEM",
                f"    ssl_certificate_key {o.tls_cert};",
                "    ssl_protocols TLSv1.2 TLSv1.3;    # TLSv1.3: nginx >= 1.13"]
    else:
        out += [f"    listen {o.listen};"]
    out += ["    client_max_body_size 1m;    # a mirror takes no uploads",
            "",
            "    location / {",
            f"        proxy_pass {scheme}://{UPSTREAM};",
            "        proxy_http_version 1.1;    # keep-alive to the nodes",
            '        proxy_set_header Connection "";',
            "        proxy_set_header Host $http_host;",
            "        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
            "        proxy_set_header X-Forwarded-Proto $scheme;",
            f'        proxy_set_header {KEY_HEADER} "";    # a value sent by a client never reaches a node',
            "        proxy_buffering off;    # stream blobs as they come: no memory buffers, no temporary files",
            "        proxy_request_buffering off;",
            "        proxy_max_temp_file_size 0;",
            "        proxy_redirect off;",
            "        proxy_connect_timeout 5s;",
            f"        proxy_read_timeout {TIMEOUT};    # between two reads: a cold blob waits for the upstream",
            f"        proxy_send_timeout {TIMEOUT};",
            "        proxy_next_upstream error timeout;",
            "        proxy_next_upstream_tries 3;"]
    if o.node_tls:
        if o.node_ca:
            out += ["        proxy_ssl_verify on;",
                    f"        proxy_ssl_trusted_certificate {o.node_ca};",
                    "        proxy_ssl_verify_depth 2;    # a node certificate signed by an intermediate of the CA",
                    f"        proxy_ssl_name {o.node_tls_name};",
                    "        proxy_ssl_server_name on;"]
        else:
            out += ["        # HTTPS to the nodes WITHOUT checking their certificates: give --node-ca CA",
                    "        # and --node-tls-name NAME to check them",
                    "        proxy_ssl_verify off;"]
        if o.node_client_cert:
            out += [f"        proxy_ssl_certificate {o.node_client_cert};    # for nodes with tls.client_auth: required",
                    f"        proxy_ssl_certificate_key {o.node_client_cert};"]
        else:
            out.append(f"        # {CLIENT_AUTH_NOTE}")
        out.append("        proxy_ssl_session_reuse on;")
    out += ["    }", "}"]
    return "\n".join(out) + "\n"


def _nginx_passthrough(o: Options) -> str:
    out = _header(o, "nginx", [
        "TLS PASSTHROUGH (stream): the balancer sees no URL, so there is NO content routing:",
        "clients are spread by their address (consistent hashing), and the same blob pulled by",
        "clients on different nodes is fetched from the upstream once per NODE, not once per",
        *PASSTHROUGH_TAIL,
        "For the main context (outside http {}): include it from nginx.conf's top level. Debian",
        "builds the stream module as a module (libnginx-mod-stream, loaded from modules-enabled);",
        "EL's nginx-mod-stream likewise. Passive health checks only (max_fails, fail_timeout).",
    ])
    out += ["",
            "stream {",
            f"    upstream {UPSTREAM} {{",
            "        hash $remote_addr consistent;"]
    out += [f"        server {node} max_fails=2 fail_timeout=10s;" for node in o.nodes]
    out += ["    }",
            "",
            "    server {",
            f"        listen {o.listen};",
            f"        proxy_pass {UPSTREAM};",
            "        proxy_connect_timeout 5s;",
            f"        proxy_timeout {TIMEOUT};",
            "        proxy_next_upstream on;",
            "    }",
            "}"]
    return "\n".join(out) + "\n"


ENGINES = {"haproxy": haproxy, "nginx": nginx}
