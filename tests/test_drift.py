"""Drift watch (#19): image statistics, reference bins, PSI, the artifact field, the Redis hash.

The module-level checks replay synthetic parts (dfm_stream.synthetic_parts): other good parts stay
below every alert line, the same parts 25 % brighter (or gamma 0.7) pass a line within 300 frames.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from registry_helpers import tiny_artifact

from dfm_stream import keys
from dfm_stream.artifact import ArtifactInfo, load_artifact, read_info, update_calibration
from dfm_stream.commands.drift import read_drift, render
from dfm_stream.drift import (
    PSI_ALERT,
    STATS,
    Distribution,
    DriftReference,
    ImageStatsCollector,
    Window,
    compare,
    image_stats,
    reference_of,
)
from dfm_stream.drift_watch import DriftWatch
from dfm_stream.errors import ArtifactError, ConfigError
from dfm_stream.images import IMAGENET_MEAN, IMAGENET_STD, preprocess
from dfm_stream.metrics import WorkerMetrics, new_registry
from dfm_stream.synthetic_parts import render_part

SIZE = 64
WIRE_FORMAT = Path(__file__).resolve().parents[1] / "docs" / "wire-format.md"


def documented_drift_fields() -> set[str]:
    """Return the field names of the drift hash table in docs/wire-format.md."""
    text = WIRE_FORMAT.read_text(encoding="utf-8")
    section = text[text.index("## Drift hash") :].split("\n## ", 1)[0]
    return {line.split("`")[1] for line in section.splitlines() if line.startswith("| `")}


def stats_of(frames: list[np.ndarray]) -> np.ndarray:
    return image_stats(preprocess(frames, (SIZE, SIZE)), IMAGENET_MEAN, IMAGENET_STD)


def brighter(frames: list[np.ndarray], factor: float) -> list[np.ndarray]:
    return [np.clip(f.astype(np.float32) * factor, 0, 255).astype(np.uint8) for f in frames]


def gamma(frames: list[np.ndarray], g: float) -> list[np.ndarray]:
    return [(255.0 * (f / 255.0) ** g).round().astype(np.uint8) for f in frames]


@pytest.fixture(scope="module")
def parts() -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(3)
    return {
        "train": [render_part(rng, SIZE)[0] for _ in range(200)],
        "replay": [render_part(rng, SIZE)[0] for _ in range(200)],
    }


def test_image_stats_are_the_documented_grey_mean_std_and_laplacian_variance() -> None:
    flat = np.full((SIZE, SIZE, 3), 128, np.uint8)
    checker = ((np.indices((SIZE, SIZE)).sum(axis=0) % 2) * 255).astype(np.uint8)
    stats = stats_of([flat, np.dstack([checker] * 3)])
    assert stats[0] == pytest.approx([128 / 255, 0, 0], abs=1e-5)
    # a one-pixel checkerboard: grey 0 or 1, std 0.5, Laplacian +-4 everywhere inside: variance 16
    assert stats[1] == pytest.approx([0.5, 0.5, 16.0], abs=1e-4)


def test_large_model_inputs_are_subsampled_to_bound_the_cost() -> None:
    big = torch.zeros((1, 3, 512, 512))
    assert image_stats(big, IMAGENET_MEAN, IMAGENET_STD).shape == (1, len(STATS))


def test_psi_is_near_zero_for_the_same_distribution_and_large_for_a_shift() -> None:
    rng = np.random.default_rng(0)
    dist = Distribution.of(rng.normal(0, 1, 2000))
    assert dist is not None and len(dist.shares) == 5
    assert dist.psi(rng.normal(0, 1, 300)) < 0.1
    assert dist.psi(rng.normal(1.5, 1, 300)) > PSI_ALERT
    assert Distribution.of(rng.normal(0, 1, 19)) is None  # too few values for a reference


def test_a_reference_survives_json_and_a_malformed_one_is_refused() -> None:
    rng = np.random.default_rng(1)
    ref = DriftReference(image={"brightness": Distribution.of(rng.random(100))}).with_scores(rng.random(50))
    assert DriftReference.from_json_dict(json.loads(json.dumps(ref.to_json_dict()))) == ref
    bad = ref.to_json_dict()
    bad["image"]["brightness"]["shares"] = [0.5, 0.6]
    with pytest.raises(ValueError, match=r"edges|shares"):
        DriftReference.from_json_dict(bad)


def test_unshifted_replay_of_other_good_parts_stays_below_every_line(parts) -> None:
    ref = ImageStatsCollector(IMAGENET_MEAN, IMAGENET_STD)
    list(ref.tap([preprocess(parts["train"], (SIZE, SIZE))]))
    reference = ref.reference()
    replay = stats_of(parts["replay"])
    rng = np.random.default_rng(5)
    window = Window()
    worst = 0.0
    for n, i in enumerate(rng.integers(0, len(replay), 2000)):
        window.add(np.zeros(1), replay[i : i + 1])
        if n >= 100 and n % 20 == 0:
            figures = compare(window, reference)
            assert figures.verdict == "ok", figures
            worst = max(worst, *(f.value for f in figures.figures))
    assert worst < PSI_ALERT


@pytest.mark.parametrize("change", ["brightness x1.25", "gamma 0.7"])
def test_a_light_change_passes_a_line_within_300_frames(parts, change: str) -> None:
    ref = ImageStatsCollector(IMAGENET_MEAN, IMAGENET_STD)
    list(ref.tap([preprocess(parts["train"], (SIZE, SIZE))]))
    reference = ref.reference()
    window = Window()
    window.add(np.zeros(300), stats_of(parts["replay"][:150] * 2))  # a full window of the old light
    assert compare(window, reference).verdict == "ok"
    changed = (
        brighter(parts["replay"], 1.25) if change.startswith("brightness") else gamma(parts["replay"], 0.7)
    )
    shifted = stats_of(changed)
    for n in range(300):
        window.add(np.zeros(1), shifted[n % len(shifted) : n % len(shifted) + 1])
        if compare(window, reference).verdict == "drift":
            break
    figures = compare(window, reference)
    assert figures.verdict == "drift", figures
    assert n < 300, n


def test_score_figures_use_the_calibration_scores() -> None:
    rng = np.random.default_rng(2)
    reference = DriftReference().with_scores(rng.normal(10, 1, 200))
    window = Window()
    window.add(rng.normal(10, 1, 300), np.zeros((300, 3)))
    ok = compare(window, reference)
    assert ok.verdict == "ok" and ok.get("score_quantile_ratio").value == pytest.approx(1, abs=0.3)
    window.add(rng.normal(14, 1, 300), np.zeros((300, 3)))
    drift = compare(window, reference)
    assert drift.verdict == "drift"
    assert drift.get("score_psi").past_alert and drift.get("score_quantile_ratio").past_alert


def test_old_artifacts_load_and_report_drift_unavailable(tmp_path: Path) -> None:
    data = tiny_artifact()
    assert b'"drift"' not in data  # made as before drift watch: no field, so the old hash still holds
    fitted = load_artifact(data)
    assert fitted.info.drift is None and reference_of(fitted.info.drift) is None
    figures = compare(Window(), reference_of(fitted.info.drift))
    assert figures.verdict == "unavailable" and "re-fit" in figures.reason


def test_calibration_adds_the_good_scores_to_the_reference(tmp_path: Path) -> None:
    path = tmp_path / "m.dfm"
    path.write_bytes(tiny_artifact())
    info = update_calibration(path, 1.0, 0.0, 2.0, good_scores=list(np.linspace(0, 1, 40)))
    assert read_info(path) == info  # the hash covers the new field
    reference = reference_of(info.drift)
    assert reference is not None and reference.scores is not None and reference.scores.n == 40


def test_a_bad_drift_field_is_refused_naming_it() -> None:
    info = dataclasses.replace(read_info(tiny_artifact()), drift={"version": 1})
    with pytest.raises(ArtifactError, match="drift"):
        ArtifactInfo.from_json_dict(info.to_json_dict(), "x.dfm")


def test_the_watch_exports_metrics_and_writes_the_documented_hash(redis_client) -> None:
    registry = new_registry(process_metrics=False)
    metrics = WorkerMetrics.create(registry)
    watch = DriftWatch(redis_client, keys.DEFAULT_PREFIX, "w1", metrics.drift)
    rng = np.random.default_rng(4)
    frames = [render_part(rng, SIZE)[0] for _ in range(120)]
    reference = DriftReference(image={}).with_scores(rng.normal(5, 1, 100))
    info = dataclasses.replace(read_info(tiny_artifact()), drift=reference.to_json_dict())
    batch = preprocess(frames, (SIZE, SIZE))
    watch.observe(["camA"] * 60 + ["camB"] * 60, "m@1", info, batch, rng.normal(5, 1, 120))
    watch.flush()
    assert registry.get_sample_value("dfm_drift_window_frames", {"camera": "camA"}) == 60
    assert math.isnan(registry.get_sample_value("dfm_drift_score_psi", {"camera": "camA"}))  # warming up
    watch.observe(["camA"] * 120, "m@1", info, batch, rng.normal(9, 1, 120))
    watch.flush()
    assert registry.get_sample_value("dfm_drift_score_psi", {"camera": "camA"}) > PSI_ALERT
    assert math.isnan(
        registry.get_sample_value("dfm_drift_image_psi", {"camera": "camA", "stat": "brightness"})
    )
    data = read_drift(redis_client, "camA", keys.DEFAULT_PREFIX, "test")
    assert set(data) == documented_drift_fields()
    assert (data["model"], data["worker"], data["frames"], data["verdict"]) == ("m@1", "w1", "180", "drift")
    lines = render("camA", data, int(data["updated_ms"]))
    assert lines[-1].startswith("verdict: DRIFT") and "enrol" in lines[-1]
    assert any("score PSI" in line and "PAST" in line for line in lines)
    # a new model version starts a new window
    watch.observe(["camA"], "m@2", info, batch[:1], np.array([5.0]))
    watch.flush()
    assert read_drift(redis_client, "camA", keys.DEFAULT_PREFIX, "t")["frames"] == "1"


def test_drift_for_an_unknown_camera_names_the_known_ones(redis_client) -> None:
    redis_client.hset(keys.drift_key("camA"), mapping={"verdict": "ok", "figures": "[]"})
    with pytest.raises(ConfigError, match=r"'nosuch'.*camA"):
        read_drift(redis_client, "nosuch", keys.DEFAULT_PREFIX, "test")
