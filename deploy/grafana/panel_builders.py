"""Building blocks of the Grafana dashboard JSON: panels, targets, layout and variables.

Used by ``generate_dashboard.py`` (run that script, not this module). Every panel and target
reads from the ``$datasource`` variable; ``$camera`` is a multi-value variable matched as a regex.
"""

from pathlib import Path
from typing import Any

DASHBOARD_PATH = Path(__file__).resolve().parent / "dashboards" / "dfm-stream.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
CAM = 'camera=~"$camera"'
RI = "$__rate_interval"
ZERO = " or on() vector(0)"

Panel = dict[str, Any]
Target = tuple[str, str]
"""(PromQL expression, legend format)."""


def make_targets(exprs: list[Target], instant: bool = False, fmt: str = "time_series") -> list[dict]:
    """Return Grafana targets (refId A, B, ...) of ``(expression, legend)`` pairs."""
    return [
        {
            "datasource": DATASOURCE,
            "refId": chr(ord("A") + i),
            "expr": expr,
            "legendFormat": legend or "__auto",
            "range": not instant,
            "instant": instant,
            "format": fmt,
        }
        for i, (expr, legend) in enumerate(exprs)
    ]


def base_panel(kind: str, title: str, description: str, exprs: list[Target], unit: str) -> Panel:
    """Return the fields every panel has; the position is set later by :func:`layout`."""
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": make_targets(exprs),
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {},
        "gridPos": {"w": 12, "h": 8},
    }


def timeseries(title: str, description: str, exprs: list[Target], unit: str = "short") -> Panel:
    """Return a time series panel (lines, legend as a table with last and max values)."""
    panel = base_panel("timeseries", title, description, exprs, unit)
    panel["fieldConfig"]["defaults"]["custom"] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10}
    panel["options"] = {
        "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
        "tooltip": {"mode": "multi", "sort": "desc"},
    }
    return panel


def stat(title: str, description: str, exprs: list[Target], unit: str = "short") -> Panel:
    """Return a single-value panel (last value, with a sparkline)."""
    panel = base_panel("stat", title, description, exprs, unit)
    panel["gridPos"] = {"w": 4, "h": 4}
    panel["options"] = {
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        "colorMode": "value",
        "graphMode": "area",
        "textMode": "auto",
    }
    return panel


def up_down_timeline(
    title: str, description: str, expr: str, up_text: str, down_text: str, legend: str = "{{camera}}"
) -> Panel:
    """Return a state timeline of a 0/1 gauge per camera (or per ``legend``), with value mappings."""
    panel = base_panel("state-timeline", title, description, [(expr, legend)], "short")
    panel["fieldConfig"]["defaults"]["mappings"] = [
        {
            "type": "value",
            "options": {
                "0": {"text": down_text, "color": "red" if up_text == "up" else "green", "index": 0},
                "1": {"text": up_text, "color": "green" if up_text == "up" else "red", "index": 1},
            },
        }
    ]
    panel["fieldConfig"]["defaults"]["color"] = {"mode": "thresholds"}
    panel["options"] = {"showValue": "never", "mergeValues": True, "rowHeight": 0.8}
    return panel


def table(title: str, description: str, expr: str, columns: list[str]) -> Panel:
    """Return a table of the labels of an instant query (one row per series)."""
    panel = base_panel("table", title, description, [], "short")
    panel["targets"] = make_targets([(expr, "")], instant=True, fmt="table")
    hide = {name: True for name in ("Time", "Value")}
    panel["transformations"] = [
        {
            "id": "organize",
            "options": {"excludeByName": hide, "indexByName": {c: i for i, c in enumerate(columns)}},
        }
    ]
    panel["options"] = {"showHeader": True}
    return panel


def row(title: str) -> Panel:
    """Return a (non-collapsed) row header."""
    return {"type": "row", "title": title, "collapsed": False, "panels": [], "gridPos": {"w": 24, "h": 1}}


def quantiles(
    metric: str, by: str, qs: tuple[float, ...], legend: str = "p{q}", per_camera: bool = True
) -> list[Target]:
    """Return ``histogram_quantile`` targets of histogram ``metric`` (its ``_bucket`` series).

    ``by`` is the grouping besides ``le`` ("" for one overall quantile); ``per_camera`` adds the
    ``$camera`` selector (for the histograms that have a camera label); ``{q}`` in ``legend``
    becomes the percentile.
    """
    grouping = f"{by}, le" if by else "le"
    selector = f"{{{CAM}}}" if per_camera else ""
    return [
        (
            f"histogram_quantile({q}, sum by ({grouping}) (rate({metric}_bucket{selector}[{RI}])))",
            legend.format(q=round(q * 100)),
        )
        for q in qs
    ]


def with_thresholds(panel: Panel, red_at: float, base: str = "green") -> Panel:
    """Colour ``panel``'s values red from ``red_at`` on (``base`` below); return the panel."""
    panel["fieldConfig"]["defaults"]["thresholds"] = {
        "mode": "absolute",
        "steps": [{"color": base, "value": None}, {"color": "red", "value": red_at}],
    }
    return panel


def layout(panels: list[Panel]) -> list[Panel]:
    """Give every panel an id and a grid position: left to right, wrapping at 24 columns."""
    x = y = row_height = 0
    for number, panel in enumerate(panels, start=1):
        width, height = panel["gridPos"]["w"], panel["gridPos"]["h"]
        if panel["type"] == "row" or x + width > 24:
            x, y, row_height = 0, y + row_height, 0
        panel["id"] = number
        panel["gridPos"] = {"x": x, "y": y, "w": width, "h": height}
        x += width
        row_height = max(row_height, height)
        if panel["type"] == "row":
            x, y, row_height = 0, y + height, 0
    return panels


def templating() -> dict[str, Any]:
    """Return the ``$datasource`` and ``$camera`` variables."""
    camera_query = "label_values(dfm_camera_up, camera)"
    return {
        "list": [
            {
                "name": "datasource",
                "label": "Data source",
                "type": "datasource",
                "query": "prometheus",
                "current": {},
                "hide": 0,
                "refresh": 1,
                "regex": "",
                "options": [],
            },
            {
                "name": "camera",
                "label": "Camera",
                "type": "query",
                "datasource": DATASOURCE,
                "definition": camera_query,
                "query": {
                    "qryType": 1,
                    "query": camera_query,
                    "refId": "PrometheusVariableQueryEditor-VariableQuery",
                },
                "refresh": 2,
                "sort": 1,
                "multi": True,
                "includeAll": True,
                "allValue": ".*",
                "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
                "hide": 0,
                "regex": "",
                "options": [],
            },
        ]
    }
