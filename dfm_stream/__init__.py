"""dfm-stream: streaming visual inspection with DFM (Deep Feature Modeling) over Redis Streams.

The model API mirrors the reference implementation (anomalib's ``DFMModel``,
``SingleClassGaussian`` and ``Dfm``); it is imported lazily so that light tools (the CLI's
``--help``, message codecs) do not pay for importing torch.
"""

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["DFMModel", "Dfm", "SingleClassGaussian", "__version__"]

if TYPE_CHECKING:
    from dfm_stream.model import Dfm, DFMModel, SingleClassGaussian


def __getattr__(name: str) -> Any:
    if name in ("DFMModel", "SingleClassGaussian", "Dfm"):
        from dfm_stream import model

        return getattr(model, name)
    raise AttributeError(f"module 'dfm_stream' has no attribute {name!r}")
