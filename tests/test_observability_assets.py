"""The shipped Prometheus config, alert rules and Grafana dashboard are valid and use real metrics.

promtool (Debian's prometheus package) checks the config and the rules and runs the rules' unit
tests; the dashboard JSON is checked for structure and for metric names that the readers and
workers actually expose (dfm_stream/metrics.py registered on a fresh registry).
"""

import subprocess
import sys
from pathlib import Path

import pytest
from observability_helpers import (
    ALERTS_TEST_YML,
    ALERTS_YML,
    BRIDGE_JOB,
    DASHBOARD,
    GENERATOR,
    PROMETHEUS_SERIES,
    PROMETHEUS_YML,
    PROVISIONING,
    READER_JOB,
    WORKER_JOB,
    alert_rules,
    dashboard_queries,
    exposed_sample_names,
    job_selectors,
    label_values_metric,
    load_dashboard,
    load_yaml,
    panels,
    promql_metric_names,
    scrape_jobs,
    variable_queries,
)
from tools import require_tool


def promtool(*args: str, cwd: Path = PROMETHEUS_YML.parent) -> subprocess.CompletedProcess[str]:
    """Run promtool and return the finished process (output captured as text)."""
    exe = require_tool("promtool")
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def test_promtool_accepts_the_scrape_config() -> None:
    result = promtool("check", "config", PROMETHEUS_YML.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_promtool_accepts_the_alert_rules() -> None:
    result = promtool("check", "rules", ALERTS_YML.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(alert_rules())} rules found" in result.stdout


def test_alert_rule_unit_tests_pass() -> None:
    result = promtool("test", "rules", ALERTS_TEST_YML.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alert_rule_unit_tests_fail_when_a_threshold_changes(tmp_path: Path) -> None:
    # the unit tests pin the thresholds: a rule that no longer fires where it should is caught
    rules = ALERTS_YML.read_text(encoding="utf-8")
    assert "dfm_camera_up == 0" in rules
    (tmp_path / ALERTS_YML.name).write_text(rules.replace("dfm_camera_up == 0", "dfm_camera_up < 0"))
    (tmp_path / ALERTS_TEST_YML.name).write_text(ALERTS_TEST_YML.read_text(encoding="utf-8"))
    result = promtool("test", "rules", ALERTS_TEST_YML.name, cwd=tmp_path)
    assert result.returncode != 0
    assert "DfmCameraDown" in result.stdout + result.stderr


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    tests = load_yaml(ALERTS_TEST_YML)["tests"]
    cases = [case for group in tests for case in group.get("alert_rule_test", [])]
    for rule in alert_rules():
        mine = [case for case in cases if case["alertname"] == rule["alert"]]
        assert any(case.get("exp_alerts") for case in mine), f"{rule['alert']}: no firing case"
        assert any(not case.get("exp_alerts") for case in mine), f"{rule['alert']}: no silent case"


def test_every_alert_has_the_required_labels_and_annotations() -> None:
    rules = alert_rules()
    expected = {
        "DfmCameraDown",
        "DfmStreamLagGrowing",
        "DfmLatencySLOBreach",
        "DfmWorkerDown",
        "DfmAlarmStorm",
        "DfmDeadLetters",
    }
    assert expected <= {rule["alert"] for rule in rules}
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        for key in ("summary", "description", "runbook"):
            assert rule["annotations"].get(key, "").strip(), f"{rule['alert']}: no {key}"


def test_alert_rules_use_exposed_metrics_and_shipped_jobs() -> None:
    known = exposed_sample_names() | PROMETHEUS_SERIES
    jobs = set(scrape_jobs())
    for rule in alert_rules():
        names = promql_metric_names(rule["expr"])
        assert names, f"{rule['alert']}: no metric found in {rule['expr']!r}"
        assert names <= known, f"{rule['alert']}: unknown metrics {names - known}"
        assert job_selectors(rule["expr"]) <= jobs, rule["alert"]


def test_scrape_config_has_reader_and_worker_jobs_on_their_ports() -> None:
    jobs = scrape_jobs()
    assert load_yaml(PROMETHEUS_YML)["rule_files"] == [ALERTS_YML.name]
    reader_targets = [t for sc in jobs[READER_JOB]["static_configs"] for t in sc["targets"]]
    assert reader_targets
    assert all(t.endswith(":9400") for t in reader_targets)
    worker_sd = jobs[WORKER_JOB]["dns_sd_configs"]
    assert worker_sd
    assert all(sd["port"] == 9401 for sd in worker_sd)
    bridge_targets = [t for sc in jobs[BRIDGE_JOB]["static_configs"] for t in sc["targets"]]
    assert bridge_targets and all(t.endswith(":9403") for t in bridge_targets)
    text = PROMETHEUS_YML.read_text(encoding="utf-8")
    assert "kubernetes_sd_configs" in text  # the commented Kubernetes example


def test_dashboard_json_is_what_the_generator_writes() -> None:
    result = subprocess.run(
        [sys.executable, str(GENERATOR), "--check"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr


def test_dashboard_identity_and_variables() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "dfm-stream"
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {var["name"]: var for var in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    camera = variables["camera"]
    assert camera["datasource"]["uid"] == "${datasource}"
    assert camera["multi"] and camera["includeAll"]
    assert label_values_metric(variable_queries(dashboard)["camera"]) in exposed_sample_names()


def test_every_panel_has_a_datasource_and_expressions() -> None:
    dashboard = load_dashboard()
    found = panels(dashboard)
    assert len(found) >= 20
    for panel in found:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], f"{panel['title']}: no targets"
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), f"{panel['title']} {target['refId']}: empty expr"
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_panel_titles_are_unique() -> None:
    titles = [panel["title"] for panel in load_dashboard()["panels"]]
    assert len(titles) == len(set(titles)), sorted(t for t in titles if titles.count(t) > 1)


def test_panel_ids_are_unique() -> None:
    ids = [panel["id"] for panel in load_dashboard()["panels"]]
    assert len(ids) == len(set(ids))


def test_panels_fit_the_grid_without_overlapping() -> None:
    cells: set[tuple[int, int]] = set()
    for panel in load_dashboard()["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        mine = {
            (x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & mine, f"{panel['title']} overlaps another panel"
        cells |= mine


def test_dashboard_uses_only_exposed_metrics_and_shipped_jobs() -> None:
    known = exposed_sample_names() | PROMETHEUS_SERIES
    jobs = set(scrape_jobs())
    used: set[str] = set()
    for query in dashboard_queries(load_dashboard()):
        names = promql_metric_names(query.expr)
        assert names, f"{query.panel} {query.ref_id}: no metric in {query.expr!r}"
        assert names <= known, f"{query.panel} {query.ref_id}: unknown metrics {names - known}"
        for selected in job_selectors(query.expr):
            assert selected in jobs, f"{query.panel}: job {selected!r} is not in prometheus.yml"
        used |= names
    # the panels the issue asks for read these metrics
    for required in (
        "dfm_worker_frames_scored_total",
        "dfm_worker_e2e_latency_seconds_bucket",
        "dfm_worker_inference_seconds_bucket",
        "dfm_worker_batch_size_bucket",
        "dfm_stream_lag",
        "dfm_stream_pending",
        "dfm_reader_frames_dropped_total",
        "dfm_worker_frames_dropped_total",
        "dfm_worker_deadlettered_total",
        "dfm_camera_up",
        "dfm_alarms_total",
        "dfm_alarm_active",
        "dfm_worker_score_ratio_bucket",
        "dfm_model_info",
        # the bridge's row (#17): events delivered, delivery latency, connection state per protocol
        "dfm_bridge_delivered_total",
        "dfm_bridge_delivery_latency_seconds_bucket",
        "dfm_bridge_connected",
    ):
        assert required in used, f"no panel reads {required}"


def test_metric_name_lexer_returns_only_metric_names() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (camera, le) (rate(a_bucket{camera=~"$camera", le!="x"}[5m])))'
        " / on(camera) group_left b_total offset 5m or on() vector(0) and bool c"
    )
    assert promql_metric_names(expr) == {"a_bucket", "b_total", "c"}
    assert promql_metric_names('sum(up{job="dfm-workers"}) == 0 or absent(up)') == {"up"}


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard_folder() -> None:
    datasources = load_yaml(PROVISIONING / "datasources" / "prometheus.yml")
    assert datasources["apiVersion"] == 1
    (prometheus,) = datasources["datasources"]
    assert prometheus["type"] == "prometheus"
    assert prometheus["url"].endswith(":9090")
    providers = load_yaml(PROVISIONING / "dashboards" / "dfm-stream.yml")
    assert providers["apiVersion"] == 1
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"]
    assert DASHBOARD.parent.name == "dashboards"


@pytest.mark.parametrize("name", ["dfm_worker_frames_scored", "dfm_worker_e2e_latency_seconds"])
def test_exposed_names_follow_the_prometheus_suffix_rules(name: str) -> None:
    known = exposed_sample_names()
    if name.endswith("_seconds"):
        assert {f"{name}_bucket", f"{name}_sum", f"{name}_count"} <= known
    else:
        assert f"{name}_total" in known
    assert name not in known  # the bare family name of a counter/histogram is not a series
