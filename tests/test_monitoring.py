"""The shipped alert rules and dashboard, checked by promtool (Debian's `prometheus` package):
`promtool check rules` on the rules, `promtool test rules` on their unit tests
(tests/monitoring/alerts.test.yml: series that fire each alert and series that must not), and
every PromQL expression of the dashboard parsed by Prometheus' own parser as a recording rule.
Quick (no Prometheus server, no mirror), but they need the package: the system tier."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.monitoring import (ALERT_TESTS, ALERTS, alert_rules, as_prometheus_sees_it, dashboard,
                                      dashboard_queries)
from tests.support.prometheus import binary


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([binary("promtool"), *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def check_rules(path: Path) -> subprocess.CompletedProcess:
    return promtool("check", "rules", str(path))


def recording_rules(tmp_path: Path, exprs: list[str]) -> Path:
    path = tmp_path / "dashboard-rules.yml"
    rules = [{"record": f"dashboard:query_{n}", "expr": expr} for n, expr in enumerate(exprs)]
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, sort_keys=False))
    return path


def test_the_alert_rules_pass_promtool_check_rules():
    result = check_rules(ALERTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_the_alerts_fire_when_they_should_and_not_otherwise(tmp_path: Path):
    # the rules as shipped, without their long descriptions (checked above); the test file compares summaries
    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            del rule["annotations"]["description"]
    (tmp_path / ALERTS.name).write_text(yaml.safe_dump(rules, sort_keys=False))
    shutil.copy(ALERT_TESTS, tmp_path / ALERT_TESTS.name)
    result = promtool("test", "rules", ALERT_TESTS.name, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_dashboard_query_is_valid_promql(tmp_path: Path):
    queries = dashboard_queries(dashboard())
    result = check_rules(recording_rules(tmp_path, [as_prometheus_sees_it(expr) for _, expr in queries]))
    named = "\n".join(f"dashboard:query_{n} is {where}" for n, (where, _) in enumerate(queries)
                      if f"dashboard:query_{n}\"" in result.stdout + result.stderr)
    assert result.returncode == 0, f"{result.stdout}{result.stderr}\n{named}"
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout


def test_the_promql_check_finds_a_broken_query(tmp_path: Path):
    (where, expr), *_ = [q for q in dashboard_queries(dashboard()) if "histogram_quantile" in q[1]]
    broken = as_prometheus_sees_it(expr).replace("sum by (le, kind)", "sum by (le, kind", 1)
    result = check_rules(recording_rules(tmp_path, [broken]))
    assert result.returncode != 0 and "dashboard:query_0" in result.stdout + result.stderr, where
