"""The offline CLI end to end on the generated data set: make-dataset, fit, eval, calibrate, score."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from dfm_stream.artifact import load_artifact, read_info
from dfm_stream.cli import main
from dfm_stream.drift import reference_of
from dfm_stream.synthetic_parts import DEFECT_TYPES, make_dataset, render_part

FIT_ARGS = [
    "--backbone", "resnet18", "--layer", "layer2", "--pooling-kernel-size", "2",
    "--image-size", "96", "--no-pretrained", "--device", "cpu", "--batch-size", "16",
]  # fmt: skip


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "parts"
    assert main(["make-dataset", "--out", str(root), "--size", "96", "--n-train", "40",
                 "--n-test-good", "12", "--n-test-defect", "12"]) == 0  # fmt: skip
    return root


@pytest.fixture(scope="module")
def fitted(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("model") / "parts.dfm"
    assert main(["fit", "--train", str(dataset / "train" / "good"), "--out", str(out), *FIT_ARGS]) == 0
    return out


def test_generated_dataset_has_the_mvtec_layout(dataset: Path) -> None:
    assert len(list((dataset / "train" / "good").glob("*.png"))) == 40
    assert len(list((dataset / "test" / "good").glob("*.png"))) == 12
    for defect in DEFECT_TYPES:
        images = sorted((dataset / "test" / defect).glob("*.png"))
        masks = sorted((dataset / "ground_truth" / defect).glob("*_mask.png"))
        assert len(images) == len(masks) == 6
        mask = cv2.imread(str(masks[0]), cv2.IMREAD_GRAYSCALE)
        assert set(np.unique(mask)) == {0, 255}


def test_render_part_draws_visible_defects_only_where_asked() -> None:
    good, good_mask = render_part(np.random.default_rng(1), 64)
    assert good.shape == (64, 64, 3) and good.dtype == np.uint8 and not good_mask.any()
    for defect in DEFECT_TYPES:
        image, mask = render_part(np.random.default_rng(1), 64, defect)
        assert mask.any()
        inside = image[mask > 0].astype(float).mean()
        ring = cv2.dilate(mask, np.ones((7, 7), np.uint8)) > 0
        around = image[ring & (mask == 0)].astype(float).mean()
        assert abs(inside - around) > 40
    with pytest.raises(ValueError, match="unknown defect"):
        render_part(np.random.default_rng(1), 64, "dent")


def test_fit_writes_an_artifact_and_reports_k(fitted: Path, capsys: pytest.CaptureFixture[str]) -> None:
    info = read_info(fitted)
    assert (info.backbone, info.layer, info.image_size, info.n_train) == ("resnet18", "layer2", (96, 96), 40)
    assert info.weights_id == "random" and info.n_components > 0
    reference = reference_of(info.drift)  # the drift reference: the training images' statistics
    assert reference is not None and set(reference.image) == {"brightness", "contrast", "sharpness"}
    assert all(d.n == 40 for d in reference.image.values()) and reference.scores is None


def test_eval_separates_defects_with_random_weights(fitted: Path, dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    assert (
        main(["eval", "--model", str(fitted), "--data", str(dataset), "--out", str(out), "--device", "cpu"])
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["image_auroc"] > 0.9
    assert set(report["image_auroc_per_defect"]) == set(DEFECT_TYPES)
    assert all(v > 0.8 for v in report["image_auroc_per_defect"].values())
    assert report["pixel_auroc"] > 0.7
    assert report["f1_optimal"]["f1"] > 0.8
    assert report["n_images"] == 24
    assert report["model_threshold"] is None and report["at_model_threshold"] is None
    for name in ("roc.png", "histogram.png"):
        assert cv2.imread(str(out / name)) is not None


def test_calibrate_then_score_flags_defects(fitted: Path, dataset: Path, tmp_path: Path) -> None:
    model = tmp_path / "calibrated.dfm"
    model.write_bytes(fitted.read_bytes())
    assert main(["calibrate", "--model", str(model), "--data", str(dataset / "test" / "good"),
                 "--max-fpr", "0.1", "--device", "cpu"]) == 0  # fmt: skip
    info = read_info(model)
    assert info.threshold is not None and info.score_min <= info.threshold <= info.score_max
    out, heatmaps = tmp_path / "scores.jsonl", tmp_path / "heatmaps"
    images = [str(dataset / "test" / "good"), str(dataset / "test" / "spot" / "000.png")]
    args = [
        "score",
        "--model",
        str(model),
        "--images",
        *images,
        "--out",
        str(out),
        "--heatmaps",
        str(heatmaps),
    ]
    assert main([*args, "--device", "cpu"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 13
    assert {"path", "score", "anomalous", "threshold"} <= set(lines[0])
    good_flags = [line["anomalous"] for line in lines[:12]]
    assert sum(good_flags) <= 2
    assert lines[-1]["anomalous"] is True
    assert len(list(heatmaps.glob("*.png"))) == 13
    # heat maps are named after their images (good/000.png and spot/000.png collide: folder added)
    assert lines[0]["heatmap"] == str(heatmaps / "good__000.png")
    assert lines[-1]["heatmap"] == str(heatmaps / "spot__000.png")
    assert lines[1]["heatmap"] == str(heatmaps / "001.png")
    assert all(Path(line["heatmap"]).is_file() for line in lines)
    # score_norm as in the wire format: 0.5 at the threshold
    assert lines[0]["normalized_score"] == lines[0]["score_norm"]  # the old name stays readable
    spread = info.score_max - info.score_min
    for line in lines:
        expected = min(1.0, max(0.0, (line["score"] - info.threshold) / spread + 0.5))
        assert line["score_norm"] == pytest.approx(expected)


def test_calibrate_refuses_a_rate_the_images_cannot_resolve_unless_forced(
    fitted: Path, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "forced.dfm"
    model.write_bytes(fitted.read_bytes())
    base = ["calibrate", "--model", str(model), "--data", str(dataset / "test" / "good"), "--device", "cpu"]
    assert main([*base, "--max-fpr", "0.01"]) == 2
    err = capsys.readouterr().err
    assert "12 good images cannot resolve a false-alarm rate of 1.00%: need at least 100" in err
    assert read_info(model).threshold is None, "a refused calibration leaves the artifact alone"
    assert main([*base, "--max-fpr", "0.01", "--force", "--margin", "1.5"]) == 0
    out = capsys.readouterr()
    assert "warning: 12 good images cannot resolve" in out.err
    info = read_info(model)
    assert info.threshold == pytest.approx(info.score_max * 1.5)
    assert (
        "expected false-alarm rate: 0/12 good images above the threshold = 0.00% (95% CI 0.00% .. 26.46%"
        in out.out
    )
    assert f"content hash {info.content_hash}" in out.out
    assert f"file sha256  {hashlib.sha256(model.read_bytes()).hexdigest()}" in out.out


def test_calibrate_on_labelled_set_uses_f1_threshold(
    fitted: Path, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "f1.dfm"
    model.write_bytes(fitted.read_bytes())
    assert main(["calibrate", "--model", str(model), "--data", str(dataset), "--device", "cpu"]) == 0
    report_dir = tmp_path / "ev"
    capsys.readouterr()
    assert main(["eval", "--model", str(model), "--data", str(dataset), "--out", str(report_dir)]) == 0
    report = json.loads((report_dir / "report.json").read_text())
    threshold = load_artifact(model).info.threshold
    assert threshold == pytest.approx(report["f1_optimal"]["threshold"])
    # precision, recall and false-alarm rate at the model's own threshold, beside the F1-optimal one
    own = report["at_model_threshold"]
    assert own["threshold"] == threshold
    assert own["true_positives"] + own["false_negatives"] == report["n_defective"] == 12
    assert own["false_alarm_rate"] == pytest.approx(own["false_positives"] / report["n_good"])
    assert {"precision", "recall", "f1", "false_alarm_rate"} <= set(report["f1_optimal"])
    out = capsys.readouterr().out
    assert (
        f"model threshold {threshold:.6g}: precision {own['precision']:.3f}, recall {own['recall']:.3f}"
        in out
    )
    assert f"false-alarm rate {own['false_alarm_rate']:.3f} ({own['false_positives']}/12 good)" in out
    assert "F1-optimal threshold" in out


def test_corrupt_image_stops_or_is_skipped(fitted: Path, dataset: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for src in sorted((dataset / "test" / "good").glob("*.png"))[:3]:
        (folder / src.name).write_bytes(src.read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "s.jsonl"
    base = ["score", "--model", str(fitted), "--images", str(folder), "--out", str(out)]
    assert main(base) == 2
    assert "broken.png" in capsys.readouterr().err
    assert main([*base, "--on-error", "skip"]) == 0
    assert len(out.read_text().splitlines()) == 3
    assert "skipped" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["fit", "--train", "{missing}", "--out", "{tmp}/m.dfm", *FIT_ARGS], "does not exist"),
        (["fit", "--train", "{empty}", "--out", "{tmp}/m.dfm", *FIT_ARGS], "holds no images"),
        (
            ["fit", "--train", "{data}", "--out", "{tmp}/m.dfm", "--backbone", "vgg16", "--no-pretrained"],
            "vgg16",
        ),
        (
            ["fit", "--train", "{data}", "--out", "{tmp}/m.dfm", "--layer", "layer9", "--no-pretrained"],
            "layer9",
        ),
        (["score", "--model", "{tmp}/junk.dfm", "--images", "{data}", "--out", "{tmp}/s.jsonl"], "truncated"),
        (["eval", "--model", "{model}", "--data", "{empty}", "--out", "{tmp}/ev"], "MVTec"),
    ],
)
def test_bad_input_gets_a_clear_error(
    argv: list[str], message: str, fitted: Path, dataset: Path, tmp_path: Path, capsys
) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.dfm").write_bytes(b"\x01\x02")
    values = {"missing": tmp_path / "nope", "empty": tmp_path / "empty", "tmp": tmp_path,
              "data": dataset / "train" / "good", "model": fitted}  # fmt: skip
    assert main([a.format(**values) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_heatmaps_are_refused_for_nll_models(dataset: Path, tmp_path: Path, capsys) -> None:
    model = tmp_path / "nll.dfm"
    args = ["fit", "--train", str(dataset), "--out", str(model), *FIT_ARGS, "--score-type", "nll"]
    assert main([*args, "--pca-level", "8"]) == 0
    out = tmp_path / "s.jsonl"
    score = ["score", "--model", str(model), "--images", str(dataset / "test" / "spot"), "--out", str(out)]
    assert main([*score, "--heatmaps", str(tmp_path / "hm")]) == 2
    assert "fre" in capsys.readouterr().err
    assert main(score) == 0
    assert len(out.read_text().splitlines()) == 6


def test_installed_entry_point_runs_fit(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli.dfm"
    proc = subprocess.run(
        [sys.executable, "-m", "dfm_stream.cli", "fit", "--train", str(dataset), "--out", str(out),
         *FIT_ARGS],
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "k=" in proc.stdout and str(out) in proc.stdout
    info = read_info(out)
    assert info.n_train == 40
    # both hashes, each under its name; the worker's label for the file uses the content hash
    assert f"content hash {info.content_hash} (worker label cli@{info.content_hash[:8]})" in proc.stdout
    assert f"file sha256  {hashlib.sha256(out.read_bytes()).hexdigest()}" in proc.stdout


def test_make_dataset_is_reproducible(tmp_path: Path) -> None:
    a = make_dataset(tmp_path / "a", n_train=2, n_test_good=1, n_test_defect=2, size=48, seed=3)
    b = make_dataset(tmp_path / "b", n_train=2, n_test_good=1, n_test_defect=2, size=48, seed=3)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
