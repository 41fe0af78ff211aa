"""``dfm-stream bench``: backbone, DFM, pipeline, transport and latency (backends, fit) in one run."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from dfm_stream.config import WORKER_BACKENDS, WORKER_PRECISIONS
from dfm_stream.connect import DURABILITY_LEVELS

log = logging.getLogger(__name__)


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in _csv(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from e


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bench`` to ``subparsers``."""
    p = subparsers.add_parser(
        "bench",
        help="measure throughput and latency of the model, the pipeline and the transport",
        description="Measure, in one run and with the same backbone and batch size: the bare backbone "
        "(the ceiling), DFM scoring, the full Redis -> worker -> scores pipeline, the transport with no "
        "model, and end-to-end latency at 50% and 80% of capacity; optionally every backbone backend "
        "(--stages backends) and fitting (--stages fit). Prints a table and writes JSON.",
    )
    p.add_argument("--device", default=None, choices=("auto", "cpu", "cuda"), help="default: auto")
    p.add_argument("--backbone", default=None, help="default: resnet50 (quick: resnet18)")
    p.add_argument("--layer", default=None, help="default: layer3 (quick: layer2)")
    p.add_argument("--image-size", type=int, default=None, help="square side in px (default: 256)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 8")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default: 3)")
    p.add_argument("--duration", type=float, default=None, help="seconds per timed stage (default: 20)")
    p.add_argument(
        "--stages",
        type=_csv,
        default=None,
        help="comma list from backbone,dfm,backends,pipeline,transport,latency,isolation,swap,consoles,fit "
        "(default: backbone,dfm,pipeline,transport,latency)",
    )
    p.add_argument(
        "--backends",
        type=_csv,
        default=None,
        help="backends for --stages backends (default: eager,channels_last,fused,mkldnn,compile,"
        "onnxruntime,openvino; those not installed are reported and skipped)",
    )
    p.add_argument(
        "--backend",
        default=None,
        choices=WORKER_BACKENDS,
        help="backend of the worker and the backbone stage (default: auto)",
    )
    p.add_argument(
        "--precision",
        default=None,
        choices=WORKER_PRECISIONS,
        help="backbone precision of the worker and the backbone/DFM stages (default: auto)",
    )
    p.add_argument("--max-wait-ms", type=float, default=None, help="worker batching wait (default: 20)")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: 1)")
    p.add_argument("--cameras", type=int, default=None, help="camera streams (default: 2)")
    p.add_argument("--loads", type=_floats, default=None, help="latency loads (default: 0.5,0.8)")
    p.add_argument("--transport-frames", type=int, default=None, help="frames of the transport stage")
    p.add_argument("--fit-images", type=int, default=None, help="training images of the fit stage (1000)")
    p.add_argument(
        "--redis",
        default=None,
        help="use this Redis URL, redis+sentinel:// included (default: an embedded server)",
    )
    p.add_argument("--cluster", action="store_true", default=None, help="--redis is a seed node of a cluster")
    p.add_argument(
        "--durability",
        default=None,
        choices=DURABILITY_LEVELS,
        help="the workers' and the paced sender's durability (default: local; replicated needs a replica)",
    )
    p.add_argument("--swaps", type=int, default=None, help="model switches per repeat of --stages swap (24)")
    p.add_argument("--workdir", type=Path, default=None, help="keep artifacts and worker logs here")
    p.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    p.add_argument("--markdown", type=Path, default=None, help="also write the tables as markdown")
    p.add_argument("--quick", action="store_true", help="tiny settings: proves the harness, not the speed")
    p.set_defaults(func=cmd_bench)


_FIELDS = {
    "device": "device",
    "backbone": "backbone",
    "layer": "layer",
    "image_size": "image_size",
    "batch_size": "batch_size",
    "repeats": "repeats",
    "duration": "duration",
    "stages": "stages",
    "backends": "backends",
    "backend": "backend",
    "precision": "precision",
    "max_wait_ms": "max_wait_ms",
    "workers": "workers",
    "cameras": "cameras",
    "loads": "loads",
    "transport_frames": "transport_frames",
    "fit_images": "fit_images",
    "swaps": "swaps",
    "redis": "redis_url",
    "cluster": "cluster",
    "durability": "durability",
}


def settings_from_args(args: argparse.Namespace) -> Any:
    """Build :class:`~dfm_stream.bench.harness.BenchSettings`: defaults, ``--quick``, explicit options."""
    from dfm_stream.bench.harness import BenchSettings

    values: dict[str, Any] = BenchSettings.quick_defaults() if args.quick else {}
    for arg, name in _FIELDS.items():
        value = getattr(args, arg)
        if value is not None:
            values[name] = value
    if args.quick and args.image_size is not None and "fit_image_size" in values:
        values["fit_image_size"] = args.image_size
    if args.workdir is not None:
        values["workdir"] = str(args.workdir)
    return BenchSettings(**values)


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the benchmark, print the tables, write JSON (and markdown) if asked."""
    from rich.console import Console

    from dfm_stream.bench.harness import run_bench
    from dfm_stream.bench.report import print_report, to_markdown
    from dfm_stream.bench.result import write_json

    console = Console(stderr=True)
    settings = settings_from_args(args)
    settings.check()
    document = run_bench(settings, progress=lambda text: console.print(f"[dim]{text}[/dim]"))
    print_report(document, Console())
    if args.out is not None:
        write_json(document, args.out)
        console.print(f"wrote {args.out}")
    if args.markdown is not None:
        args.markdown.write_text(to_markdown(document))
        console.print(f"wrote {args.markdown}")
    return 0
