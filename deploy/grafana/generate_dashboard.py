"""Write the Grafana dashboard of dfm-stream: ``deploy/grafana/dashboards/dfm-stream.json``.

The JSON is what Grafana provisions; this script is its source, so the panels read as a list
instead of 2,000 lines of JSON. After editing, run::

    .venv/bin/python deploy/grafana/generate_dashboard.py

``tests/test_observability_assets.py`` fails when the JSON is not what this script writes, and
checks every metric name against ``dfm_stream/metrics.py``; ``tests/test_prometheus_scrape.py``
sends every expression to a real Prometheus scraping a running pipeline.

PromQL conventions: ``$camera`` is a multi-value variable (regex match ``=~``), counters are
read with ``rate(...[$__rate_interval])``, per-camera gauges that several workers may report are
folded with ``max by (camera)``, and series that exist only after a first event (drops, dead
letters, alarms, errors) end with ``or on() vector(0)`` so a healthy system shows a zero.
"""

import json
import sys
from pathlib import Path
from typing import Any

from panel_builders import (
    CAM,
    DASHBOARD_PATH,
    RI,
    ZERO,
    Panel,
    base_panel,
    layout,
    make_targets,
    quantiles,
    row,
    stat,
    table,
    templating,
    timeseries,
    up_down_timeline,
    with_thresholds,
)


def overview() -> list[Panel]:
    """Return the headline numbers: throughput, cameras, alarms, latency, backlog, processes up."""
    return [
        row("Overview"),
        stat(
            "Frames scored per second",
            "All selected cameras, all workers.",
            [(f"sum(rate(dfm_worker_frames_scored_total{{{CAM}}}[{RI}]))", "scored")],
            "suffix:fps",
        ),
        stat(
            "Cameras up / down",
            "Cameras delivering frames, and cameras whose reader reports them down (alert DfmCameraDown).",
            [
                (f"sum(max by (camera) (dfm_camera_up{{{CAM}}}))", "up"),
                (f"count(max by (camera) (dfm_camera_up{{{CAM}}}) == 0) or vector(0)", "down"),
            ],
        ),
        with_thresholds(
            stat(
                "Active alarms",
                "Cameras whose alarm is raised right now.",
                [(f"sum(max by (camera) (dfm_alarm_active{{{CAM}}})) or vector(0)", "active")],
            ),
            1,
        ),
        with_thresholds(
            stat(
                "End-to-end latency p99",
                "Capture to score published, 99th percentile (SLO: 1 s; alert DfmLatencySLOBreach).",
                quantiles("dfm_worker_e2e_latency_seconds", "", (0.99,)),
                "s",
            ),
            1,
        ),
        stat(
            "Stream lag",
            "Frames waiting in the streams for a worker (consumer-group lag), all selected cameras.",
            [(f"sum(max by (camera) (dfm_stream_lag{{{CAM}}}))", "lag")],
        ),
        stat(
            "Processes up",
            "Reader and worker processes Prometheus scrapes successfully (alerts DfmReaderDown, "
            "DfmWorkerDown, DfmNoWorkers).",
            [('sum(up{job="dfm-readers"})', "readers"), ('sum(up{job="dfm-workers"})', "workers")],
        ),
    ]


def throughput() -> list[Panel]:
    """Return frames per second per camera and in total, capture rate and bandwidth to Redis."""
    return [
        row("Throughput"),
        timeseries(
            "Throughput per camera",
            "Frames published by the readers and scored by the workers, per camera.",
            [
                (
                    f"sum by (camera) (rate(dfm_worker_frames_scored_total{{{CAM}}}[{RI}]))",
                    "{{camera}} scored",
                ),
                (
                    f"sum by (camera) (rate(dfm_reader_frames_published_total{{{CAM}}}[{RI}]))",
                    "{{camera}} published",
                ),
            ],
            "suffix:fps",
        ),
        timeseries(
            "Throughput, total",
            "Frames captured, published and scored, all selected cameras.",
            [
                (f"sum(rate(dfm_reader_frames_captured_total{{{CAM}}}[{RI}]))", "captured"),
                (f"sum(rate(dfm_reader_frames_published_total{{{CAM}}}[{RI}]))", "published"),
                (f"sum(rate(dfm_worker_frames_scored_total{{{CAM}}}[{RI}]))", "scored"),
            ],
            "suffix:fps",
        ),
        timeseries(
            "Capture rate per camera",
            "Frames per second the readers get from the cameras (before --fps decimation).",
            [(f"max by (camera) (dfm_reader_capture_fps{{{CAM}}})", "{{camera}}")],
            "suffix:fps",
        ),
        timeseries(
            "Frame bytes written to Redis per camera",
            "Size of the frame messages the readers write: what Redis memory and network carry.",
            [
                (
                    f"sum by (camera) (rate(dfm_reader_published_frame_bytes_total{{{CAM}}}[{RI}]))",
                    "{{camera}}",
                )
            ],
            "Bps",
        ),
    ]


def latency() -> list[Panel]:
    """Return end-to-end latency, queue wait, inference/decode/encode time and batch size."""
    return [
        row("Latency"),
        with_thresholds(
            timeseries(
                "End-to-end latency p50 / p95 / p99",
                "Capture to score published, all selected cameras. The SLO is p99 < 1 s.",
                quantiles("dfm_worker_e2e_latency_seconds", "", (0.5, 0.95, 0.99)),
                "s",
            ),
            1,
        ),
        timeseries(
            "End-to-end latency p99 per camera",
            "Capture to score published, 99th percentile per camera (alert DfmLatencySLOBreach).",
            quantiles("dfm_worker_e2e_latency_seconds", "camera", (0.99,), "{{camera}}"),
            "s",
        ),
        timeseries(
            "Queue wait p95 per camera",
            "From the frame's stream entry to the start of its batch: time spent waiting for a worker.",
            quantiles("dfm_worker_queue_wait_seconds", "camera", (0.95,), "{{camera}}"),
            "s",
        ),
        timeseries(
            "Inference time per batch",
            "Model time per batch (p50, p99 per model) and decode + pre-processing time per batch (p99).",
            [
                *quantiles(
                    "dfm_worker_inference_seconds", "model", (0.5, 0.99), "{{model}} p{q}", per_camera=False
                ),
                *quantiles("dfm_worker_decode_seconds", "", (0.99,), "decode p{q}", per_camera=False),
            ],
            "s",
        ),
        timeseries(
            "Batch size",
            "Frames per model batch: mean and p95 per model (capped by --batch-size).",
            [
                (
                    f"sum by (model) (rate(dfm_worker_batch_size_sum[{RI}]))"
                    f" / sum by (model) (rate(dfm_worker_batch_size_count[{RI}]))",
                    "{{model}} mean",
                ),
                *quantiles("dfm_worker_batch_size", "model", (0.95,), "{{model}} p{q}", per_camera=False),
            ],
        ),
        timeseries(
            "Encode time per frame p95",
            "Time the readers take to encode one frame (JPEG or raw), per camera.",
            quantiles("dfm_reader_encode_seconds", "camera", (0.95,), "{{camera}}"),
            "s",
        ),
    ]


def backlog_and_losses() -> list[Panel]:
    """Return stream lag and pending, dropped, dead-lettered and redelivered frames."""
    return [
        row("Backlog and losses"),
        timeseries(
            "Stream lag per camera",
            "Frames in each camera's stream not yet delivered to the worker group (alert "
            "DfmStreamLagGrowing). A stream is capped at MAXLEN: beyond it frames are trimmed.",
            [(f"max by (camera) (dfm_stream_lag{{{CAM}}})", "{{camera}}")],
        ),
        timeseries(
            "Pending per camera",
            "Frames delivered to a worker but not yet acknowledged (in a batch, or held by a dead "
            "worker until --claim-idle).",
            [(f"max by (camera) (dfm_stream_pending{{{CAM}}})", "{{camera}}")],
        ),
        timeseries(
            "Dropped frames by reason",
            "Frames never scored: reader drops (decimated, overrun, redis_unavailable, encode_error) and "
            "worker drops (trimmed by MAXLEN, stale by --max-age).",
            [
                (
                    f"sum by (camera, reason) (rate(dfm_reader_frames_dropped_total{{{CAM}}}[{RI}])){ZERO}",
                    "{{camera}} reader {{reason}}",
                ),
                (
                    f"sum by (camera, reason) (rate(dfm_worker_frames_dropped_total{{{CAM}}}[{RI}])){ZERO}",
                    "{{camera}} worker {{reason}}",
                ),
            ],
            "suffix:fps",
        ),
        timeseries(
            "Dead-lettered frames by reason",
            "Frames sent to the dead-letter stream, per camera and reason (bad_msgpack, decode_error, "
            "too_large, max_deliveries, ...; alert DfmDeadLetters).",
            [
                (
                    f"sum by (camera, reason) (rate(dfm_worker_deadlettered_total{{{CAM}}}[{RI}])){ZERO}",
                    "{{camera}} {{reason}}",
                )
            ],
            "suffix:fps",
        ),
        timeseries(
            "Redelivered and duplicate frames",
            "Frames claimed from a dead or slow worker (XAUTOCLAIM after --claim-idle), and scores "
            "not published because another worker had already acknowledged the frame.",
            [
                (
                    f"sum by (camera) (rate(dfm_worker_redelivered_total{{{CAM}}}[{RI}])){ZERO}",
                    "{{camera}} redelivered",
                ),
                (
                    f"sum by (camera) (rate(dfm_worker_duplicates_suppressed_total{{{CAM}}}[{RI}])){ZERO}",
                    "{{camera}} duplicate suppressed",
                ),
            ],
            "suffix:fps",
        ),
    ]


def cameras_and_alarms() -> list[Panel]:
    """Return camera up/down, reconnects, alarm rate and active alarms."""
    return [
        row("Cameras and alarms"),
        up_down_timeline(
            "Camera up / down",
            "1 while the camera delivers frames (alert DfmCameraDown).",
            f"max by (camera) (dfm_camera_up{{{CAM}}})",
            "up",
            "down",
        ),
        timeseries(
            "Camera reconnects",
            "Camera (re)connection attempts per camera over each interval.",
            [(f"sum by (camera) (increase(dfm_reader_reconnects_total{{{CAM}}}[{RI}])){ZERO}", "{{camera}}")],
        ),
        timeseries(
            "Alarm rate",
            "Alarm transitions per minute, per camera and state (alert DfmAlarmStorm); recovered: "
            "events a worker delivered from the camera's outbox after another died before sending them.",
            [
                (
                    f"60 * sum by (camera, state) (rate(dfm_alarms_total{{{CAM}}}[{RI}])){ZERO}",
                    "{{camera}} {{state}}",
                ),
                (
                    f"60 * sum by (camera) (rate(dfm_worker_alarm_events_recovered_total{{{CAM}}}[{RI}]))"
                    f"{ZERO}",
                    "{{camera}} recovered",
                ),
            ],
            "suffix:/min",
        ),
        up_down_timeline(
            "Alarm state per camera",
            "1 while the camera's alarm is raised.",
            f"max by (camera) (dfm_alarm_active{{{CAM}}})",
            "alarm",
            "ok",
        ),
    ]


def anomaly_scores() -> list[Panel]:
    """Return the anomaly score distribution (one heatmap per camera) and its quantiles."""
    heatmap = base_panel(
        "heatmap",
        "Anomaly score / threshold — $camera",
        "Distribution of score / threshold of the frames of one camera: 1.0 is the alarm line.",
        [],
        "short",
    )
    heatmap["targets"] = make_targets(
        [(f"sum by (le) (increase(dfm_worker_score_ratio_bucket{{{CAM}}}[{RI}]))", "{{le}}")],
        fmt="heatmap",
    )
    heatmap.update({"repeat": "camera", "repeatDirection": "h", "maxPerRow": 4})
    heatmap["options"] = {
        "calculate": False,
        "yAxis": {"axisLabel": "score / threshold"},
        "cellGap": 1,
        "color": {"mode": "scheme", "scheme": "Oranges", "exponent": 0.5, "steps": 64},
        "tooltip": {"show": True, "yHistogram": True},
    }
    score_quantiles = with_thresholds(
        timeseries(
            "Anomaly score / threshold p50 and p99 per camera",
            "Above 1.0 a frame is anomalous. A p50 creeping towards 1.0 means the view or the parts "
            "drift away from what the model was fitted on.",
            quantiles("dfm_worker_score_ratio", "camera", (0.5, 0.99), "{{camera}} p{q}"),
        ),
        1,
    )
    return [row("Anomaly scores"), heatmap, score_quantiles]


def _alert_line(panel: Panel, at: float) -> Panel:
    """Draw ``panel``'s alert line at ``at`` (red above it)."""
    with_thresholds(panel, at)
    panel["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"] = {"mode": "line"}
    return panel


def drift() -> list[Panel]:
    """Return the drift figures per camera against their alert lines (docs/drift.md)."""
    return [
        row("Drift"),
        _alert_line(
            timeseries(
                "Score PSI per camera",
                "Population stability index of the last 300 frames' scores against the calibration's "
                "good scores; 0.25 is the alert line (DfmScoreDrift). Empty: the model has no reference "
                "or fewer than 100 frames were scored since it was loaded.",
                [(f"max by (camera) (dfm_drift_score_psi{{{CAM}}})", "{{camera}}")],
            ),
            0.25,
        ),
        _alert_line(
            timeseries(
                "Score quantile ratio per camera",
                "(p95 of the last 300 scores - reference p50) / (reference p95 - reference p50): 1 as "
                "at calibration, 2 is the alert line (DfmScoreDrift).",
                [(f"max by (camera) (dfm_drift_score_quantile_ratio{{{CAM}}})", "{{camera}}")],
            ),
            2,
        ),
        _alert_line(
            timeseries(
                "Image statistic PSI per camera",
                "PSI of brightness, contrast and sharpness of the last 300 frames against the model's "
                "training frames; 0.25 is the alert line (DfmImageDrift).",
                [(f"max by (camera, stat) (dfm_drift_image_psi{{{CAM}}})", "{{camera}} {{stat}}")],
            ),
            0.25,
        ),
        timeseries(
            "Drift window frames per camera",
            "Frames in each camera's drift window (300 at most; figures from 100 on). It starts "
            "again from 0 when the camera's model version changes.",
            [(f"max by (camera) (dfm_drift_window_frames{{{CAM}}})", "{{camera}}")],
        ),
    ]


def models_and_processes() -> list[Panel]:
    """Return model versions, worker devices, GPU memory, errors and process resources."""
    jobs = 'job=~"dfm-readers|dfm-workers"'
    return [
        row("Models and processes"),
        table(
            "Model versions",
            "The model each camera is scored with (dfm_model_info).",
            f"max by (camera, model, version, backbone) (dfm_model_info{{{CAM}}})",
            ["camera", "model", "version", "backbone"],
        ),
        table(
            "Worker devices",
            "The device, backbone precision and backbone backend each worker runs the model with.",
            "max by (instance, device, precision, backend) (dfm_worker_device_info)",
            ["instance", "device", "precision", "backend"],
        ),
        timeseries(
            "Worker errors",
            "Unexpected errors caught by the worker loop (by where) and model versions that failed to load.",
            [
                (f"sum by (where) (increase(dfm_worker_loop_errors_total[{RI}])){ZERO}", "loop {{where}}"),
                (
                    f"sum by (model) (increase(dfm_worker_model_load_failures_total[{RI}])){ZERO}",
                    "load failed {{model}}",
                ),
            ],
        ),
        timeseries(
            "GPU memory per worker",
            "GPU memory allocated by each worker (0 on CPU).",
            [("max by (instance) (dfm_worker_gpu_memory_bytes)", "{{instance}}")],
            "bytes",
        ),
        timeseries(
            "Process CPU",
            "CPU time per second of each reader and worker process.",
            [
                (
                    f"sum by (job, instance) (rate(process_cpu_seconds_total{{{jobs}}}[{RI}]))",
                    "{{job}} {{instance}}",
                )
            ],
            "percentunit",
        ),
        timeseries(
            "Process memory",
            "Resident memory of each reader and worker process.",
            [(f"max by (job, instance) (process_resident_memory_bytes{{{jobs}}})", "{{job}} {{instance}}")],
            "bytes",
        ),
    ]


def bridge() -> list[Panel]:
    """Return the PLC bridge: deliveries, delivery latency, connection state, backlog and refusals."""
    job = 'job="dfm-bridge"'
    return [
        row("PLC bridge"),
        timeseries(
            "Bridge deliveries per second",
            "Events and part results confirmed by the far side (MQTT PUBACK, OPC UA, Modbus), by protocol.",
            [
                (
                    f"sum by (protocol, kind) (rate(dfm_bridge_delivered_total{{{job}}}[{RI}]))",
                    "{{protocol}} {{kind}}",
                )
            ],
            "ops",
        ),
        timeseries(
            "Bridge delivery latency p50 / p99",
            "From the entry's XADD in Redis to the far side's confirmation, by protocol.",
            [
                (
                    f"histogram_quantile({q}, sum by (protocol, le) "
                    f"(rate(dfm_bridge_delivery_latency_seconds_bucket{{{job}}}[{RI}])))",
                    f"{{{{protocol}}}} p{round(q * 100)}",
                )
                for q in (0.5, 0.99)
            ],
            "s",
        ),
        up_down_timeline(
            "Bridge connection state",
            "Per protocol: connected to the broker (MQTT) or serving (OPC UA, Modbus TCP).",
            f"max by (protocol) (dfm_bridge_connected{{{job}}})",
            "up",
            "down",
            legend="{{protocol}}",
        ),
        timeseries(
            "Bridge backlog, jobs and refused requests",
            "Entries read but not yet confirmed; part jobs started and requests refused (by reason).",
            [
                (f"max(dfm_bridge_pending_entries{{{job}}})", "pending entries"),
                (
                    f"sum by (protocol) (increase(dfm_bridge_jobs_total{{{job}}}[{RI}])){ZERO}",
                    "jobs {{protocol}}",
                ),
                (
                    f"sum by (protocol, reason) "
                    f"(increase(dfm_bridge_bad_requests_total{{{job}}}[{RI}])){ZERO}",
                    "refused {{protocol}} {{reason}}",
                ),
            ],
        ),
    ]


def dashboard() -> dict[str, Any]:
    """Return the whole dashboard as a JSON-ready dict."""
    panels = [
        *overview(),
        *throughput(),
        *latency(),
        *backlog_and_losses(),
        *cameras_and_alarms(),
        *anomaly_scores(),
        *drift(),
        *models_and_processes(),
        *bridge(),
    ]
    return {
        "uid": "dfm-stream",
        "title": "dfm-stream",
        "description": "Visual inspection: cameras -> Redis Streams -> DFM workers -> scores and alarms.",
        "tags": ["dfm-stream", "inspection"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "10s",
        "timezone": "",
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "templating": templating(),
        "panels": layout(panels),
    }


def render() -> str:
    """Return the dashboard as the JSON text stored in the repository."""
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    """Write the dashboard JSON, or with ``--check`` exit 1 when the stored file is out of date."""
    text = render()
    if "--check" in argv:
        current = DASHBOARD_PATH.read_text(encoding="utf-8") if DASHBOARD_PATH.exists() else ""
        if current != text:
            print(f"{DASHBOARD_PATH} is out of date: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    DASHBOARD_PATH.parent.mkdir(parents=True, exist_ok=True)
    DASHBOARD_PATH.write_text(text, encoding="utf-8")
    print(f"wrote {DASHBOARD_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
