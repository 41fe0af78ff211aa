"""The /metrics, /healthz and /readyz endpoint of dfm_stream.metrics, over real HTTP on loopback."""

import argparse
import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dfm_stream.metrics import (
    LATENCY_BUCKETS,
    MetricsServer,
    ReaderMetrics,
    WorkerMetrics,
    add_metrics_args,
    new_registry,
    serve,
)


def get(server: MetricsServer, path: str) -> tuple[int, str, str]:
    """GET ``path``; return (status, content type, body), including error statuses."""
    url = f"http://127.0.0.1:{server.port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.headers["Content-Type"], e.read().decode()


def sample(body: str, name: str, **labels: str) -> float | None:
    """Return the value of sample ``name{labels}`` in a /metrics body, or None when absent."""
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


@pytest.fixture
def started() -> Iterator[list[MetricsServer]]:
    """Servers a test starts; closed at the end."""
    servers: list[MetricsServer] = []
    yield servers
    for server in servers:
        server.close()


def test_metrics_endpoint_serves_current_values_as_prometheus_text(started: list[MetricsServer]) -> None:
    registry = new_registry()
    metrics = ReaderMetrics.create(registry)
    server = serve(registry, port=0)
    started.append(server)
    assert server.port > 0
    metrics.frames_published.labels(camera="cam1").inc(3)
    metrics.camera_up.labels(camera="cam1").set(1)

    status, ctype, body = get(server, "/metrics")
    assert status == 200
    assert ctype.startswith("text/plain")
    assert sample(body, "dfm_reader_frames_published_total", camera="cam1") == 3
    assert sample(body, "dfm_camera_up", camera="cam1") == 1
    assert sample(body, "process_cpu_seconds_total") is not None

    metrics.frames_published.labels(camera="cam1").inc(2)
    metrics.camera_up.labels(camera="cam1").set(0)
    _, _, later = get(server, "/metrics?debug=1")  # a query string does not change the path
    assert sample(later, "dfm_reader_frames_published_total", camera="cam1") == 5
    assert sample(later, "dfm_camera_up", camera="cam1") == 0


def test_worker_histograms_resolve_5_ms_to_10_s(started: list[MetricsServer]) -> None:
    registry = new_registry(process_metrics=False)
    metrics = WorkerMetrics.create(registry)
    server = serve(registry)
    started.append(server)
    metrics.e2e_latency_seconds.labels(camera="cam1").observe(0.004)
    metrics.e2e_latency_seconds.labels(camera="cam1").observe(9.0)
    _, _, body = get(server, "/metrics")
    bucket = "dfm_worker_e2e_latency_seconds_bucket"
    assert min(LATENCY_BUCKETS) == 0.005
    assert max(LATENCY_BUCKETS) == 10
    assert sample(body, bucket, camera="cam1", le="0.005") == 1
    assert sample(body, bucket, camera="cam1", le="7.5") == 1
    assert sample(body, bucket, camera="cam1", le="10.0") == 2
    assert sample(body, "dfm_worker_e2e_latency_seconds_count", camera="cam1") == 2
    assert sample(body, "process_cpu_seconds_total") is None  # process_metrics=False


def test_healthz_answers_alive(started: list[MetricsServer]) -> None:
    server = serve(new_registry(process_metrics=False), ready=lambda: (False, "redis down"))
    started.append(server)
    status, ctype, body = get(server, "/healthz")
    assert status == 200  # alive even when not ready
    assert ctype == "application/json"
    assert json.loads(body) == {"status": "alive"}


def test_readyz_follows_the_readiness_check(started: list[MetricsServer]) -> None:
    state = {"ok": True, "detail": "redis ok, model loaded"}
    server = serve(new_registry(process_metrics=False), ready=lambda: (state["ok"], state["detail"]))
    started.append(server)

    status, _, body = get(server, "/readyz")
    assert status == 200
    assert json.loads(body) == {"ready": True, "detail": "redis ok, model loaded"}

    state.update(ok=False, detail="redis unreachable at 127.0.0.1:1")
    status, ctype, body = get(server, "/readyz")
    assert status == 503
    assert ctype == "application/json"
    assert json.loads(body) == {"ready": False, "detail": "redis unreachable at 127.0.0.1:1"}

    state.update(ok=True, detail="back")
    assert get(server, "/readyz")[0] == 200


def test_readyz_is_503_when_the_check_itself_raises(started: list[MetricsServer]) -> None:
    def broken() -> tuple[bool, str]:
        raise ConnectionError("no route to redis")

    server = serve(new_registry(process_metrics=False), ready=broken)
    started.append(server)
    status, _, body = get(server, "/readyz")
    assert status == 503
    answer = json.loads(body)
    assert answer["ready"] is False
    assert "no route to redis" in answer["detail"]
    assert get(server, "/healthz")[0] == 200  # the server survived the failing check


def test_readyz_without_a_check_is_ready(started: list[MetricsServer]) -> None:
    server = serve(new_registry(process_metrics=False))
    started.append(server)
    status, _, body = get(server, "/readyz")
    assert status == 200
    assert json.loads(body)["ready"] is True


@pytest.mark.parametrize("path", ["/", "/metric", "/metrics/extra", "/health"])
def test_unknown_paths_are_404_with_a_hint(started: list[MetricsServer], path: str) -> None:
    server = serve(new_registry(process_metrics=False))
    started.append(server)
    status, _, body = get(server, path)
    assert status == 404
    assert "/metrics" in body
    assert "/readyz" in body


def test_concurrent_scrapes_are_all_answered(started: list[MetricsServer]) -> None:
    registry = new_registry()
    WorkerMetrics.create(registry).frames_scored.labels(camera="cam1", model="m@1").inc(7)
    server = serve(registry)
    started.append(server)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: get(server, "/metrics"), range(16)))
    assert {status for status, _, _ in answers} == {200}
    values = {
        sample(body, "dfm_worker_frames_scored_total", camera="cam1", model="m@1") for _, _, body in answers
    }
    assert values == {7}


def test_close_releases_the_port() -> None:
    server = serve(new_registry(process_metrics=False))
    port = server.port
    assert get(server, "/healthz")[0] == 200
    server.close()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    again = serve(new_registry(process_metrics=False), port=port)  # the port can be bound again
    try:
        assert again.port == port
        assert get(again, "/healthz")[0] == 200
    finally:
        again.close()


def test_two_registries_in_one_process_do_not_collide(started: list[MetricsServer]) -> None:
    first, second = new_registry(), new_registry()
    a, b = WorkerMetrics.create(first), WorkerMetrics.create(second)
    ReaderMetrics.create(first)
    a.frames_scored.labels(camera="cam1", model="m@1").inc()
    b.frames_scored.labels(camera="cam1", model="m@1").inc(4)
    servers = [serve(first), serve(second)]
    started.extend(servers)
    assert servers[0].port != servers[1].port
    values = [sample(get(s, "/metrics")[2], "dfm_worker_frames_scored_total", camera="cam1") for s in servers]
    assert values == [1, 4]


def test_metrics_args_default_to_loopback_and_the_given_port() -> None:
    parser = argparse.ArgumentParser()
    add_metrics_args(parser, default_port=9401)
    defaults = parser.parse_args([])
    assert (defaults.metrics_host, defaults.metrics_port) == ("127.0.0.1", 9401)
    given = parser.parse_args(["--metrics-host", "0.0.0.0", "--metrics-port", "0"])
    assert (given.metrics_host, given.metrics_port) == ("0.0.0.0", 0)
    assert parser.parse_args(["--metrics-port", "-1"]).metrics_port == -1
