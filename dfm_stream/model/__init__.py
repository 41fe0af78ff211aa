"""The DFM model in pure PyTorch: backbone features, PCA, Gaussian, and the one-pass trainer."""

from dfm_stream.model.backbone import SUPPORTED_BACKBONES, SUPPORTED_LAYERS, weights_fingerprint
from dfm_stream.model.dfm import DFMModel, DFMResult, ScoreType
from dfm_stream.model.gaussian import SingleClassGaussian
from dfm_stream.model.pca import PCA
from dfm_stream.model.trainer import Dfm, LearningType

__all__ = [
    "PCA",
    "SUPPORTED_BACKBONES",
    "SUPPORTED_LAYERS",
    "DFMModel",
    "DFMResult",
    "Dfm",
    "LearningType",
    "ScoreType",
    "SingleClassGaussian",
    "weights_fingerprint",
]
