"""The tag list's next-page ``Link``, as a client of this mirror must follow it.

An upstream names the next page by its own repository name (``/v2/org/app/tags/list?last=x&n=1``).
A client that named the registry in the path (``/v2/ghcr.io/org/app/...``) or with ``?ns=``
must get a link with that same name and ``ns``: followed as the upstream wrote it, the next page
would go to the default upstream. Only ``n`` and ``last`` are taken from the upstream's link
(checked as the request's own would be); a link without a usable next page is dropped.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit

from dockermirror.oci import valid_tag

_NEXT = re.compile(r'<([^<>]*)>\s*;\s*rel="?next"?', re.ASCII | re.IGNORECASE)
_COUNT = re.compile(r"[0-9]{1,10}", re.ASCII)


def next_page_link(upstream_link: str, name: str, namespace: str | None) -> str | None:
    """The ``Link`` header for this mirror's client: ``name`` as the client wrote it."""
    found = _NEXT.search(upstream_link)
    if found is None:
        return None
    try:
        params = parse_qsl(urlsplit(found.group(1)).query, strict_parsing=False)
    except ValueError:
        return None
    query = [(k, v) for k, v in params if (k == "n" and _COUNT.fullmatch(v)) or (k == "last" and valid_tag(v))]
    if not any(k == "last" for k, _ in query):
        return None
    if namespace:
        query.append(("ns", namespace))
    return f'</v2/{name}/tags/list?{urlencode(query)}>; rel="next"'
