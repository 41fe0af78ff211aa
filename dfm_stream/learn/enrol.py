"""Enrolment: a new version of a camera's model fitted on the camera's own recent good frames.

:func:`enrol` runs the steps of ``dfm-stream enrol``:

1. load the model's current version from the registry (its backbone weights, layer, pooling, PCA
   level, score type and input size are the new version's unless overridden);
2. collect frames (:mod:`dfm_stream.learn.collect`) and keep them on disk with their provenance
   (:mod:`dfm_stream.learn.enrolment_set`); split off a seeded random holdout;
3. fit incrementally: the training frames go through the backbone in batches whose features are
   added to :class:`~dfm_stream.model.moments.FeatureMoments`, never all held at once;
4. calibrate the threshold on the holdout (:func:`dfm_stream.calibration.choose_threshold`); the
   drift reference is the training frames' image statistics and the holdout's scores, as
   ``fit`` + ``calibrate`` record it;
5. score the holdout with the current version too and compare;
6. push the new version as a **candidate** (stored, not current, assigned to no camera).
"""

from __future__ import annotations

import copy
import dataclasses
import getpass
import logging
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dfm_stream.artifact import ArtifactInfo, FittedModel, artifact_to_bytes, load_artifact
from dfm_stream.calibration import FalseAlarmRate, choose_threshold, false_alarm_rate
from dfm_stream.drift import ImageStatsCollector
from dfm_stream.errors import ConfigError
from dfm_stream.images import IMAGENET_MEAN, IMAGENET_STD
from dfm_stream.learn.collect import (
    EnrolFrame,
    Tally,
    false_alarm_frames,
    good_live_frames,
    window_frames,
)
from dfm_stream.learn.enrolment_set import EnrolmentSet, image_batches
from dfm_stream.model import DFMModel
from dfm_stream.model.moments import FeatureMoments, fit_from_moments

if TYPE_CHECKING:
    from dfm_stream.connect import RedisClient
    from dfm_stream.registry import ModelRegistry, PushResult

log = logging.getLogger(__name__)

MIN_TRAIN = 2


@dataclass(frozen=True)
class Selection:
    """Which frames to enrol: the newest ``frames`` good ones, or a vouched window, plus false alarms."""

    frames: int | None = 300
    """How many stream frames at most (None: all of the window); 0: none (false alarms only)."""
    since_ms: int | None = None
    until_ms: int | None = None
    from_false_alarms: bool = False

    @property
    def windowed(self) -> bool:
        """Whether an operator vouched for a time window (every frame in it is taken)."""
        return self.since_ms is not None or self.until_ms is not None

    def bounds(self) -> tuple[str, str]:
        """Stream id bounds of the window (``-`` / ``+`` when open)."""
        start = "-" if self.since_ms is None else f"{self.since_ms}-0"
        end = "+" if self.until_ms is None else f"{self.until_ms}-18446744073709551615"
        return start, end

    def describe(self) -> str:
        """Return the rule in words, as the manifest and the candidate's metadata record it."""
        if self.windowed:
            window = f"{_when(self.since_ms)} .. {_when(self.until_ms)}"
            rule = f"every frame in the window {window} (operator-vouched)"
            if self.frames is not None:
                rule += f", at most {self.frames}"
        elif self.frames:
            rule = f"the newest {self.frames} frames scored not anomalous"
        else:
            rule = "no stream frames"
        return rule + (" + frames marked false alarm in the console" if self.from_false_alarms else "")


def _when(ms: int | None) -> str:
    return "open" if ms is None else datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class FitSettings:
    """How to fit, calibrate and compare; None fields: as the current version."""

    holdout: float = 0.35
    seed: int = 0
    max_fpr: float = 0.01
    margin: float = 1.0
    force: bool = False
    batch_size: int = 16
    device: str = "cpu"
    pca_level: float | None = None
    score_type: str | None = None
    image_size: tuple[int, int] | None = None
    fit: str = "auto"
    """``auto``, ``moments`` or ``one-shot``: see :func:`fit_incrementally`."""


@dataclass
class ScoreSummary:
    """One version's scores on the holdout frames, at its own threshold."""

    model: str
    threshold: float | None
    scores: np.ndarray
    false_alarms: FalseAlarmRate | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: quantiles of the scores and the false-alarm rate at the threshold."""
        q = np.quantile(self.scores, [0.0, 0.5, 0.99, 1.0]).tolist()
        fa = self.false_alarms
        return {
            "model": self.model,
            "threshold": self.threshold,
            "score_min": q[0],
            "score_median": q[1],
            "score_p99": q[2],
            "score_max": q[3],
            "false_alarms": None if fa is None else fa.alarms,
            "false_alarm_rate": None if fa is None else fa.rate,
            "false_alarm_rate_ci95": None if fa is None else [fa.low, fa.high],
            "frames": int(self.scores.size),
        }


@dataclass
class EnrolResult:
    """What an enrolment did."""

    asked: int | None
    tallies: dict[str, Tally]
    n_train: int
    n_holdout: int
    folder: Path
    current: ScoreSummary
    candidate: ScoreSummary
    calibration: str
    warning: str | None
    push: PushResult
    seconds: float
    peak_rss_bytes: int
    components: int
    fit: str

    @property
    def found(self) -> int:
        """Frames kept, from every source."""
        return self.n_train + self.n_holdout


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def collect(
    client: RedisClient,
    camera: str,
    prefix: str,
    selection: Selection,
    kept: EnrolmentSet,
) -> dict[str, Tally]:
    """Collect the selected frames into ``kept``; return the tally of each source."""
    tallies: dict[str, Tally] = {}
    start, end = selection.bounds()
    sources: list[tuple[str, Callable[[Tally], Iterator[EnrolFrame]]]] = []
    if selection.windowed:
        sources.append(
            ("stream", lambda t: window_frames(client, camera, prefix, start, end, selection.frames, t))
        )
    elif selection.frames:
        want = selection.frames
        sources.append(("stream", lambda t: good_live_frames(client, camera, prefix, want, t)))
    if selection.from_false_alarms:
        sources.append(("false_alarms", lambda t: false_alarm_frames(client, camera, prefix, start, end, t)))
    for name, frames in sources:
        tally = tallies[name] = Tally()
        for frame in frames(tally):
            if not kept.add(frame):
                tally.kept -= 1
                tally.leave_out("already kept")
    return tallies


def new_model(current: FittedModel, settings: FitSettings) -> DFMModel:
    """Return an unfitted model with the current version's backbone (weights too) and settings.

    ``settings`` may override the PCA level and the score type.
    """
    info = current.info
    level = settings.pca_level if settings.pca_level is not None else info.n_comps
    model = DFMModel(
        backbone=info.backbone,
        layer=info.layer,
        pre_trained=False,
        pooling_kernel_size=info.pooling_kernel_size,
        n_comps=level if level <= 1 else int(level),
        score_type=settings.score_type or info.score_type,
    )
    model.feature_extractor.load_state_dict(copy.deepcopy(current.model.feature_extractor.state_dict()))
    model.weights_id = info.weights_id
    return model.to(settings.device).eval()


def fit_incrementally(
    model: DFMModel,
    files: list[Path],
    image_size: tuple[int, int],
    batch_size: int,
    how: str = "auto",
    image_stats: ImageStatsCollector | None = None,
) -> tuple[DFMModel, str]:
    """Fit ``model`` on the images at ``files``, one batch of images at a time; return it and the method.

    ``moments``: only the float64 feature moments are kept (``8 D^2`` bytes, whatever the number of
    images). ``one-shot``: the features are kept (``4 N D`` bytes) for :meth:`DFMModel.fit`'s SVD.
    ``auto`` takes moments when there are at least as many images as features per image, else
    the one-shot fit, whose memory is then the smaller. Both give the same model. ``image_stats``
    records the image statistics of the batches for the drift reference.
    """
    moments = FeatureMoments()
    held: list[torch.Tensor] = []
    batches = image_batches(files, batch_size, image_size)
    for batch in batches if image_stats is None else image_stats.tap(batches):
        features, _ = model.get_features(batch)
        if how == "auto":
            how = "moments" if len(files) >= features.shape[1] else "one-shot"
        if how == "moments":
            moments.add(features)
        else:
            held.append(features)
        del features
    if how == "moments":
        return fit_from_moments(model, moments), how
    features = torch.cat(held)
    held.clear()
    if len(features) < MIN_TRAIN:
        raise ConfigError(f"DFM needs at least {MIN_TRAIN} training images, got {len(features)}")
    model.fit(features)
    return model.eval(), how


def score_files(
    model: DFMModel, files: list[Path], image_size: tuple[int, int], batch_size: int
) -> np.ndarray:
    """Score the images at ``files``; float64 scores in order."""
    out: list[np.ndarray] = []
    with torch.no_grad():
        for batch in image_batches(files, batch_size, image_size):
            features, shapes = model.get_features(batch)
            out.append(model.score(features, shapes).pred_score.double().cpu().numpy())
    return np.concatenate(out) if out else np.empty(0)


def _summary(label: str, threshold: float | None, scores: np.ndarray) -> ScoreSummary:
    rate = None if threshold is None else false_alarm_rate(scores, threshold)
    return ScoreSummary(label, threshold, scores, rate)


def _check_counts(
    kept: EnrolmentSet, settings: FitSettings, camera: str, tallies: dict[str, Tally]
) -> tuple[int, int]:
    found = len(kept.frames)
    why = "; ".join(f"{name}: {t.describe()}" for name, t in tallies.items()) or "no source selected"
    anomalous = sum(t.left_out.get("anomalous", 0) for t in tallies.values())
    if anomalous > found:  # the line changed: the current model flags the good frames it should learn
        why += (
            "; most frames were scored anomalous: if the line changed (light, finish), vouch for a window"
            " of good parts with --since/--until, or use --from-false-alarms"
        )
    if found == 0:
        raise ConfigError(
            f"no frames found for camera {camera!r} ({why}): widen --since/--until, check that a reader"
            " and a worker run, or use --from-false-alarms"
        )
    n_train, n_hold = kept.split(settings.holdout, settings.seed)
    if n_train < MIN_TRAIN or n_hold < 1:
        raise ConfigError(
            f"too few frames for a holdout: {found} found ({why}) give {n_train} to fit and {n_hold} to "
            f"calibrate with --holdout {settings.holdout:g}; need at least {MIN_TRAIN} and 1:"
            " collect more frames"
        )
    return n_train, n_hold


def enrol(
    client: RedisClient,
    registry: ModelRegistry,
    camera: str,
    name: str,
    selection: Selection,
    settings: FitSettings,
    folder: Path,
    operator: str | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> EnrolResult:
    """Run an enrolment for ``camera`` replacing model ``name``; see the module docstring."""
    started = time.perf_counter()
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    current_version = registry.current(name)
    current = load_artifact(registry.get_bytes(name, current_version), device=settings.device)
    kept = EnrolmentSet(folder)
    tallies = collect(client, camera, registry.prefix, selection, kept)
    n_train, n_hold = _check_counts(kept, settings, camera, tallies)
    provenance = _provenance(camera, name, current_version, selection, tallies, kept, settings, operator)
    provenance["started_at"] = started_at
    kept.write_manifest(provenance)
    progress(f"collected {len(kept.frames)} frames into {folder}: fitting on {n_train}, holding out {n_hold}")
    image_size = settings.image_size or current.info.image_size
    image_stats = ImageStatsCollector(IMAGENET_MEAN, IMAGENET_STD)
    model, how = fit_incrementally(
        new_model(current, settings),
        kept.files("train"),
        image_size,
        settings.batch_size,
        settings.fit,
        image_stats,
    )
    provenance["fit"] = how
    holdout = kept.files("holdout")
    new_scores = score_files(model, holdout, image_size, settings.batch_size)
    old_scores = score_files(current.model, holdout, current.info.image_size, settings.batch_size)
    choice = choose_threshold(
        new_scores, np.zeros(new_scores.size), settings.max_fpr, settings.margin, settings.force
    )
    info = dataclasses.replace(
        ArtifactInfo.for_model(
            model, image_size, n_train, image_stats.reference().with_scores(new_scores).to_json_dict()
        ),
        threshold=choice.threshold,
        score_min=float(new_scores.min()),
        score_max=float(new_scores.max()),
    )
    current_summary = _summary(f"{name}@{current_version}", current.info.threshold, old_scores)
    provenance["calibration"] = choice.how
    candidate_summary = _summary("candidate", choice.threshold, new_scores)
    evaluation = {"current": current_summary.to_dict(), "candidate": candidate_summary.to_dict()}
    push = registry.push_candidate(
        name, artifact_to_bytes(model, info), {**provenance, "evaluation": evaluation}, source="enrol"
    )
    candidate_summary.model = f"{name}@{push.info.version}"
    evaluation["candidate"]["model"] = candidate_summary.model
    kept.write_manifest({**provenance, "candidate": candidate_summary.model, "evaluation": evaluation})
    return EnrolResult(
        asked=selection.frames,
        tallies=tallies,
        n_train=n_train,
        n_holdout=n_hold,
        folder=folder,
        current=current_summary,
        candidate=candidate_summary,
        calibration=f"{choice.how}: {choice.false_alarms}",
        warning=choice.warning,
        push=push,
        seconds=time.perf_counter() - started,
        peak_rss_bytes=peak_rss_bytes(),
        components=model.pca_model.k,
        fit=how,
    )


def _provenance(
    camera: str,
    name: str,
    current_version: int,
    selection: Selection,
    tallies: dict[str, Tally],
    kept: EnrolmentSet,
    settings: FitSettings,
    operator: str | None,
) -> dict[str, Any]:
    """Where the frames came from, by which rule, who asked: the manifest's and the candidate's record."""
    entry_ids = [f.entry_id for f in kept.frames]
    n_hold = sum(f.split == "holdout" for f in kept.frames)
    return {
        "camera": camera,
        "model": name,
        "replaces": f"{name}@{current_version}",
        "rule": selection.describe(),
        "asked": selection.frames,
        "found": len(kept.frames),
        "sources": {
            k: {"looked_at": t.looked_at, "kept": t.kept, "left_out": dict(t.left_out)}
            for k, t in tallies.items()
        },
        "operator": operator or getpass.getuser(),
        "frames_folder": str(kept.folder.resolve()),
        "first_entry_id": min(entry_ids, key=_id_key),
        "last_entry_id": max(entry_ids, key=_id_key),
        "n_train": len(kept.frames) - n_hold,
        "n_holdout": n_hold,
        "holdout_seed": settings.seed,
    }


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
