"""Issue 19's outside test, end to end: the light changes, the line learns it, the model is promoted.

A real ``dfm-stream work`` process scores one camera's frames (synthetic parts in the wire format,
pushed as a reader would) with the model the registry assigns:

1. good frames under ``parts@1``: hardly any false alarm, no drift;
2. the light changes (the same kind of good parts, 25 % brighter): ``parts@1`` raises false
   alarms and the drift figures pass their alert line;
3. ``dfm-stream enrol --since/--until`` over the frames of the new light pushes ``parts@2`` as a
   candidate;
4. ``model shadow``: ``parts@2`` is quiet on the good frames ``parts@1`` flags, and both flag the
   injected defective parts (``model compare``);
5. ``model promote``: false alarms on the brighter good frames below 1 %, every defect flagged;
6. ``model rollback --camera``: back to ``parts@1``.

After every step each frame written has exactly one score and nothing is pending in the group.
Run with ``-s`` to see the figures the README quotes.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import redis
import torch
from support import Processes, wait_until
from test_hot_reload import _start_worker, _wait_ack

from dfm_stream import keys
from dfm_stream.artifact import ArtifactInfo, artifact_to_bytes
from dfm_stream.drift import ImageStatsCollector
from dfm_stream.frame_codec import decode_frame, encode_frame
from dfm_stream.images import IMAGENET_MEAN, IMAGENET_STD, preprocess
from dfm_stream.model import Dfm, DFMModel
from dfm_stream.registry import ModelRef, ModelRegistry
from dfm_stream.synthetic_parts import render_part
from dfm_stream.wire import FIELD, ScoreMsg, ShadowMsg

CAM = "line1"
SIZE = 64
BRIGHTER = 1.25
"""The new light: every pixel 25 % brighter (clipped at 255)."""
ENROL_FRAMES = 300
CLI_TIMEOUT_S = 300
SCORE_WAIT_S = 180


@dataclasses.dataclass
class Model:
    """``parts@1``: artifact bytes, and defective parts it flags clearly under the old light."""

    artifact: bytes
    threshold: float
    defects: list[np.ndarray]


def _brighter(image: np.ndarray) -> np.ndarray:
    return np.clip(image.astype(np.float32) * BRIGHTER, 0, 255).astype(np.uint8)


def _as_sent(images: list[np.ndarray]) -> list[np.ndarray]:
    """The images as a worker sees them (through the frame codec's JPEG)."""
    return [decode_frame(encode_frame(img, "x", i, "s")) for i, img in enumerate(images)]


def _fit_v1(rng: np.random.Generator) -> Model:
    """resnet18/layer2, random weights, 64 px, fitted on good parts, with a drift reference."""
    train = preprocess(_as_sent([render_part(rng, SIZE)[0] for _ in range(60)]), (SIZE, SIZE))
    torch.manual_seed(0)
    trainer = Dfm(
        backbone="resnet18", layer="layer2", pre_trained=False, pooling_kernel_size=2, pca_level=0.9
    )
    model: DFMModel = trainer.fit([train])
    collector = ImageStatsCollector(IMAGENET_MEAN, IMAGENET_STD)
    list(collector.tap([train]))
    good = _as_sent([render_part(rng, SIZE)[0] for _ in range(60)])
    defects = [render_part(rng, SIZE, "scratch" if i % 2 else "spot")[0] for i in range(16)]
    with torch.no_grad():
        good_scores = model(preprocess(good, (SIZE, SIZE))).pred_score.double().numpy()
        bad_scores = model(preprocess(_as_sent(defects), (SIZE, SIZE))).pred_score.double().numpy()
    top = float(good_scores.max())
    clear = [img for img, s in zip(defects, bad_scores, strict=True) if s > 1.3 * top]
    assert len(clear) >= 8, f"the tiny model does not separate the parts: {good_scores} vs {bad_scores}"
    threshold = (top + float(min(s for s in bad_scores if s > 1.3 * top))) / 2
    info = dataclasses.replace(
        ArtifactInfo.for_model(model, (SIZE, SIZE), len(train)),
        threshold=threshold,
        drift=collector.reference().with_scores(good_scores).to_json_dict(),
    )
    return Model(artifact_to_bytes(model, info), threshold, clear[:8])


class Line:
    """The camera: pushes frames as a reader does and remembers which are good and which defective."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.seq = 0
        self.sent: dict[str, bool] = {}
        """frame id -> defective."""

    def push(self, images: list[np.ndarray], defective: bool = False) -> list[str]:
        ids = []
        for image in images:
            msg = encode_frame(image, CAM, self.seq, "s1")
            entry = self.client.xadd(keys.frames_key(CAM), {FIELD: msg.to_bytes()}).decode()
            self.seq += 1
            ids.append(f"{CAM}:{entry}")
            self.sent[ids[-1]] = defective
        return ids

    def scores(self) -> dict[str, ScoreMsg]:
        """Wait until every frame sent is scored and acknowledged; check each has exactly one score."""
        n = len(self.sent)
        key = keys.scores_key(CAM)
        wait_until(lambda: self.client.xlen(key) >= n, SCORE_WAIT_S, interval=0.2, what=f"{n} scores")
        wait_until(lambda: self._pending() == 0, 60, interval=0.2, what="nothing pending in the group")
        msgs = [ScoreMsg.from_bytes(f[FIELD.encode()]) for _, f in self.client.xrange(key)]
        by_frame = {m.frame_id: m for m in msgs}
        assert len(by_frame) == len(msgs), "a frame was scored twice"
        assert set(by_frame) == set(self.sent), "a frame was lost, or a score names a frame never sent"
        assert all(m.status == "scored" for m in msgs), [m for m in msgs if m.status != "scored"][:3]
        return by_frame

    def _pending(self) -> int:
        return int(self.client.xpending(keys.frames_key(CAM), keys.DEFAULT_GROUP)["pending"])


def _json_line(out: str) -> dict:
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def _rate(flags: list[bool]) -> float:
    return sum(flags) / len(flags)


def _drift(procs: Processes, redis_url: str, name: str) -> dict:
    return _json_line(
        procs.run_dfm(
            "drift", "--redis", redis_url, "--camera", CAM, "--json", name=name, timeout=CLI_TIMEOUT_S
        )
    )


def _wait_drift(client: redis.Redis, frames: int, model: str) -> None:
    """Wait until the worker's drift hash covers ``frames`` frames scored by ``model``."""

    def covered() -> bool:
        got = client.hgetall(keys.drift_key(CAM))
        return got.get(b"model") == model.encode() and int(got.get(b"frames", b"0")) >= frames

    wait_until(covered, 60, interval=0.2, what=f"drift figures over {frames} frames")


def _past_alert(report: dict) -> list[str]:
    return [f["name"] for f in report["figures"] if f["value"] is not None and f["value"] >= f["alert"]]


def _peak_rss(pid: int) -> str:
    """The peak resident memory of a running process (Linux ``VmHWM``), or why it is unknown."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError as e:
        return f"unknown ({e})"
    kib = next((int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("VmHWM:")), None)
    return "unknown" if kib is None else f"{kib / 1024:.0f} MiB"


def _figure_line(report: dict, keep: Callable[[str], bool]) -> str:
    shown = [
        f"{f['name']} {f['value']:.2f} (line {f['alert']:g})"
        for f in report["figures"]
        if keep(f["name"]) and f["value"] is not None
    ]
    return f"{report['verdict']} over {report['frames']} frames: " + ", ".join(shown)


def _since_until(ids: list[str]) -> tuple[str, str]:
    ms = [int(i.rpartition(":")[2].split("-")[0]) for i in ids]
    return f"{min(ms) / 1000:.3f}", f"{max(ms) / 1000:.3f}"


def test_the_line_learns_a_new_light_and_promotes_it_without_losing_a_frame(
    procs: Processes, redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    rng = np.random.default_rng(19)
    v1 = _fit_v1(rng)
    registry = ModelRegistry(redis_client)
    registry.push("parts", v1.artifact)
    registry.assign(CAM, ModelRef("parts", 1))
    worker = _start_worker(procs, redis_url, CAM)
    _wait_ack(procs, worker, CAM, "parts@1", 1)
    line = Line(redis_client)
    figures: dict[str, object] = {}

    # 1. good frames under parts@1: hardly any false alarm, no drift
    before = line.push([render_part(rng, SIZE)[0] for _ in range(150)])
    scores = line.scores()
    fa_before = _rate([scores[f].anomalous for f in before])
    assert fa_before <= 0.02, fa_before
    _wait_drift(redis_client, len(before), "parts@1")
    steady = _drift(procs, redis_url, "drift-before")
    assert steady["verdict"] == "ok", steady
    figures["v1 false alarms, old light"] = f"{fa_before:.1%} of {len(before)}"
    figures["drift, old light"] = _figure_line(steady, lambda name: True)

    # 2. the light changes: false alarms rise and the drift figures pass their alert line
    time.sleep(0.01)  # the new light's frames start on a later millisecond than the old one's
    shifted = line.push([_brighter(render_part(rng, SIZE)[0]) for _ in range(ENROL_FRAMES)])
    scores = line.scores()
    fa_v1 = _rate([scores[f].anomalous for f in shifted])
    assert fa_v1 >= 0.3, fa_v1
    _wait_drift(redis_client, ENROL_FRAMES, "parts@1")
    drifted = _drift(procs, redis_url, "drift-after")
    assert drifted["verdict"] == "drift", drifted
    assert "brightness_psi" in _past_alert(drifted), drifted
    figures["v1 false alarms, new light"] = f"{fa_v1:.1%} of {len(shifted)}"
    figures["drift, new light (past the line)"] = _figure_line(drifted, _past_alert(drifted).__contains__)

    # 3. enrol the new light's frames (an operator vouches for the window): a candidate parts@2
    since, until = _since_until(shifted)
    t0 = time.monotonic()
    out = procs.run_dfm(
        *("enrol", "--redis", redis_url, "--camera", CAM, "--model", "parts"),
        *("--since", since, "--until", until, "--frames", str(ENROL_FRAMES)),
        *("--holdout", "0.35", "--max-fpr", "0.01", "--margin", "1.2", "--out", str(tmp_path / "set")),
        "--json",
        name="enrol",
        timeout=CLI_TIMEOUT_S,
    )
    enrol_wall_s = time.monotonic() - t0
    enrolled = _json_line(out)
    assert enrolled["candidate"] == "parts@2" and enrolled["found"] == ENROL_FRAMES, enrolled
    assert registry.version_info("parts", 2).status == "candidate"
    assert registry.resolve(CAM) == ModelRef("parts", 1)
    line.scores()  # enrol read the stream beside the group: nothing changed for the worker
    figures["enrol"] = (
        f"{enrolled['found']} frames, {enrolled['seconds']:.1f} s from start to candidate"
        f" ({enrol_wall_s:.1f} s wall with the process start), peak RSS"
        f" {enrolled['peak_rss_bytes'] / 2**20:.0f} MiB"
    )

    # 4. shadow: parts@2 quiet on the good frames parts@1 flags; the defects flagged by both
    procs.run_dfm(
        "model",
        "shadow",
        "--redis",
        redis_url,
        "--camera",
        CAM,
        "--model",
        "parts@2",
        name="shadow",
        timeout=CLI_TIMEOUT_S,
    )
    wait_until(lambda: f"camera {CAM} is shadowed by parts@2" in procs.log(worker), 60, what="the shadow")
    good = line.push([_brighter(render_part(rng, SIZE)[0]) for _ in range(100)])
    bad = line.push([_brighter(img) for img in v1.defects], defective=True)
    scores = line.scores()
    key = keys.shadow_key(CAM)
    wait_until(lambda: redis_client.xlen(key) >= len(good) + len(bad), 60, what="shadow scores")
    shadow = {
        m.frame_id: m for m in (ShadowMsg.from_bytes(f[FIELD.encode()]) for _, f in redis_client.xrange(key))
    }
    assert set(shadow) == set(good) | set(bad)
    assert all(scores[f].model == "parts@1" for f in shadow)
    flagged_by_v1 = [f for f in good if shadow[f].live_anomalous]
    assert len(flagged_by_v1) >= 0.3 * len(good)
    quiet = [f for f in flagged_by_v1 if not shadow[f].anomalous]
    assert len(quiet) >= 0.95 * len(flagged_by_v1), (len(quiet), len(flagged_by_v1))
    assert _rate([shadow[f].anomalous for f in good]) <= 0.02
    assert all(shadow[f].live_anomalous and shadow[f].anomalous for f in bad)
    report = _json_line(
        procs.run_dfm(
            "model",
            "compare",
            "--redis",
            redis_url,
            "--camera",
            CAM,
            "--json",
            name="compare",
            timeout=CLI_TIMEOUT_S,
        )
    )
    assert report["frames"] == len(good) + len(bad)
    listed = {d["frame_id"]: d["flagged_by"] for d in report["disagreements"]}
    assert set(quiet) <= set(listed) and not set(bad) & set(listed)
    figures["shadow"] = (
        f"parts@1 flags {len(flagged_by_v1)} of {len(good)} good frames, parts@2 is quiet on"
        f" {len(quiet)} of them; defects flagged by both {len(bad)}/{len(bad)}"
    )

    # 5. promote: under 1 % false alarms on the new light's good frames, every defect flagged
    procs.run_dfm(
        "model", "promote", "--redis", redis_url, "--camera", CAM, name="promote", timeout=CLI_TIMEOUT_S
    )
    _wait_ack(procs, worker, CAM, "parts@2", 1)
    good = line.push([_brighter(render_part(rng, SIZE)[0]) for _ in range(200)])
    bad = line.push([_brighter(img) for img in v1.defects], defective=True)
    scores = line.scores()
    assert {scores[f].model for f in good + bad} == {"parts@2"}
    fa_v2 = _rate([scores[f].anomalous for f in good])
    assert fa_v2 < 0.01, fa_v2
    assert all(scores[f].anomalous for f in bad)
    _wait_drift(redis_client, len(good) + len(bad), "parts@2")
    settled = _drift(procs, redis_url, "drift-promoted")
    assert settled["verdict"] == "ok", settled  # the candidate brought its own drift reference
    figures["drift after promote"] = _figure_line(settled, lambda name: True)
    figures["v2 false alarms, new light"] = f"{fa_v2:.1%} of {len(good)}"
    figures["v2 defects flagged"] = f"{sum(scores[f].anomalous for f in bad)}/{len(bad)}"

    # 6. rollback --camera: back to parts@1
    procs.run_dfm(
        "model", "rollback", "--redis", redis_url, "--camera", CAM, name="rollback", timeout=CLI_TIMEOUT_S
    )
    _wait_ack(procs, worker, CAM, "parts@1", 2)
    after = line.push([_brighter(render_part(rng, SIZE)[0]) for _ in range(20)])
    scores = line.scores()
    assert {scores[f].model for f in after} == {"parts@1"}
    assert registry.resolve(CAM) == ModelRef("parts", 1)

    figures["worker peak RSS"] = _peak_rss(worker.pid)
    assert procs.stop(worker, signal.SIGTERM) == 0, procs.log(worker)[-3000:]
    line.scores()
    print("\nlearn on the line, measured end to end:")
    for name, value in figures.items():
        print(f"  {name}: {value}")
