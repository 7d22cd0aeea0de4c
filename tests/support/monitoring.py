"""The shipped Grafana dashboard and Prometheus alert rules (docs/monitoring/), read for the
tests: their PromQL expressions, the metric names those use, and the metric names docker-mirror
exports (the contract between `/metrics` and these files, /work/wt/ISSUE12.md's table).

Names are read from PromQL with a small tokenizer, not a parser: strings, label matchers,
ranges and grouping clauses are skipped, and what is left that looks like a name and is not
called like a function or a keyword is a metric. promtool parses the same expressions for real
in the system tier (tests/test_monitoring.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent.parent
MONITORING = REPO / "docs/monitoring"
DASHBOARD = MONITORING / "grafana/docker-mirror.json"
ALERTS = MONITORING / "prometheus/docker-mirror-alerts.yml"
ALERT_TESTS = REPO / "tests/monitoring/alerts.test.yml"

# name (without docker_mirror_) -> (type, labels): what /metrics exports
CONTRACT: dict[str, tuple[str, tuple[str, ...]]] = {
    "requests_total": ("counter", ("kind", "method", "status_class", "cache")),
    "sent_bytes_total": ("counter", ("cache",)),
    "request_duration_seconds": ("histogram", ("kind",)),
    "pulls_saved_total": ("counter", ("upstream",)),
    "saved_bytes_total": ("counter", ("upstream",)),
    "upstream_requests_total": ("counter", ("upstream", "kind", "status_class")),
    "upstream_received_bytes_total": ("counter", ("upstream",)),
    "upstream_first_byte_seconds": ("histogram", ("upstream",)),
    "upstream_transfer_seconds": ("histogram", ("upstream",)),
    "upstream_resumed_total": ("counter", ("upstream",)),
    "verification_failures_total": ("counter", ("where",)),
    "transfers_in_flight": ("gauge", ()),
    "transfer_followers": ("gauge", ()),
    "tag_revalidations_total": ("counter", ("upstream", "result")),
    "cache_used_bytes": ("gauge", ()),
    "cache_max_bytes": ("gauge", ()),
    "cache_filesystem_free_bytes": ("gauge", ()),
    "cache_entries": ("gauge", ()),
    "cache_degraded": ("gauge", ()),
    "evictions_total": ("counter", ("reason",)),
    "evicted_bytes_total": ("counter", ("reason",)),
    "pass_throughs_total": ("counter", ("upstream",)),
    "upstream_up": ("gauge", ("upstream",)),
    "upstream_ratelimit_remaining": ("gauge", ("upstream",)),
    "upstream_ratelimit_limit": ("gauge", ("upstream",)),
    "cache_pinned_entries": ("gauge", ()),
    "cache_pinned_bytes": ("gauge", ()),
    "build_info": ("gauge", ("version", "python")),
}
# exported only when the configuration asks for them (not in /metrics of the defaults)
OPTIONAL: dict[str, tuple[str, tuple[str, ...]]] = {
    "node_info": ("gauge", ("node",)),          # node: NAME (issue 14)
}
# prometheus_client's process and platform collectors, and Prometheus' own per-target series
OTHERS = {"process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds",
          "process_start_time_seconds", "python_info", "up"}


def series_names() -> dict[str, str]:
    """Every series name a query may use -> the contract metric it belongs to."""
    names = {name: name for name in OTHERS}
    for short, (kind, _) in {**CONTRACT, **OPTIONAL}.items():
        metric = f"docker_mirror_{short}"
        suffixes = ("_bucket", "_sum", "_count") if kind == "histogram" else ("",)
        names.update({metric + suffix: metric for suffix in suffixes})
    return names


def upstream_metrics() -> set[str]:
    """The series that carry an `upstream` label."""
    return {name for name, metric in series_names().items()
            if metric.startswith("docker_mirror_") and "upstream" in
            {**CONTRACT, **OPTIONAL}[metric.removeprefix("docker_mirror_")][1]}


_TOKENS = re.compile(r"""
    (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<matchers>\{[^}]*\})
  | (?P<range>\[[^\]]*\])
  | (?P<grouping>\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\))
  | (?P<number>(?<![\w.])\d[\w.]*)
  | (?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<space>\s+)
  | (?P<other>.)
""", re.VERBOSE | re.DOTALL)
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
             "group_right", "atan2", "inf", "nan"}


@dataclass(frozen=True)
class Selector:
    name: str
    matchers: str           # "{...}" or ""


def selectors(expr: str) -> list[Selector]:
    """The metric selectors of a PromQL expression, in order."""
    tokens = [(m.lastgroup, m.group()) for m in _TOKENS.finditer(expr)]
    tokens = [t for t in tokens if t[0] != "space"]
    found = []
    for i, (kind, text) in enumerate(tokens):
        if kind != "name" or text.lower() in _KEYWORDS:
            continue
        following = tokens[i + 1] if i + 1 < len(tokens) else (None, "")
        if following == ("other", "(") or following[0] == "grouping":
            continue                                    # a function or an aggregation (sum by (x) (...))
        found.append(Selector(text, following[1] if following[0] == "matchers" else ""))
    return found


def metric_names(expr: str) -> set[str]:
    return {s.name for s in selectors(expr)}


_LABEL_VALUES = re.compile(r"\s*label_values\((?P<selector>.*),\s*[a-zA-Z_]\w*\s*\)\s*", re.DOTALL)


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_queries(board: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target, annotation and query variable of the dashboard."""
    queries = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            queries.append((f"panel {panel['id']} {panel['title']!r} target {target['refId']}", target["expr"]))
    for annotation in board["annotations"]["list"]:
        if "expr" in annotation:
            queries.append((f"annotation {annotation['name']!r}", annotation["expr"]))
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            match = _LABEL_VALUES.fullmatch(query)
            assert match, f"variable {variable['name']}: {query!r} is not label_values(SELECTOR, LABEL)"
            queries.append((f"variable {variable['name']}", match["selector"]))
    return queries


# what Grafana puts in for its variables, for checking the expressions outside Grafana
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "6h",
                     "$instance": ".+", "$upstream": ".+"}


def as_prometheus_sees_it(expr: str) -> str:
    for variable in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(variable, GRAFANA_VARIABLES[variable])
    assert "$" not in expr, f"a Grafana variable this check does not know: {expr}"
    return expr


def alert_rules() -> list[dict]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [rule for group in rules["groups"] for rule in group["rules"]]
