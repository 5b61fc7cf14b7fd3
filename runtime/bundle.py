"""Opening a bundle directory: manifest, file integrity, backends per graph."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from edgemm.runtime.errors import BundleError
from edgemm.runtime.limits import LIMITS
from edgemm.runtime.manifest import Manifest, read_json_file, read_manifest


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class Bundle:
    """A bundle directory whose manifest has been read and whose files have been checked.

    A bundle is untrusted: every file its manifest lists must be a regular file
    inside the bundle directory (symlinks are followed, and must not lead out),
    and must match its sha256.

    Args:
        path: The bundle directory.
        check_hashes: Recompute every file's sha256 against the manifest (a few
            hundred ms for the default bundle); turn off only for trusted, read-only media.
        graphs: Whether the graphs are here. False for a bundle whose graphs run elsewhere (the
            Python models of a Triton repository, whose graphs are Triton's own models): graph files
            are neither required nor read, and :meth:`graph_path` names where they would be.

    Raises:
        BundleError: The directory or a file is missing, a file lies outside the
            bundle or was altered, or the schema is newer than this runtime.
    """

    def __init__(self, path: str | Path, *, check_hashes: bool = True, graphs: bool = True):
        self.path = Path(path)
        if not self.path.exists():
            raise BundleError(
                f"bundle path '{self.path}' does not exist. Create one with 'edgemm export default -o {self.path}'."
            )
        if not self.path.is_dir():
            raise BundleError(f"bundle path '{self.path}' is not a directory; a bundle is a directory with a manifest.json.")
        self._root = self.path.resolve()
        self.engines: dict[str, Path] = {}  # graph role → its TensorRT plan, once checked or built for this device
        self.engine_options: Any = None  # the EngineOptions TensorRT builds with (native, or ONNX Runtime's provider)
        self.manifest: Manifest = read_manifest(self.path)
        fields = {rel: name for name, rel in self.manifest.named_files()}
        self.graphs_elsewhere = {g.file for g in self.manifest.graphs.values()} if not graphs else set()
        self._files = {rel: self._inside(rel, fields.get(rel, "files")) for rel in self.manifest.files
                       if rel not in self.graphs_elsewhere}
        for rel, digest in self.manifest.files.items():
            if rel in self.graphs_elsewhere:
                continue
            if check_hashes and sha256_file(self._files[rel]) != digest:
                raise BundleError(
                    f"bundle '{self.path}': '{rel}' does not match the hash in its manifest (altered or corrupted). "
                    "Re-export or re-copy the bundle."
                )

    def _inside(self, rel: str, field: str) -> Path:
        """The real path of a listed file, refused unless it is a regular file inside the bundle."""
        try:
            real = (self._root / rel).resolve(strict=True)
        except FileNotFoundError:
            raise BundleError(f"bundle '{self.path}' is incomplete: '{rel}' is missing ({field}). "
                              "Re-export or re-copy the bundle.") from None
        except (OSError, RuntimeError) as e:  # a symlink loop, a path too long
            raise BundleError(f"bundle '{self.path}': '{rel}' ({field}) cannot be resolved ({e}).") from None
        if not real.is_relative_to(self._root):
            raise BundleError(f"bundle '{self.path}': '{rel}' ({field}) resolves to '{real}', outside the bundle; "
                              "a bundle may only read its own files. Re-copy the bundle without links leading out.")
        if not real.is_file():
            raise BundleError(f"bundle '{self.path}': '{rel}' ({field}) is not a regular file.")
        return real

    def file(self, rel: str) -> Path:
        """Resolved path of a file the manifest lists (inside the bundle, checked at open)."""
        if rel not in self._files:
            raise BundleError(f"bundle '{self.path}': '{rel}' is not listed in its manifest.")
        return self._files[rel]

    def graph_path(self, role: str) -> Path:
        """The ONNX file of a graph role, e.g. ``"image_encoder"``."""
        if role not in self.manifest.graphs:
            have = ", ".join(sorted(self.manifest.graphs)) or "none"
            raise BundleError(f"bundle '{self.path}' has no '{role}' graph (it has: {have}).")
        rel = self.manifest.graphs[role].file
        return self._root / rel if rel in self.graphs_elsewhere else self.file(rel)

    def read_json(self, rel: str) -> Any:
        """A JSON file of the bundle (labels, scene names), at most ``edgemm.limits.max_json_bytes``."""
        return read_json_file(self.file(rel), LIMITS.max_json_bytes, "max_json_bytes")

    def read_labels(self, rel: str, field: str) -> tuple[str, ...]:
        """A JSON list of unique, non-blank label strings.

        Raises:
            BundleError: The file is not such a list (naming ``field``).
        """
        labels = self.read_json(rel)
        if (not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x.strip() for x in labels)
                or len(set(labels)) != len(labels)):
            raise BundleError(f"bundle '{self.path}': {field} '{rel}' must be a JSON list of unique, non-blank strings.")
        try:
            "".join(labels).encode("utf-8")
        except UnicodeEncodeError:
            raise BundleError(f"bundle '{self.path}': {field} '{rel}' holds a lone surrogate escape.") from None
        return tuple(labels)

    def read_array(self, rel: str, *, ndim: int = 2) -> np.ndarray:
        """A finite float ``.npy`` array of the bundle, its declared shape checked against the file's size first.

        Raises:
            BundleError: Not a plain ``.npy`` of floats with ``ndim`` dimensions, or non-finite values.
        """
        path = self.file(rel)
        try:  # a memory map checks the header's shape against the file size before anything is allocated
            mapped = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise BundleError(f"bundle '{self.path}': '{rel}' is not a readable .npy array ({e}).") from None
        if not isinstance(mapped, np.ndarray) or mapped.dtype.kind != "f" or mapped.ndim != ndim or 0 in mapped.shape:
            raise BundleError(f"bundle '{self.path}': '{rel}' must be a non-empty {ndim}-D float array, "
                              f"got {getattr(mapped, 'dtype', '?')} {getattr(mapped, 'shape', '?')}.")
        array = np.array(mapped, dtype=np.float32)
        if not np.isfinite(array).all():
            raise BundleError(f"bundle '{self.path}': '{rel}' contains NaN or infinite values.")
        return array
