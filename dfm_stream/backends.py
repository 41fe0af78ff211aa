"""Backbone execution backends: eager torch in four flavours, torch.compile, ONNX Runtime, OpenVINO.

Eager flavours: ``eager`` (the reference), ``channels_last``, ``fused`` (channels_last with batch
norm folded into the convolutions) and ``mkldnn`` (folded, on oneDNN tensors; CPU only).

A backend turns the model's feature extractor (a :class:`torch.nn.Module` mapping a normalised
``(N, 3, H, W)`` batch to the feature map of the chosen layer) into a :class:`BackboneRunner`: a
callable with the same contract, fp32 in and fp32 out, on the model's device. Pooling and PCA
scoring stay in PyTorch; only the backbone changes hands.

Every backend computes in fp32 (OpenVINO's default lowers the precision on some CPUs, so it is
pinned to ``f32``) and must keep DFM scores within :data:`SCORE_RTOL` relative of fp32 eager:
:func:`max_relative_difference` is how ``dfm-stream bench --stages backends`` checks it.

Precision (``precision`` of :func:`build_backbone_runner`): ``fp32`` everywhere; ``int8`` on
``onnxruntime`` only: the statically quantized model of :mod:`dfm_stream.quantize` (from its cache,
or built from ``calibration`` batches); ``auto`` is int8 where the cache holds an int8 build of
this backbone that :mod:`dfm_stream.precision_check` validated against fp32, fp32 otherwise.
bf16 is not a backend matter: :class:`dfm_stream.inference.Engine` runs a torch backend under
CPU autocast. The runner says which precision it computes in (:attr:`BackboneRunner.precision`).

ONNX Runtime is a dependency of dfm-stream; OpenVINO is optional (``pip install
dfm-stream[openvino]``). :func:`available_backends` lists what this install can run; asking for
one that is missing is a :class:`~dfm_stream.errors.BackendError` naming the package to install.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import logging
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from dfm_stream.errors import BackendError

log = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = (
    "eager",
    "channels_last",
    "fused",
    "mkldnn",
    "compile",
    "onnxruntime",
    "openvino",
)
"""Every backend name, in the order the benchmark measures them."""

CPU_ONLY_BACKENDS = frozenset({"mkldnn", "onnxruntime", "openvino"})
"""Backends that run on the CPU only (their GPU builds are separate packages)."""

SCORE_RTOL = 1e-3
"""The largest relative difference of a DFM score to fp32 eager that a backend may show."""

AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cpu": ("onnxruntime", "openvino", "fused", "channels_last"),
    "cuda": ("channels_last",),
}
"""What ``auto`` means, per device type: the first of these that is installed and builds.

Measured with ``dfm-stream bench --stages backends`` (resnet50/layer3, 256 px, batch 8, fp32,
quiet 2-core AMD EPYC, 3 repeats), relative to channels_last eager: ONNX Runtime 1.59x, OpenVINO
1.54x, torch.compile 1.28x (but about 30 s of compiling per model load), ``fused`` 1.14x,
``mkldnn`` 1.12x, contiguous ``eager`` 0.70x; every backend within 2e-6 relative of fp32 eager
scores (docs/bench/cpu-2core-resnet50-layer3.json). ONNX Runtime is installed with dfm-stream;
where it is missing (or cannot export a backbone) ``auto`` falls back to OpenVINO, then
``fused``. On CUDA, channels_last with autocast is the path (the runtimes here are CPU builds).
"""

_MODULES = {"onnxruntime": ("onnxruntime",), "openvino": ("openvino",)}
_EXTRAS = {"onnxruntime": "onnx", "openvino": "openvino"}


@dataclass
class BackboneRunner:
    """A backbone behind one backend: ``runner(batch) -> feature map``, both fp32 on ``device``."""

    backend: str
    device: torch.device
    fn: Callable[[torch.Tensor], torch.Tensor]
    precision: str = "fp32"
    """``fp32`` or ``int8`` (the arithmetic of the backbone; outputs are fp32 either way)."""

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """Return the feature map of a normalised ``(N, 3, H, W)`` batch."""
        return self.fn(batch)


def is_available(backend: str, device: torch.device | str = "cpu") -> bool:
    """Return True when ``backend`` can run on ``device`` with the packages installed here."""
    device = torch.device(device)
    if backend not in BACKENDS:
        return False
    if backend in CPU_ONLY_BACKENDS and device.type != "cpu":
        return False
    return all(importlib.util.find_spec(m) is not None for m in _MODULES.get(backend, ()))


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Return the backends of :data:`BACKENDS` that can run on ``device`` here."""
    return [b for b in BACKENDS if is_available(b, device)]


def auto_candidates(device: torch.device | str = "cpu") -> list[str]:
    """Return, in order of preference, the backends ``auto`` may pick on ``device`` here."""
    kind = torch.device(device).type
    return [b for b in AUTO_ORDER.get(kind, ("channels_last",)) if is_available(b, device)] or ["eager"]


def resolve_backend(name: str, device: torch.device | str = "cpu") -> str:
    """Return the backend meant by ``name`` (``auto``: the first of :func:`auto_candidates`).

    A named backend must be installed and able to run on ``device``: otherwise a
    :class:`BackendError` says what to install or choose instead.
    """
    backend = auto_candidates(device)[0] if name == "auto" else name
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}: choose auto or one of {', '.join(BACKENDS)}")
    if not is_available(backend, device):
        device = torch.device(device)
        if backend in CPU_ONLY_BACKENDS and device.type != "cpu":
            raise BackendError(f"backend {backend} runs on the CPU only; on {device} use channels_last")
        raise BackendError(
            f"backend {backend} is not installed: pip install 'dfm-stream[{_EXTRAS[backend]}]'"
            " (or choose --backend fused)"
        )
    return backend


RUNNER_PRECISIONS = ("fp32", "int8", "auto")
"""What :func:`build_backbone_runner` computes in (``auto``: int8 where validated, else fp32)."""


def build_backbone_runner(
    extractor: nn.Module,
    backend: str,
    example_batch: torch.Tensor,
    threads: int | None = None,
    inplace: bool = False,
    precision: str = "fp32",
    calibration: Iterable[torch.Tensor] | None = None,
) -> BackboneRunner:
    """Wrap ``extractor`` in a runner of ``backend`` (``auto`` allowed).

    ``example_batch`` is a normalised batch of the image size the runner will see; it is used to
    trace or export the model and for one warm-up call. Later calls may use any batch size
    (``compile`` pads a smaller batch to the example's size and splits a larger one, so it
    compiles one static shape). ``threads`` sets the intra-op threads of ONNX Runtime and OpenVINO
    (default: ``torch.get_num_threads()``). ``extractor`` is left unchanged, except with
    ``inplace`` for ``channels_last``/``compile``: then its own weights are converted to
    channels_last instead of a copy (what a worker wants; saving an artifact still works, as
    :mod:`dfm_stream.artifact` writes contiguous copies).

    ``precision`` is one of :data:`RUNNER_PRECISIONS`. ``int8`` needs the ``onnxruntime`` backend
    (``auto`` means it then) and either a cached int8 build of this backbone at this input size or
    ``calibration`` (normalised batches) to build one; without both it is a :class:`BackendError`
    naming the command that builds it.
    """
    device = next(extractor.parameters()).device
    if precision not in RUNNER_PRECISIONS:
        raise BackendError(f"unknown backbone precision {precision!r}: choose {', '.join(RUNNER_PRECISIONS)}")
    if precision == "int8":
        if backend not in ("auto", "onnxruntime"):
            raise BackendError(f"--precision int8 runs on the onnxruntime backend, not {backend}")
        backend = "onnxruntime"
    if backend == "auto":
        return _build_auto(extractor, example_batch, threads, inplace, precision)
    backend = resolve_backend(backend, device)
    threads = threads or torch.get_num_threads()
    builders: dict[str, Callable[[], Callable[[torch.Tensor], torch.Tensor]]] = {
        "eager": lambda: _eager(extractor, channels_last=False),
        "channels_last": lambda: _eager(extractor, channels_last=True, inplace=inplace),
        "fused": lambda: _fused(extractor),
        "mkldnn": lambda: _mkldnn(extractor),
        "compile": lambda: _compiled(extractor, max(1, int(example_batch.shape[0])), inplace),
        "onnxruntime": lambda: _onnxruntime(extractor, example_batch, threads, precision, calibration),
        "openvino": lambda: _openvino(extractor, example_batch, threads),
    }
    try:
        fn = builders[backend]()
        used = getattr(fn, "precision", "fp32")
        runner = BackboneRunner(backend, device, fn, used)
        runner(example_batch.to(device))  # warm-up: compile, allocate, choose kernels
    except BackendError:
        raise
    except Exception as e:
        raise BackendError(f"backend {backend} cannot run this backbone on {device}: {e}") from e
    return runner


def _build_auto(
    extractor: nn.Module, example_batch: torch.Tensor, threads: int | None, inplace: bool, precision: str
) -> BackboneRunner:
    candidates = auto_candidates(next(extractor.parameters()).device)
    for i, name in enumerate(candidates):
        try:
            return build_backbone_runner(
                extractor,
                name,
                example_batch,
                threads,
                inplace,
                precision if name == "onnxruntime" else "fp32",
            )
        except BackendError as e:
            if i == len(candidates) - 1:
                raise
            log.warning("backend %s failed (%s); trying %s", name, e, candidates[i + 1])
    raise BackendError("no backbone backend can run here")  # unreachable: candidates is never empty


def _channels_last(extractor: nn.Module, inplace: bool) -> nn.Module:
    module = extractor if inplace else copy.deepcopy(extractor)
    return module.eval().to(memory_format=torch.channels_last)


def _eager(
    extractor: nn.Module, channels_last: bool, inplace: bool = False
) -> Callable[[torch.Tensor], torch.Tensor]:
    if not channels_last:
        module = extractor.eval()
        fmt = torch.contiguous_format
    else:
        module = _channels_last(extractor, inplace)
        fmt = torch.channels_last

    def run(batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return module(batch.contiguous(memory_format=fmt)).float()

    return run


def _fused(extractor: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    # Batch norm in eval mode is an affine map per channel: folded into the convolution before it
    # (torch.fx checks the graph: only a conv whose sole user is the bn is folded), it costs nothing.
    from torch.fx.experimental.optimization import fuse

    module = fuse(copy.deepcopy(extractor).eval()).to(memory_format=torch.channels_last)

    def run(batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return module(batch.contiguous(memory_format=torch.channels_last)).float()

    return run


def _mkldnn(extractor: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    # Batch norm folded, then convolutions on oneDNN tensors with pre-packed weights (CPU only).
    from torch.fx.experimental.optimization import optimize_for_inference

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning))  # it uses torch.jit inside
        module = optimize_for_inference(copy.deepcopy(extractor).eval().cpu())

    def run(batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return module(batch.contiguous()).float()

    return run


def _compiled(
    extractor: nn.Module, batch_size: int, inplace: bool = False
) -> Callable[[torch.Tensor], torch.Tensor]:
    # One static shape: a partial batch is padded and a larger one split, so the graph is compiled
    # once (each new shape would cost another compile, tens of seconds on a small CPU).
    compiled = torch.compile(_channels_last(extractor, inplace), dynamic=False)

    def run_chunk(chunk: torch.Tensor) -> torch.Tensor:
        n = chunk.shape[0]
        if n < batch_size:
            pad = chunk.new_zeros((batch_size - n, *chunk.shape[1:]))
            chunk = torch.cat([chunk, pad])
        return compiled(chunk.contiguous(memory_format=torch.channels_last))[:n].float()

    def run(batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            parts = [run_chunk(c) for c in torch.split(batch, batch_size)]
            return parts[0] if len(parts) == 1 else torch.cat(parts)

    return run


def export_onnx(extractor: nn.Module, example_batch: torch.Tensor) -> bytes:
    """Export ``extractor`` to ONNX (fp32, batch size dynamic) and return the model bytes."""
    module = copy.deepcopy(extractor).eval().cpu()
    example = example_batch.detach().cpu().float().contiguous().clone()
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter needs no extra package (the dynamo one needs onnxscript); it
        # warns that it is deprecated, which is not something a user of the bench can act on.
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, UserWarning))
        torch.onnx.export(
            module,
            (example,),
            buffer,  # type: ignore[arg-type]  # stubs say a path; the TorchScript exporter takes files too
            input_names=["images"],
            output_names=["features"],
            dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    return buffer.getvalue()


class _OrtRun:
    """An ONNX Runtime session as a runner function; ``precision`` says what the model computes in."""

    def __init__(self, model: bytes, threads: int, precision: str) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.precision = precision

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        array = batch.detach().cpu().float().contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {"images": array})[0])


def _onnxruntime(
    extractor: nn.Module,
    example_batch: torch.Tensor,
    threads: int,
    precision: str = "fp32",
    calibration: Iterable[torch.Tensor] | None = None,
) -> _OrtRun:
    from dfm_stream import quantize

    fp32 = export_onnx(extractor, example_batch[:1])  # the batch axis is dynamic: one key per input size
    if precision == "fp32":
        return _OrtRun(fp32, threads, "fp32")
    key = quantize.backbone_key(fp32)
    found = quantize.cached(key)
    if precision == "auto":
        if found is not None and found[1].validated:
            return _OrtRun(found[0], threads, "int8")
        return _OrtRun(fp32, threads, "fp32")
    if found is not None:
        return _OrtRun(found[0], threads, "int8")
    if calibration is None:
        size = tuple(example_batch.shape[-2:])
        raise BackendError(
            f"no int8 build of this backbone at {size[0]}x{size[1]} in {quantize.cache_dir()}: "
            "build and validate it with `dfm-stream quantize MODEL DATA` on this machine (or point "
            f"{quantize.CACHE_ENV} at a cache that has it), or use --precision fp32"
        )
    size = (int(example_batch.shape[-2]), int(example_batch.shape[-1]))
    batches = (b.detach().cpu().float().numpy() for b in calibration)
    return _OrtRun(quantize.build_int8(fp32, batches, size), threads, "int8")


def _openvino(
    extractor: nn.Module, example_batch: torch.Tensor, threads: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    import openvino as ov

    module = copy.deepcopy(extractor).eval().cpu()
    example = example_batch.detach().cpu().float().contiguous().clone()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, UserWarning))
        model = ov.convert_model(
            module, example_input=example, input=[ov.PartialShape([-1, *example.shape[1:]])]
        )
    config = {
        "INFERENCE_PRECISION_HINT": "f32",  # its CPU default may be bf16/f16: scores would drift
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": int(threads),
    }
    compiled = ov.Core().compile_model(model, "CPU", config)
    request = compiled.create_infer_request()
    output = compiled.output(0)

    def run(batch: torch.Tensor) -> torch.Tensor:
        array = batch.detach().cpu().float().contiguous().numpy()
        return torch.from_numpy(request.infer({0: array})[output].copy())

    return run


def max_relative_difference(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Return ``max |other - reference| / max(|reference|, tiny)`` over matching elements."""
    reference = reference.detach().double().cpu().reshape(-1)
    other = other.detach().double().cpu().reshape(-1)
    if reference.shape != other.shape:
        raise BackendError(f"backend output has {other.numel()} values, fp32 eager {reference.numel()}")
    scale = reference.abs().clamp_min(torch.finfo(torch.float64).tiny)
    return float(((other - reference).abs() / scale).max().item()) if reference.numel() else 0.0
