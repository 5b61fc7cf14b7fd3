"""edgemm: multimodal models at the edge.

    >>> import edgemm
    >>> model = edgemm.load()                       # the default model, built on first use
    >>> model.classify(frame, labels=["person", "dog", "forklift"])
    >>> index = edgemm.VectorIndex(dim=model.dim)
    >>> edgemm.load(default="captioner").caption(frame).text
"""

from __future__ import annotations

from edgemm._av import AudioVisual, AVFit, AVResult, AVStream, fit_av_fusion, save_av_fusion
from edgemm._caption import Caption, Captioner
from edgemm._fusion import FusionModel
from edgemm._index import Hit, HnswOptions, VectorIndex
from edgemm._model import DualEncoder, Prediction, default_bundle_dir, load
from edgemm._qdrant import QdrantIndex
from edgemm._stream import Stream, StreamResult
from edgemm.runtime.engines import EngineOptions
from edgemm.runtime.limits import LIMITS as limits
from edgemm.runtime.errors import (
    BackendError,
    BundleError,
    EdgemmError,
    ExportError,
    InputError,
    MissingDependencyError,
    VerificationError,
)

__version__ = "0.1.0"

__all__ = [
    "AVFit",
    "AVResult",
    "AVStream",
    "AudioVisual",
    "BackendError",
    "BundleError",
    "Caption",
    "Captioner",
    "DualEncoder",
    "EdgemmError",
    "EngineOptions",
    "ExportError",
    "FusionModel",
    "Hit",
    "HnswOptions",
    "InputError",
    "MissingDependencyError",
    "Prediction",
    "QdrantIndex",
    "Stream",
    "StreamResult",
    "VectorIndex",
    "VerificationError",
    "__version__",
    "default_bundle_dir",
    "fit_av_fusion",
    "limits",
    "load",
    "save_av_fusion",
]
