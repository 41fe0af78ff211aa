"""Issue 21's bench: int8 / bf16 backbones and decode at model size, speed beside accuracy.

``python -m dfm_stream.bench.speedups --out docs/bench/NAME.json`` writes one JSON document:

* ``precision``: a random-weights DFM model fitted on a synthetic set; its int8 build calibrated
  on the fit images; image AUROC, pixel AUROC and score Spearman of int8 against fp32 on two
  evaluation sets (scratch+spot, crack+stain); backbone images/s of fp32 and int8 ONNX Runtime
  on the same batch; bf16 (torch autocast, channels_last) against fp32 channels_last where the
  CPU has AVX512-BF16/AMX, else the reason it was not run.
* ``decode``: frames of the first set as 1280x720 JPEGs, scored after a full decode and after
  decode at model size (Spearman, largest relative score difference, AUROCs), and transport
  frames/s (the bench's transport stage: Redis -> consumer -> decode -> publish, no model) for
  1280x720 and 256x256 frames with and without it.

Random weights (no downloads here): see :mod:`dfm_stream.precision_check` for what the AUROC
figures mean then. The machine's CPU flags and load average are recorded with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from dfm_stream.bench.env import load_average, machine_info
from dfm_stream.cpus import has_bf16, has_int8_dot
from dfm_stream.quantize import CACHE_ENV

SECONDS = 8.0


def _rate(fn: Callable[[], object], images: int, seconds: float) -> float:
    fn()  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        done += images
    return done / (time.perf_counter() - start)


def _fit(backbone: str, layer: str, size: int, train: list[Path]) -> Any:
    from dfm_stream.images import iter_batches
    from dfm_stream.model import DFMModel

    torch.manual_seed(0)
    model = DFMModel(backbone=backbone, layer=layer, pre_trained=False, pooling_kernel_size=4, n_comps=0.97)
    model.eval()
    features = torch.cat([model.get_features(b)[0] for _, b in iter_batches(train, 8, (size, size))])
    model.fit(features)
    return model


def precision_stage(model: Any, sets: dict[str, Path], size: int, batch: int) -> dict[str, Any]:
    """Int8 (and bf16 where the CPU has it) against fp32: accuracy per set and backbone speed."""
    from dfm_stream import backends
    from dfm_stream.images import iter_batches, list_images
    from dfm_stream.inference import Engine
    from dfm_stream.precision_check import check_set

    shape = (size, size)
    first = next(iter(sets.values()))
    train = list_images(first / "train" / "good")[:32]
    calibration = [b for _, b in iter_batches(train, batch, shape)]
    t0 = time.perf_counter()
    backends.build_backbone_runner(
        model.feature_extractor, "onnxruntime", calibration[0][:1], precision="int8", calibration=calibration
    )
    out: dict[str, Any] = {"calibration_images": len(train), "int8_build_s": time.perf_counter() - t0}
    fp32, int8 = Engine("cpu", "fp32", "onnxruntime", batch), Engine("cpu", "int8", "onnxruntime", batch)
    out["int8_checks"] = [check_set(n, r, model, shape, fp32, int8, batch).as_dict() for n, r in sets.items()]
    example = torch.cat(calibration)[:batch]
    speeds = {}
    for name, engine in (("onnxruntime_fp32", fp32), ("onnxruntime_int8", int8)):
        runner = engine.runner(model.feature_extractor, shape)
        speeds[name] = _rate(lambda r=runner: r(example), batch, SECONDS)  # type: ignore[misc]
    out["backbone_images_per_s"] = speeds
    out["int8_over_fp32"] = speeds["onnxruntime_int8"] / speeds["onnxruntime_fp32"]
    out["bf16"] = _bf16(model, sets, shape, batch, example)
    return out


def _bf16(
    model: Any, sets: dict[str, Path], shape: tuple[int, int], batch: int, example: torch.Tensor
) -> Any:
    from dfm_stream.inference import Engine
    from dfm_stream.precision_check import check_set

    if not has_bf16():
        return {
            "run": False,
            "reason": "this CPU has neither avx512_bf16 nor amx_bf16: --precision bf16 refuses",
        }
    fp32, bf16 = Engine("cpu", "fp32", "channels_last", batch), Engine("cpu", "bf16", "channels_last", batch)
    checks = [check_set(n, r, model, shape, fp32, bf16, batch).as_dict() for n, r in sets.items()]
    speeds = {}
    for name, engine in (("channels_last_fp32", fp32), ("channels_last_bf16", bf16)):
        runner = engine.runner(model.feature_extractor, shape)

        def call(r: Any = runner, e: Any = engine) -> None:
            with torch.inference_mode(), e.autocast_scope():
                r(example)

        speeds[name] = _rate(call, batch, SECONDS)
    return {"run": True, "checks": checks, "backbone_images_per_s": speeds}


def _wide(image: np.ndarray, width: int, height: int) -> np.ndarray:
    square = cv2.resize(image, (height, height), interpolation=cv2.INTER_AREA)
    pad = width - height
    return cv2.copyMakeBorder(square, 0, 0, pad // 2, pad - pad // 2, cv2.BORDER_REPLICATE)


def decode_stage(
    model: Any, root: Path, size: int, batch: int, frames: int, repeats: int = 3
) -> dict[str, Any]:
    """Full decode against decode at model size: scores on the set's 1280x720 JPEGs, transport."""
    from dfm_stream.evaluate import auroc
    from dfm_stream.frame_codec import decode_frame, encode_frame
    from dfm_stream.images import mvtec_test_set, preprocess_tensor, read_image
    from dfm_stream.inference import Engine
    from dfm_stream.precision_check import spearman

    engine = Engine("cpu", "fp32", "onnxruntime", batch)
    samples = mvtec_test_set(root)
    labels = np.asarray([s.label for s in samples])
    jpegs = [
        encode_frame(_wide(cv2.cvtColor(read_image(s.path), cv2.COLOR_RGB2BGR), 1280, 720), "c", 0, "")
        for s in samples
    ]
    scores = {}
    for mode, min_size in (("full", None), ("model_size", (size, size))):
        values = []
        for i in range(0, len(jpegs), batch):
            images = [decode_frame(m, min_size=min_size) for m in jpegs[i : i + batch]]
            tensors = [
                preprocess_tensor(torch.from_numpy(im).permute(2, 0, 1)[None], (size, size)) for im in images
            ]
            values.append(engine.score(model, torch.cat(tensors), want_maps=False).scores)
        scores[mode] = np.concatenate(values)
    full, reduced = scores["full"], scores["model_size"]
    out: dict[str, Any] = {
        "frames": "1280x720 JPEG (quality 90), the first set's test images letterboxed",
        "image_auroc_full": auroc(labels, full),
        "image_auroc_model_size": auroc(labels, reduced),
        "spearman": spearman(full, reduced),
        "max_relative_score_difference": float((np.abs(reduced - full) / np.abs(full)).max()),
        "decode_only_frames_per_s": _decode_only(jpegs, size, repeats),
        "transport_frames_per_s": _transport(jpegs, size, batch, frames, repeats),
    }
    return out


def _decode_only(jpegs: list[Any], size: int, repeats: int) -> dict[str, list[float]]:
    """Frames/s of :func:`decode_frame` alone (one thread), full and at model size, interleaved."""
    from dfm_stream.frame_codec import decode_frame

    rates: dict[str, list[float]] = {"1280x720 full": [], "1280x720 model_size": []}
    for _ in range(repeats):
        for mode, min_size in (("full", None), ("model_size", (size, size))):
            rate = _rate(lambda m=min_size: [decode_frame(j, min_size=m) for j in jpegs], len(jpegs), 2.0)  # type: ignore[misc]
            rates[f"1280x720 {mode}"].append(rate)
    return rates


def _transport(jpegs: list[Any], size: int, batch: int, frames: int, repeats: int) -> dict[str, list[float]]:
    import redis

    from dfm_stream.bench.stream_stages import StreamSetup, delete_prefix, push_backlog, run_echo_consumer
    from dfm_stream.embedded_redis import EmbeddedRedis
    from dfm_stream.frame_codec import decode_frame, encode_frame

    small = [
        encode_frame(cv2.resize(cv2.cvtColor(decode_frame(m), cv2.COLOR_RGB2BGR), (256, 256)), "c", 0, "")
        for m in jpegs
    ]
    server = EmbeddedRedis().start()
    rates: dict[str, list[float]] = {}
    runs = [
        (rep, label, templates, mode, min_size)
        for rep in range(repeats)
        for label, templates in (("1280x720", jpegs), ("256x256", small))
        for mode, min_size in (("full", None), ("model_size", (size, size)))
    ]  # interleaved: a busy spell of the machine hits every configuration alike
    try:
        client = redis.Redis.from_url(server.url)
        for rep, label, templates, mode, min_size in runs:
            cameras = ["cam0", "cam1"]
            by_camera = {c: [_as_camera(t, c) for t in templates] for c in cameras}
            setup = StreamSetup(
                client, server.url, "speedups", cameras, by_camera, Path(), Path(), batch_size=batch
            )
            prefix = setup.prefix(f"{label}-{mode}", rep)
            push_backlog(setup, prefix, frames, session=prefix)
            wall = run_echo_consumer(client, prefix, cameras, batch, frames, min_size=min_size)
            rates.setdefault(f"{label} {mode}", []).append(frames / wall)
            delete_prefix(client, prefix)
        client.close()
    finally:
        server.stop()
    return rates


def _as_camera(template: Any, camera: str) -> Any:
    import dataclasses

    return dataclasses.replace(template, camera=camera)


def main(argv: list[str] | None = None) -> int:
    """Run both stages and write the JSON document; print a short table."""
    from dfm_stream.images import list_images
    from dfm_stream.synthetic_parts import OTHER_DEFECT_TYPES, make_dataset

    p = argparse.ArgumentParser(
        prog="python -m dfm_stream.bench.speedups", description=__doc__.split("\n")[0]
    )
    p.add_argument("--out", required=True)
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--layer", default="layer3")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--train", type=int, default=32, help="fit images (also the int8 calibration)")
    p.add_argument("--test", type=int, default=16, help="good and defective test images per set, each")
    p.add_argument("--transport-frames", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats of the decode speeds")
    p.add_argument("--stages", default="precision,decode", help="comma list from precision,decode")
    args = p.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    started = time.time()
    doc: dict[str, Any] = {
        "schema": "dfm-stream-bench-speedups/1",
        "command": "python -m dfm_stream.bench.speedups "
        + shlex.join(sys.argv[1:] if argv is None else argv),
        "machine": {**machine_info(), "has_int8_dot": has_int8_dot(), "has_bf16": has_bf16()},
        "settings": vars(args),
    }
    with tempfile.TemporaryDirectory(prefix="dfm-speedups-") as tmp:
        os.environ[CACHE_ENV] = str(Path(tmp) / "cache")  # a fresh build (timed), not the user's cache
        n = args.test
        size = args.image_size
        first = make_dataset(
            Path(tmp) / "a", n_train=args.train, n_test_good=n, n_test_defect=n, size=size, seed=1
        )
        other = make_dataset(
            Path(tmp) / "b",
            n_train=1,
            n_test_good=n,
            n_test_defect=n,
            size=size,
            seed=2,
            defects=OTHER_DEFECT_TYPES,
        )
        model = _fit(args.backbone, args.layer, size, list_images(first / "train" / "good"))
        sets = {"scratch+spot": first, "crack+stain": other}
        stages = args.stages.split(",")
        if "precision" in stages:
            doc["precision"] = precision_stage(model, sets, size, args.batch_size)
        if "decode" in stages:
            doc["decode"] = decode_stage(
                model, first, size, args.batch_size, args.transport_frames, args.repeats
            )
    doc["machine"]["load_average_end"] = load_average()
    doc["wall_s"] = time.time() - started
    Path(args.out).write_text(json.dumps(doc, indent=2, default=float) + "\n")
    print(json.dumps({k: doc[k] for k in ("precision", "decode") if k in doc}, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
