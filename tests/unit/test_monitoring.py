"""The shipped Grafana dashboard and Prometheus alert rules (docs/monitoring/): their structure,
and that they use only the metric names docker-mirror exports. promtool checks their PromQL and
runs the alerts' unit tests in the system tier (tests/test_monitoring.py)."""

from __future__ import annotations

import pytest
import yaml

from tests.support.monitoring import (ALERT_TESTS, CONTRACT, Selector, alert_rules, dashboard, dashboard_queries,
                                      metric_names, selectors, series_names, upstream_metrics)

SEVERITIES = {"critical", "warning", "info"}


@pytest.mark.parametrize("expr, expected", [
    ('sum by (le, kind) (rate(a_bucket{instance=~"$instance"}[$__rate_interval]))',
     [Selector("a_bucket", '{instance=~"$instance"}')]),
    ("changes(b[1h]) >= 3 and on (job, instance) max_over_time(c[1h] offset 5m)",
     [Selector("b", ""), Selector("c", "")]),
    ('sum(rate(d{cache="hit"}[5m])) by (cache) / ignoring (cache) group_left e * 1e3 > bool 0.5',
     [Selector("d", '{cache="hit"}'), Selector("e", "")]),
    ('time() - f{job="x"} > 3600', [Selector("f", '{job="x"}')]),
])
def test_the_selectors_of_an_expression(expr, expected):
    assert selectors(expr)[:len(expected)] == expected


def test_the_dashboard_imports_with_a_prometheus_data_source():
    board = dashboard()
    assert board["uid"] == "docker-mirror" and board["title"] and board["schemaVersion"] >= 39
    assert [(i["name"], i["type"], i["pluginId"]) for i in board["__inputs"]] == \
        [("DS_PROMETHEUS", "datasource", "prometheus")]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    source = variables["datasource"]
    assert (source["type"], source["query"], source["current"]["value"]) == \
        ("datasource", "prometheus", "${DS_PROMETHEUS}")       # import sets it; provisioning falls back to the default
    ours = {"type": "prometheus", "uid": "${datasource}"}
    for name in ("instance", "upstream"):
        assert variables[name]["type"] == "query" and variables[name]["datasource"] == ours
        assert variables[name]["multi"] and variables[name]["includeAll"]
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == ours, panel["title"]
            assert all(t["datasource"] == ours for t in panel["targets"]), panel["title"]
    assert all(a["datasource"] == ours for a in board["annotations"]["list"] if "expr" in a)


def test_the_dashboard_panels_have_queries_and_do_not_overlap():
    panels = dashboard()["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    taken: set[tuple[int, int]] = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24 and pos["h"] > 0, panel["title"]
        cells = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & taken, f"{panel['title']!r} overlaps another panel"
        taken |= cells
        if panel["type"] == "row":
            assert panel["panels"] == [] and not panel["collapsed"]
            continue
        assert panel["title"] and panel["description"], panel["id"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(set(refs)) == len(refs), panel["title"]
        assert all(t["expr"].strip() for t in panel["targets"]), panel["title"]


def test_the_dashboard_and_the_alerts_use_only_exported_metrics():
    known = series_names()
    uses = [(where, expr) for where, expr in dashboard_queries(dashboard())]
    uses += [(f"alert {rule['alert']}", rule["expr"]) for rule in alert_rules()]
    unknown = [f"{where}: {name}" for where, expr in uses for name in sorted(metric_names(expr)) if name not in known]
    assert not unknown, "metrics docker-mirror does not export:\n" + "\n".join(unknown)


def test_the_dashboard_shows_every_exported_metric():
    names = series_names()
    shown = {names[n] for _, expr in dashboard_queries(dashboard()) for n in metric_names(expr) if n in names}
    assert {f"docker_mirror_{short}" for short in CONTRACT} - shown == set()


def test_the_dashboard_follows_its_instance_and_upstream_variables():
    with_upstream = upstream_metrics()
    for where, expr in dashboard_queries(dashboard()):
        if where.startswith("variable"):
            continue
        for selector in selectors(expr):
            if selector.name == "up":
                continue
            assert 'instance=~"$instance"' in selector.matchers, f"{where}: {selector.name}"
            if selector.name in with_upstream:
                assert 'upstream=~"$upstream"' in selector.matchers, f"{where}: {selector.name}"


def test_every_alert_says_how_bad_it_is_and_what_to_do():
    rules = alert_rules()
    assert len({r["alert"] for r in rules}) == len(rules)
    for rule in rules:
        assert rule["alert"].startswith("DockerMirror"), rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        assert set(rule["annotations"]) == {"summary", "description"}, rule["alert"]
        assert "{{ $labels.instance }}" in rule["annotations"]["summary"] + rule["annotations"]["description"]
        assert any(tool in rule["annotations"]["description"]
                   for tool in ("journalctl", "systemctl", "docker-mirror cache", "cache.")), rule["alert"]
    assert {r["alert"] for r in rules} >= {
        "DockerMirrorDown", "DockerMirrorUpstreamDown", "DockerMirrorDockerHubPullsLow",
        "DockerMirrorDownloadVerificationFailed", "DockerMirrorStoredContentChanged", "DockerMirrorRestartLoop",
        "DockerMirrorCacheNearlyFull", "DockerMirrorCacheFilesystemLow", "DockerMirrorCacheDegraded"}


def test_every_alert_has_unit_tests_that_fire_it_and_that_do_not():
    cases = [case for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"] for case in test["alert_rule_test"]]
    for rule in alert_rules():
        mine = [case for case in cases if case["alertname"] == rule["alert"]]
        assert any(case.get("exp_alerts") for case in mine), f"{rule['alert']}: no test where it fires"
        assert any(not case.get("exp_alerts") for case in mine), f"{rule['alert']}: no test where it does not fire"
