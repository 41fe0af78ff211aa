"""Reading the shipped observability assets (dashboard, scrape config, alert rules) in tests.

Shared by tests/test_observability_assets.py (static checks) and tests/test_prometheus_scrape.py
(every dashboard expression against a real Prometheus).
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dfm_stream.bridge.core import BridgeMetrics
from dfm_stream.metrics import ReaderMetrics, WorkerMetrics, new_registry

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "dfm-stream.json"
GENERATOR = REPO / "deploy" / "grafana" / "generate_dashboard.py"
PROVISIONING = REPO / "deploy" / "grafana" / "provisioning"
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
PROMETHEUS_YML = PROMETHEUS_DIR / "prometheus.yml"
ALERTS_YML = PROMETHEUS_DIR / "alerts.yml"
ALERTS_TEST_YML = PROMETHEUS_DIR / "alerts.test.yml"

READER_JOB = "dfm-readers"
WORKER_JOB = "dfm-workers"
BRIDGE_JOB = "dfm-bridge"

PROMETHEUS_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
"""Series Prometheus itself adds to every target."""

_KEYWORDS = {
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
}


@dataclass(frozen=True)
class DashboardQuery:
    """One PromQL expression of the dashboard and where it is."""

    panel: str
    ref_id: str
    expr: str


def load_dashboard() -> dict[str, Any]:
    """Return the shipped dashboard JSON."""
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def load_yaml(path: Path) -> Any:
    """Return the parsed YAML file ``path``."""
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Return every panel that is not a row (including panels nested in collapsed rows)."""
    found = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def dashboard_queries(dashboard: dict[str, Any]) -> list[DashboardQuery]:
    """Return every target expression of every panel."""
    return [
        DashboardQuery(panel["title"], target["refId"], target["expr"])
        for panel in panels(dashboard)
        for target in panel.get("targets", [])
    ]


def variable_queries(dashboard: dict[str, Any]) -> dict[str, str]:
    """Return name -> query of the dashboard's Prometheus query variables."""
    found = {}
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            found[var["name"]] = query["query"] if isinstance(query, dict) else query
    return found


def promql_metric_names(expr: str) -> set[str]:
    """Return the metric names an expression selects (functions, keywords, labels left out).

    A small lexer, enough for the dashboard and the alert rules: string literals, label matchers,
    grouping clauses and range durations are removed first; an identifier followed by ``(`` is a
    function or aggregation; what remains is a metric name.
    """
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?", text):
        name, is_call = match.group(1), match.group(2)
        if not is_call and name.lower() not in _KEYWORDS:
            names.add(name)
    return names


def label_values_metric(query: str) -> str:
    """Return the metric of a Grafana ``label_values(metric, label)`` variable query."""
    match = re.fullmatch(r"\s*label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*,\s*(\w+)\s*\)\s*", query)
    assert match, f"not a label_values(metric, label) query: {query!r}"
    return match.group(1)


def exposed_sample_names() -> set[str]:
    """Return every sample name a reader, worker or bridge exposes, as Prometheus stores it.

    The metrics are registered on a fresh registry the way the processes do; counters get
    ``_total``, histograms ``_bucket``/``_sum``/``_count`` (and both ``_created``).
    """
    registry = new_registry(process_metrics=True)
    ReaderMetrics.create(registry)
    WorkerMetrics.create(registry)
    BridgeMetrics.create(registry)
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "info": ("_info",),
    }
    names = set()
    for family in registry.collect():
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def scrape_jobs() -> dict[str, dict[str, Any]]:
    """Return job name -> scrape config of the shipped prometheus.yml."""
    config = load_yaml(PROMETHEUS_YML)
    return {job["job_name"]: job for job in config["scrape_configs"]}


def alert_rules() -> list[dict[str, Any]]:
    """Return every alerting rule of alerts.yml."""
    groups = load_yaml(ALERTS_YML)["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def job_selectors(expr: str) -> set[str]:
    """Return the job names an expression selects with ``job="..."``."""
    return set(re.findall(r'\bjob\s*=\s*"([^"]+)"', expr))


def concrete(expr: str, camera: str = ".*", interval: str = "15s") -> str:
    """Return ``expr`` with the Grafana variables replaced, ready for Prometheus' query API."""
    return (
        expr.replace("$__rate_interval", interval)
        .replace("$__interval", interval)
        .replace("$__range", interval)
        .replace("${camera}", camera)
        .replace("$camera", camera)
    )
