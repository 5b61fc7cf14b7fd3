"""Opening a bundle directory: manifest, file integrity, backends per graph."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from edgemm.runtime.errors import BundleError
from edgemm.runtime.manifest import Manifest, read_manifest


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class Bundle:
    """A bundle directory whose manifest has been read and whose files have been checked.

    Args:
        path: The bundle directory.
        check_hashes: Recompute every file's sha256 against the manifest (a few
            hundred ms for the default bundle); turn off only for trusted, read-only media.

    Raises:
        BundleError: The directory or a file is missing, a file was altered, or
            the schema is newer than this runtime.
    """

    def __init__(self, path: str | Path, *, check_hashes: bool = True):
        self.path = Path(path)
        if not self.path.exists():
            raise BundleError(
                f"bundle path '{self.path}' does not exist. Create one with 'edgemm export default -o {self.path}'."
            )
        if not self.path.is_dir():
            raise BundleError(f"bundle path '{self.path}' is not a directory; a bundle is a directory with a manifest.json.")
        self.manifest: Manifest = read_manifest(self.path)
        for rel, digest in self.manifest.files.items():
            file = self.path / rel
            if not file.is_file():
                raise BundleError(f"bundle '{self.path}' is incomplete: '{rel}' is missing. Re-export or re-copy the bundle.")
            if check_hashes and sha256_file(file) != digest:
                raise BundleError(
                    f"bundle '{self.path}': '{rel}' does not match the hash in its manifest (altered or corrupted). "
                    "Re-export or re-copy the bundle."
                )

    def file(self, rel: str) -> Path:
        """Absolute path of a file the manifest lists."""
        if rel not in self.manifest.files:
            raise BundleError(f"bundle '{self.path}': '{rel}' is not listed in its manifest.")
        return self.path / rel

    def graph_path(self, role: str) -> Path:
        """The ONNX file of a graph role, e.g. ``"image_encoder"``."""
        if role not in self.manifest.graphs:
            have = ", ".join(sorted(self.manifest.graphs)) or "none"
            raise BundleError(f"bundle '{self.path}' has no '{role}' graph (it has: {have}).")
        return self.file(self.manifest.graphs[role].file)

    def read_json(self, rel: str):
        return json.loads(self.file(rel).read_text(encoding="utf-8"))

    def read_array(self, rel: str) -> np.ndarray:
        return np.load(self.file(rel), allow_pickle=False)
