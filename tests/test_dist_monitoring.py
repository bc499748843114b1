"""dist/prometheus/updater-rules.yml and dist/grafana/updater.json: promtool checks
and unit-tests the alerts; every metric they name is one the agent or `fleet serve`
exports; every dashboard query is valid PromQL (checked by promtool as a rule)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from policies.fleetview import FleetSnapshot, metrics_text
from updater.metrics import Metrics
from updater.run import run

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "dist" / "prometheus" / "updater-rules.yml"
RULES_TEST = ROOT / "tests" / "fixtures" / "prometheus" / "updater-rules-test.yml"
GRAFANA = ROOT / "dist" / "grafana" / "updater.json"
METRIC = re.compile(r"\bupdater_[a-z_]+\b")


def exported() -> set[str]:
    """Every series name the agent and the dashboard serve (counters with _total)."""
    text = Metrics().render().decode() + metrics_text(
        FleetSnapshot(hosts=(), locks={}, failed={}), up=True, stale_after_s=60
    )
    names = set()
    for m in re.finditer(r"^# TYPE (\S+) (\S+)$", text, re.M):
        name, kind = m.groups()
        if kind == "counter":  # the client names the family with or without _total
            base = name.removesuffix("_total")
            names |= {base + "_total", base + "_created"}
        else:
            names.add(name)
    return names


def test_promtool_checks_the_rules() -> None:
    done = run(["promtool", "check", "rules", str(RULES)], check=False)
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    assert b"SUCCESS: 8 rules found" in done.stdout


def test_promtool_unit_tests_the_alerts() -> None:
    done = run(["promtool", "test", "rules", str(RULES_TEST)], check=False, timeout=300)
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    tested = set(re.findall(r"alertname: (\w+)", RULES_TEST.read_text()))
    assert tested == set(re.findall(r"alert: (\w+)", RULES.read_text()))  # each alert tested


def test_rules_and_dashboard_name_only_exported_metrics() -> None:
    names = exported()
    for path in (RULES, GRAFANA):
        used = set(METRIC.findall(path.read_text()))
        assert used and used <= names, f"{path.name}: {sorted(used - names)}"


def test_dashboard_queries_are_promql(tmp_path: Path) -> None:
    dash = json.loads(GRAFANA.read_text())
    assert dash["uid"] == "updater-fleet" and dash["__inputs"][0]["name"] == "DS_PROMETHEUS"
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    ids = [p["id"] for p in dash["panels"]]
    assert len(exprs) >= 15 and len(ids) == len(set(ids))
    rules = tmp_path / "dashboard-rules.yml"
    records = [{"record": f"dashboard:query{i}", "expr": e} for i, e in enumerate(exprs)]
    rules.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": records}]}))
    done = run(["promtool", "check", "rules", str(rules)], check=False)
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
