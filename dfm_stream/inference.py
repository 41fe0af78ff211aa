"""Decode, pre-process and score frames: the model side of the worker.

* Device ``auto`` is CUDA when available, else the CPU. The model always runs under
  ``torch.inference_mode``.
* Backbone backend (``--backend``, :mod:`dfm_stream.backends`): ``auto`` is the fastest this
  install can run on the device (ONNX Runtime, then OpenVINO, then ``fused`` eager on the CPU;
  ``channels_last`` eager on CUDA); each keeps scores within 1e-3 relative of fp32 eager. The
  runner is built once per backbone and image size when a model is prepared (export, compile,
  warm-up), so the first frame does not pay for it.
* Precision (``--precision``): on CUDA ``auto`` is bf16 (fp16 where bf16 is not supported); on
  the CPU ``auto`` is int8 where :mod:`dfm_stream.quantize`'s cache holds an int8 build of the
  backbone that ``dfm-stream quantize`` validated against fp32 (ONNX Runtime backend), fp32
  otherwise. ``int8`` runs the backbone statically quantized in ONNX Runtime (CPU only); ``bf16``
  on the CPU is torch autocast on a torch backend and needs AVX512-BF16 or AMX (refused
  elsewhere: emulated bf16 is slower than fp32). Reduced precision is used for the **backbone
  only**; the pooled features are cast back to fp32 and the PCA / Gaussian score math runs in
  fp32. Expected tolerance against fp32: fp16 within about 0.5 % relative of the fp32 score, bf16
  within about 2 % (bf16 keeps 8 mantissa bits); int8 is held to image AUROC within 0.005, pixel
  AUROC within 0.01 and score Spearman >= 0.99 on an evaluation set (:mod:`dfm_stream.precision_check`).
  Choose ``--precision fp32`` for bit-for-bit the offline scores.
* Decoding: JPEG frames are decoded with OpenCV in a small thread pool (OpenCV releases the GIL),
  at 1/2, 1/4 or 1/8 scale when the frame is that much larger than the model's input (libjpeg's
  DCT scaling; scores stay within 1e-3 relative of a full-size decode, alarm images keep the
  frame's aspect ratio at the reduced size),
  or, on CUDA, with ``torchvision.io.decode_jpeg(device="cuda")`` (falling back to OpenCV for a
  batch the GPU decoder refuses). Pre-processing is :func:`dfm_stream.images.preprocess_tensor`
  (the same rule as offline scoring), run on the model's device.
"""

from __future__ import annotations

import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812

from dfm_stream import backends
from dfm_stream.consumer import StreamEntry
from dfm_stream.cpus import has_bf16
from dfm_stream.errors import ConfigError, WireError
from dfm_stream.frame_codec import decode_frame, jpeg_size
from dfm_stream.images import preprocess_tensor
from dfm_stream.model.dfm import DFMModel
from dfm_stream.wire import DEFAULT_MAX_PIXELS, FrameMsg

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "fp16", "bf16", "int8")
_RUNNERS = "_dfm_stream_runners"
"""The attribute of a feature extractor that holds its runners (they live and die with it)."""


class _Runners(dict[tuple[str, str, int, int], backends.BackboneRunner]):
    """A feature extractor's runners by (backend, precision, height, width); a copy starts empty."""

    def __deepcopy__(self, memo: dict[int, object]) -> _Runners:
        return _Runners()  # a copied module (fused, exported) must not drag sessions along


def runner_count(extractor: torch.nn.Module) -> int:
    """Return how many runners (one per backend, precision and input size) ``extractor`` holds."""
    return len(extractor.__dict__.get(_RUNNERS, ()))


DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    """Return the torch device for ``auto`` / ``cpu`` / ``cuda[:N]``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine (use auto or cpu)")
    if name != "cpu" and not name.startswith("cuda"):
        raise ConfigError(f"unknown device {name!r}: use auto, cpu or cuda")
    return torch.device(name)


def resolve_precision(
    precision: str, device: torch.device, flags: frozenset[str] | None = None
) -> torch.dtype | None:
    """Return the autocast dtype of the backbone (None: no autocast: fp32, or int8 in the runtime).

    ``flags`` are the CPU's feature flags (default: this machine's ``/proc/cpuinfo``).
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if device.type != "cuda":
        return _cpu_autocast(precision, flags)
    if precision == "int8":
        raise ConfigError(
            "--precision int8 runs on the CPU (ONNX Runtime); on CUDA use bf16 or fp16 (docs/scaling.md)"
        )
    if precision == "fp32":
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def _cpu_autocast(precision: str, flags: frozenset[str] | None) -> torch.dtype | None:
    if precision == "bf16":
        if not has_bf16(flags):
            raise ConfigError(
                "--precision bf16 on the CPU needs AVX512-BF16 or AMX (cpuinfo flags avx512_bf16 / "
                "amx_bf16), which this CPU lacks: bf16 would be emulated, slower than fp32; "
                "use fp32 or int8"
            )
        return torch.bfloat16
    if precision not in ("auto", "fp32", "int8"):
        raise ConfigError(f"--precision {precision} needs a CUDA device; on the CPU use fp32, int8 or bf16")
    return None


@dataclass
class DecodedFrame:
    """A frame that decoded cleanly: its stream entry, message and RGB image (numpy HxWx3 or CUDA CHW)."""

    entry: StreamEntry
    msg: FrameMsg
    image: np.ndarray | torch.Tensor

    def rgb_numpy(self) -> np.ndarray:
        """Return the image as an RGB uint8 HxWx3 numpy array (copied from the GPU if needed)."""
        if isinstance(self.image, torch.Tensor):
            return self.image.permute(1, 2, 0).contiguous().cpu().numpy()
        return self.image


@dataclass
class DecodeFailure:
    """A frame that cannot be scored: the entry and the :class:`WireError` reason."""

    entry: StreamEntry
    reason: str
    error: str


def parse_entry(
    entry: StreamEntry, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int | None = None
) -> FrameMsg:
    """Return the frame message of ``entry``; :class:`WireError` when it is missing, bad or oversized."""
    if entry.payload is None:
        raise WireError(f"camera {entry.camera}: entry {entry.entry_id} has no 'msg' field", "bad_message")
    return FrameMsg.from_bytes(entry.payload, max_pixels=max_pixels, max_bytes=max_bytes)


def decode_parsed(
    entry: StreamEntry,
    msg: FrameMsg,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_size: tuple[int, int] | None = None,
) -> DecodedFrame | DecodeFailure:
    """Decode a parsed frame on the CPU (a JPEG at reduced scale down to ``min_size``); never raises."""
    try:
        return DecodedFrame(entry, msg, decode_frame(msg, max_pixels, min_size))
    except WireError as e:
        return DecodeFailure(entry, e.reason, str(e))


ParsedFrame = tuple[StreamEntry, FrameMsg]


class Decoder:
    """Decodes batches of parsed frames with a thread pool (CPU) or the GPU's JPEG decoder (CUDA)."""

    def __init__(self, device: torch.device, max_pixels: int = DEFAULT_MAX_PIXELS, threads: int = 2) -> None:
        self.device = device
        self.max_pixels = max_pixels
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="decode")
        self._gpu_jpeg = device.type == "cuda"

    def decode(
        self, frames: list[ParsedFrame], min_size: tuple[int, int] | None = None
    ) -> list[DecodedFrame | DecodeFailure]:
        """Decode ``frames`` (order kept).

        ``min_size`` is the model's input (height, width): on the CPU a larger JPEG is decoded at
        1/2, 1/4 or 1/8 scale as long as both sides stay at least that
        (:func:`dfm_stream.frame_codec.jpeg_reduction`); ``None`` decodes at full size.
        """
        if self._gpu_jpeg:
            try:
                return self._decode_gpu(frames)
            except Exception as e:  # the GPU decoder refused something: find the culprit on the CPU
                log.debug("GPU JPEG decode failed for a batch (%s); decoding it with OpenCV", e)
        if len(frames) <= 1:
            return [decode_parsed(e, m, self.max_pixels, min_size) for e, m in frames]
        return list(self._pool.map(lambda f: decode_parsed(f[0], f[1], self.max_pixels, min_size), frames))

    def _decode_gpu(self, frames: list[ParsedFrame]) -> list[DecodedFrame | DecodeFailure]:
        from torchvision.io import ImageReadMode, decode_jpeg

        out: list[DecodedFrame | DecodeFailure | None] = [None] * len(frames)
        jpegs: list[int] = []
        for i, (entry, msg) in enumerate(frames):
            if msg.enc != "jpeg" or msg.c != 3:
                out[i] = decode_parsed(entry, msg, self.max_pixels)
                continue
            try:
                w, h, _ = jpeg_size(msg.data)
                if (w, h) != (msg.w, msg.h):
                    raise WireError(
                        f"camera {msg.camera}: JPEG is {w}x{h}, message says {msg.w}x{msg.h}",
                        "shape_mismatch",
                    )
                jpegs.append(i)
            except WireError as e:
                out[i] = DecodeFailure(entry, e.reason, str(e))
        if jpegs:
            datas = [torch.frombuffer(bytearray(frames[i][1].data), dtype=torch.uint8) for i in jpegs]
            images = decode_jpeg(datas, mode=ImageReadMode.RGB, device=self.device)
            for i, image in zip(jpegs, images, strict=True):
                out[i] = DecodedFrame(frames[i][0], frames[i][1], image)
        return [o for o in out if o is not None]

    def close(self) -> None:
        """Stop the decoding threads."""
        self._pool.shutdown(wait=False)


@dataclass
class BatchScores:
    """Scores of one batch: ``scores`` (N,) float64 and, for ``fre``, ``maps`` (N, H', W') float32."""

    scores: np.ndarray
    maps: np.ndarray | None


class Engine:
    """Runs fitted DFM models on one device, with one precision and one backbone backend.

    ``batch_size`` is the largest batch the worker forms: ``compile`` builds its static shape for
    it and the runtimes are exported and warmed up with it. ``threads`` sizes the runtimes' thread
    pools (default: torch's, which ``dfm-stream work`` sets from :func:`dfm_stream.cpus.model_threads`).
    """

    def __init__(
        self,
        device: str = "auto",
        precision: str = "auto",
        backend: str = "auto",
        batch_size: int = 8,
        threads: int | None = None,
    ) -> None:
        self.device = resolve_device(device)
        self.autocast = resolve_precision(precision, self.device)
        self.precision = "fp32" if self.autocast is None else str(self.autocast).replace("torch.", "")
        self.precision = {"float16": "fp16", "bfloat16": "bf16"}.get(self.precision, self.precision)
        self.runner_precision = "fp32"
        """What the backend computes in: ``int8``, ``auto`` (int8 where validated) or ``fp32``."""
        if self.autocast is None and self.device.type == "cpu" and precision in ("int8", "auto"):
            self.runner_precision = precision
            self.precision = "int8" if precision == "int8" else "fp32"
        if self.runner_precision == "int8" and backend not in ("auto", "onnxruntime"):
            raise ConfigError(f"--precision int8 runs on --backend onnxruntime (or auto), not {backend}")
        if self.autocast is not None and self.device.type == "cpu":
            if backend in backends.CPU_ONLY_BACKENDS:
                raise ConfigError(
                    f"--precision {self.precision} on the CPU runs on a torch backend, not {backend}"
                )
            backend = "channels_last" if backend == "auto" else backend
        self.requested_backend = backend
        self.backend = backends.resolve_backend(
            "onnxruntime" if self.runner_precision == "int8" else backend, self.device
        )
        """The backend the runners use (for ``auto``: its first choice; a build failure falls back)."""
        self.batch_size = max(1, batch_size)
        self.threads = threads or torch.get_num_threads()
        """Intra-op threads of ONNX Runtime / OpenVINO (torch's own pool is the process's setting)."""

    def prepare(self, model: DFMModel, image_size: tuple[int, int] | None = None) -> DFMModel:
        """Move ``model`` to the device in eval mode; with ``image_size``, build its backbone runner now."""
        model = model.to(self.device).eval()
        if image_size is not None:
            self.runner(model.feature_extractor, image_size)
        return model

    def runner(self, extractor: torch.nn.Module, image_size: tuple[int, int]) -> backends.BackboneRunner:
        """Return the runner of ``extractor`` for ``image_size`` batches, building it the first time."""
        runners: _Runners = extractor.__dict__.setdefault(_RUNNERS, _Runners())
        height, width = int(image_size[0]), int(image_size[1])
        key = (self.requested_backend, self.precision, height, width)
        if key not in runners:
            example = torch.zeros((self.batch_size, 3, height, width), device=self.device)
            with self.autocast_scope():
                runners[key] = backends.build_backbone_runner(
                    extractor,
                    self.requested_backend,
                    example,
                    threads=self.threads,
                    inplace=True,
                    precision=self.runner_precision,
                )
            self.backend = runners[key].backend
            if self.autocast is None:
                self.precision = runners[key].precision
            log.info("backbone at %dx%d runs on %s (%s)", height, width, self.backend, self.precision)
        return runners[key]

    def autocast_scope(self) -> contextlib.AbstractContextManager[object]:
        """Return the autocast context of the backbone (a no-op in fp32)."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast)

    def to_tensor(self, images: list[np.ndarray | torch.Tensor], image_size: tuple[int, int]) -> torch.Tensor:
        """Turn RGB images (any sizes) into one normalised ``(N, 3, H, W)`` batch on the device.

        One image at a time (no stacked copy of the frames at their own size): memory beyond the
        frames and the result is one float32 channel of one frame (:func:`preprocess_tensor`).
        """
        parts: list[torch.Tensor] = []
        for img in images:
            tensor = (
                img
                if isinstance(img, torch.Tensor)
                else torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)
            )
            parts.append(preprocess_tensor(tensor[None].to(self.device, non_blocking=True), image_size))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def score(self, model: DFMModel, batch: torch.Tensor, want_maps: bool = True) -> BatchScores:
        """Score a normalised batch: the backbone runner (autocast if set), then fp32 pooling and PCA."""
        return self.score_features(model, self.features(model, batch), want_maps)

    def features(self, model: DFMModel, batch: torch.Tensor) -> torch.Tensor:
        """Return the backbone's fp32 features of a normalised batch (shared by models with one backbone)."""
        with torch.inference_mode():
            x = batch.to(self.device)
            runner = self.runner(model.feature_extractor, (int(x.shape[-2]), int(x.shape[-1])))
            with self.autocast_scope():
                features = runner(x)
            return features.float().to(self.device)

    def score_features(self, model: DFMModel, features: torch.Tensor, want_maps: bool = True) -> BatchScores:
        """Score backbone features (:meth:`features`): fp32 pooling, then the PCA / Gaussian step."""
        with torch.inference_mode():
            if model.pooling_kernel_size > 1:
                features = F.avg_pool2d(features, kernel_size=model.pooling_kernel_size)
            shapes = features.shape
            result = model.score(features.reshape(shapes[0], -1), shapes)
            scores = result.pred_score.double().cpu().numpy()
            maps = None
            if want_maps and result.anomaly_map is not None:
                maps = result.anomaly_map[:, 0].float().cpu().numpy()
        return BatchScores(scores, maps)

    def gpu_memory_bytes(self) -> int:
        """Return the GPU memory allocated by this process (0 on the CPU)."""
        if self.device.type != "cuda":
            return 0
        return int(torch.cuda.memory_allocated(self.device))
