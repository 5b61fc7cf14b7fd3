"""The one exception tree edgemm raises.

    EdgemmError
    ├── InputError (also ValueError)       bad input from the caller: arrays, files, labels, k
    ├── BundleError                        a bundle that is missing, altered or too new
    ├── BackendError                       a runtime that is unavailable or failed
    ├── MissingDependencyError (also ImportError)   an optional extra is not installed
    └── ExportError                        building or exporting a model failed
        └── VerificationError              an exported graph drifted from its reference

Every message says what was wrong and what to do about it.
"""

from __future__ import annotations


class EdgemmError(Exception):
    """Base of every error edgemm raises on purpose."""


class InputError(EdgemmError, ValueError):
    """The caller passed something edgemm cannot use."""


class BundleError(EdgemmError):
    """A bundle directory is missing, incomplete, altered or of an unknown schema."""


class BackendError(EdgemmError):
    """An inference backend is unavailable or failed."""


class MissingDependencyError(EdgemmError, ImportError):
    """An optional package is needed; the message names the extra to install."""


class ExportError(EdgemmError):
    """Building, exporting or writing a model failed."""


class VerificationError(ExportError):
    """An exported graph's outputs differ from its PyTorch reference beyond tolerance."""


def require(module: str, extra: str, purpose: str):
    """Import an optional module or raise one clear error naming the extra.

    Args:
        module: Importable module name, e.g. ``"onnxruntime"``.
        extra: The edgemm extra that provides it, e.g. ``"onnx"``.
        purpose: What it is needed for, in a few words.

    Returns:
        The imported module.

    Raises:
        MissingDependencyError: If the module cannot be imported.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(
            f"{purpose} needs the '{module}' package, which is not installed. "
            f"Install it with: pip install 'edgemm[{extra}]'"
        ) from e
