"""A running reader and worker expose metrics that move, and a real Prometheus scrapes them.

One pipeline per module (it takes a few seconds to start): a redis-server, a reader on the
synthetic camera and a worker with a tiny resnet18 model whose threshold makes every frame
anomalous (so alarms exist), and a PLC bridge serving Modbus TCP (part jobs give it results to
deliver). Then a Prometheus server on loopback scrapes all three with the job names
of deploy/prometheus/prometheus.yml and evaluates deploy/prometheus/alerts.yml; every PromQL
expression of the shipped Grafana dashboard must return data from its query API.
"""

import json
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from observability_helpers import (
    ALERTS_YML,
    BRIDGE_JOB,
    READER_JOB,
    WORKER_JOB,
    concrete,
    dashboard_queries,
    label_values_metric,
    load_dashboard,
    scrape_jobs,
    variable_queries,
)
from prometheus_client.parser import text_string_to_metric_families
from registry_helpers import tiny_artifact
from support import Processes, wait_until
from tools import require_tool

from dfm_stream import backends, keys
from dfm_stream.embedded_redis import EmbeddedRedis, free_port
from dfm_stream.inspection import Inspector, JobRequest

CAMERA = "cam1"


@dataclass
class Pipeline:
    """The running processes of the module and how to reach them."""

    redis: EmbeddedRedis
    client: redis.Redis
    procs: Processes
    reader: subprocess.Popen[bytes]
    worker: subprocess.Popen[bytes]
    bridge: subprocess.Popen[bytes]
    reader_port: int
    worker_port: int
    bridge_port: int
    tmp: Path

    def logs(self) -> str:
        """Return the processes' logs, for failure messages."""
        return "\n".join(
            f"--- {name}\n{self.procs.log(proc)}"
            for name, proc in (("reader", self.reader), ("worker", self.worker), ("bridge", self.bridge))
        )


def http_get(url: str, timeout: float = 5) -> tuple[int, str]:
    """GET ``url``; return (status, body); (0, reason) when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        return 0, str(e)


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Return every sample of ``/metrics`` on ``port`` as (name, labels) -> value."""
    status, body = http_get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200, body
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """Return the sum of the samples ``name`` whose labels include ``labels`` (0 when none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    """A redis-server, a reader of the synthetic camera and a worker, all serving /metrics."""
    tmp = tmp_path_factory.mktemp("pipeline")
    server = EmbeddedRedis(workdir=tmp / "redis")
    server.dir.mkdir()
    server.start()
    procs = Processes(tmp / "logs")
    client = redis.Redis.from_url(server.url)
    try:
        model = tmp / "model.dfm"
        model.write_bytes(tiny_artifact(threshold=1e-9))  # every frame anomalous: an alarm is raised
        reader_port, worker_port, bridge_port = free_port(), free_port(), free_port()
        reader = procs.dfm(
            *("read", "--redis", server.url, "--camera", CAMERA),
            *("--source", "synthetic:seed=1,fps=20,size=64x64", "--metrics-port", str(reader_port)),
            name="reader",
        )
        worker = procs.dfm(
            *("work", "--redis", server.url, "--model", str(model), "--cameras", CAMERA),
            *("--device", "cpu", "--batch-size", "4", "--metrics-port", str(worker_port)),
            name="worker",
        )
        bridge = procs.dfm(
            *("bridge", "--redis", server.url, "--cameras", CAMERA, "--modbus", f"127.0.0.1:{free_port()}"),
            *("--metrics-port", str(bridge_port)),
            name="bridge",
        )
        yield Pipeline(
            server, client, procs, reader, worker, bridge, reader_port, worker_port, bridge_port, tmp
        )
        for proc in (reader, worker, bridge):
            assert procs.stop(proc) == 0, procs.log(proc)
    finally:
        procs.cleanup()
        client.close()
        server.close()


def wait_for_scores(p: Pipeline, at_least: float) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Wait until the worker has scored ``at_least`` frames of the camera; return its samples."""

    def scored() -> Any:
        for proc in (p.reader, p.worker):
            assert proc.poll() is None, f"a process exited early\n{p.logs()}"
        if http_get(f"http://127.0.0.1:{p.worker_port}/healthz")[0] != 200:
            return None
        samples = scrape(p.worker_port)
        return (
            samples if value(samples, "dfm_worker_frames_scored_total", camera=CAMERA) >= at_least else None
        )

    return wait_until(scored, timeout=60, interval=0.2, what=f"{at_least} scored frames")  # type: ignore[return-value]


READER_COUNTERS = (
    "dfm_reader_frames_captured_total",
    "dfm_reader_frames_published_total",
    "dfm_reader_published_frame_bytes_total",
    "dfm_reader_encode_seconds_count",
)
WORKER_COUNTERS = (
    ("dfm_worker_frames_scored_total", CAMERA),
    ("dfm_worker_e2e_latency_seconds_count", CAMERA),
    ("dfm_worker_queue_wait_seconds_count", CAMERA),
    ("dfm_worker_score_ratio_count", CAMERA),
    ("dfm_worker_batch_size_count", None),
    ("dfm_worker_inference_seconds_count", None),
)


def test_reader_and_worker_metrics_move_as_frames_flow(pipeline: Pipeline) -> None:
    worker_before = wait_for_scores(pipeline, 1)
    reader_before = scrape(pipeline.reader_port)
    stuck: list[str] = []

    def moved() -> Any:
        reader, worker = scrape(pipeline.reader_port), scrape(pipeline.worker_port)
        stuck[:] = [
            n
            for n in READER_COUNTERS
            if value(reader, n, camera=CAMERA) <= value(reader_before, n, camera=CAMERA)
        ]
        for name, camera in WORKER_COUNTERS:
            labels = {"camera": camera} if camera else {}
            if value(worker, name, **labels) <= value(worker_before, name, **labels):
                stuck.append(name)
        return None if stuck else (reader, worker)

    try:
        after = wait_until(moved, timeout=30, interval=0.2, what="counters to move")
    except pytest.fail.Exception:
        pytest.fail(f"these counters did not move: {stuck}\n{pipeline.logs()}")
    reader_after, worker_after = after  # type: ignore[misc]
    assert value(reader_after, "dfm_camera_up", camera=CAMERA) == 1
    assert value(reader_after, "dfm_reader_capture_fps", camera=CAMERA) > 0

    for name in (
        "dfm_worker_frames_scored_total",
        "dfm_worker_e2e_latency_seconds_count",
        "dfm_worker_queue_wait_seconds_count",
        "dfm_worker_score_ratio_count",
    ):
        assert value(worker_after, name, camera=CAMERA) > value(worker_before, name, camera=CAMERA), name
    for name in ("dfm_worker_batch_size_count", "dfm_worker_inference_seconds_count"):
        assert value(worker_after, name) > value(worker_before, name), name
    assert value(worker_after, "dfm_alarms_total", camera=CAMERA, state="raised") >= 1
    assert value(worker_after, "dfm_alarm_active", camera=CAMERA) == 1
    assert value(worker_after, "dfm_model_info", camera=CAMERA, backbone="resnet18") == 1
    backend = backends.auto_candidates("cpu")[0]  # the worker runs with --backend auto
    assert value(worker_after, "dfm_worker_device_info", device="cpu", precision="fp32", backend=backend) == 1
    assert sum(v for (n, _), v in worker_after.items() if n == "dfm_worker_device_info") == 1
    assert ("dfm_stream_lag", frozenset({("camera", CAMERA)})) in worker_after
    assert ("dfm_stream_pending", frozenset({("camera", CAMERA)})) in worker_after
    for port in (pipeline.reader_port, pipeline.worker_port):
        status, body = http_get(f"http://127.0.0.1:{port}/readyz")
        assert status == 200, body
        assert json.loads(body)["ready"] is True


def test_a_poison_frame_is_counted_as_dead_lettered(pipeline: Pipeline) -> None:
    wait_for_scores(pipeline, 1)
    pipeline.client.xadd(keys.frames_key(CAMERA), {"msg": b"\xc1 not msgpack"})

    def deadlettered() -> float:
        return value(scrape(pipeline.worker_port), "dfm_worker_deadlettered_total", camera=CAMERA)

    wait_until(deadlettered, timeout=30, what="the poison frame counted as dead-lettered")
    assert pipeline.client.xlen(keys.deadletter_key()) >= 1
    assert pipeline.worker.poll() is None  # the worker keeps running


def prometheus_config(p: Pipeline, rules: Path) -> dict[str, Any]:
    """Return a config scraping the pipeline every second, with the shipped job names and rules."""
    shipped = scrape_jobs()
    assert {READER_JOB, WORKER_JOB, BRIDGE_JOB} <= set(shipped)
    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [
            {"job_name": READER_JOB, "static_configs": [{"targets": [f"127.0.0.1:{p.reader_port}"]}]},
            {"job_name": WORKER_JOB, "static_configs": [{"targets": [f"127.0.0.1:{p.worker_port}"]}]},
            {"job_name": BRIDGE_JOB, "static_configs": [{"targets": [f"127.0.0.1:{p.bridge_port}"]}]},
        ],
    }


@pytest.fixture
def prometheus(pipeline: Pipeline, tmp_path: Path) -> Iterator[str]:
    """A Prometheus server on a free loopback port scraping the pipeline; yields its base URL."""
    exe = require_tool("prometheus")
    rules = tmp_path / ALERTS_YML.name
    shutil.copy(ALERTS_YML, rules)
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus_config(pipeline, rules)), encoding="utf-8")
    port = free_port()
    procs = Processes(tmp_path / "logs")
    proc = procs.start(
        [
            exe,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1h",
            "--log.level=warn",
        ],
        name="prometheus",
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            assert proc.poll() is None, f"prometheus exited\n{procs.log(proc)}"
            return http_get(f"{url}/-/ready")[0] == 200

        wait_until(ready, timeout=30, what="prometheus ready")
        yield url
        procs.stop(proc)
    finally:
        procs.cleanup()


def api(url: str, path: str, **params: str) -> Any:
    """Call Prometheus' HTTP API; return ``data`` of a successful answer, fail the test otherwise."""
    status, body = http_get(f"{url}/api/v1/{path}?{urllib.parse.urlencode(params)}")
    answer = json.loads(body) if body.startswith("{") else {"status": "error", "error": body}
    assert status == 200, f"{path} {params}: HTTP {status}: {answer.get('error')}"
    assert answer["status"] == "success", answer
    return answer["data"]


def query(url: str, expr: str) -> list[dict[str, Any]]:
    """Run an instant query; return its result vector."""
    data = api(url, "query", query=expr)
    return data["result"] if data["resultType"] == "vector" else [data["result"]]


def test_every_dashboard_query_returns_data_from_a_scraped_pipeline(
    pipeline: Pipeline, prometheus: str
) -> None:
    wait_for_scores(pipeline, 1)
    pipeline.client.xadd(keys.frames_key(CAMERA), {"msg": b"\xc1 poison"})  # dead-letter data too

    def targets_up() -> bool:
        active = api(prometheus, "targets", state="active")["activeTargets"]
        up = {t["labels"]["job"] for t in active if t["health"] == "up"}
        return up == {READER_JOB, WORKER_JOB, BRIDGE_JOB}

    wait_until(targets_up, timeout=30, interval=0.2, what="every target up in prometheus")
    # a part job: its result is what the bridge delivers (delivered, delivery latency)
    job = Inspector(pipeline.client, keys.DEFAULT_PREFIX).inspect(
        JobRequest(CAMERA, part_id="scrape", timeout_s=10, source="api")
    )
    assert job.state != "error", job

    dashboard = load_dashboard()
    exprs = {q.expr: q for q in dashboard_queries(dashboard)}
    pending: dict[str, str] = {}

    def every_query_has_data() -> bool:
        pending.clear()
        for expr, q in exprs.items():
            for camera in (".*", CAMERA):
                if not query(prometheus, concrete(expr, camera=camera)):
                    pending[f"{q.panel} [{q.ref_id}] camera={camera}"] = concrete(expr, camera=camera)
        return not pending

    try:
        wait_until(every_query_has_data, timeout=45, interval=0.5, what="data for every dashboard query")
    except pytest.fail.Exception:
        pytest.fail("dashboard queries without data:\n" + "\n".join(f"{k}: {v}" for k, v in pending.items()))

    # the camera variable lists the camera
    for name, var_query in variable_queries(dashboard).items():
        metric = label_values_metric(var_query)
        assert CAMERA in api(prometheus, f"label/{name}/values", **{"match[]": metric}), name
    # a few values the panels show, checked for meaning, not only presence
    assert [r["value"][1] for r in query(prometheus, 'sum(up{job=~"dfm-readers|dfm-workers"})')] == ["2"]
    assert query(prometheus, f'dfm_camera_up{{camera="{CAMERA}"}}')[0]["value"][1] == "1"
    assert query(prometheus, f'dfm_alarm_active{{camera="{CAMERA}"}}')[0]["value"][1] == "1"
    dead = query(prometheus, f'dfm_worker_deadlettered_total{{camera="{CAMERA}"}}')
    assert dead, "the poison frame was not counted"
    assert all(r["metric"].get("reason") for r in dead)
    # the shipped alert rules evaluate without error on real series
    groups = api(prometheus, "rules", type="alert")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert rules
    assert all(rule["health"] != "err" for rule in rules), [r.get("lastError") for r in rules]
