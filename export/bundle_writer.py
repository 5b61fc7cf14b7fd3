"""Writing a bundle atomically: build in a temporary sibling directory, then rename."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from edgemm.runtime.bundle import sha256_file
from edgemm.runtime.errors import ExportError
from edgemm.runtime.manifest import MANIFEST_NAME, SCHEMA_VERSION, Manifest

TOOL_PACKAGES = ("edgemm", "torch", "onnx", "onnxruntime", "transformers", "tokenizers", "numpy")


def tool_versions() -> dict[str, str]:
    versions = {}
    for name in TOOL_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


class BundleWriter:
    """Context manager that yields a staging directory and publishes it on ``commit``.

    Nothing appears at ``out_dir`` until ``commit`` succeeds; an exception (or a
    killed process) leaves at most a hidden ``.<name>.tmp-*`` directory, never a
    half-written bundle.

    Args:
        out_dir: Final bundle directory.
        overwrite: Replace an existing bundle there.

    Raises:
        ExportError: ``out_dir`` exists and ``overwrite`` is false, or is not a directory.
    """

    def __init__(self, out_dir: str | Path, *, overwrite: bool = False):
        self.out_dir = Path(out_dir).absolute()
        if self.out_dir.exists() and not overwrite:
            raise ExportError(f"'{self.out_dir}' already exists; choose another path or pass overwrite=True (--force).")
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise ExportError(f"'{self.out_dir}' exists and is not a directory.")
        self.staging = self.out_dir.parent / f".{self.out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> BundleWriter:
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.staging.mkdir()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.staging.exists():
            shutil.rmtree(self.staging, ignore_errors=True)

    def path(self, rel: str) -> Path:
        return self.staging / rel

    def write_json(self, rel: str, obj: Any) -> Path:
        path = self.path(rel)
        path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    def _write_manifest(self, fields: dict[str, Any]) -> Manifest:
        files = {
            p.relative_to(self.staging).as_posix(): sha256_file(p)
            for p in sorted(self.staging.rglob("*"))
            if p.is_file() and p.name != MANIFEST_NAME
        }
        data = {
            "schema_version": SCHEMA_VERSION,
            **fields,
            "files": files,
            "tools": tool_versions(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        manifest = Manifest.from_dict(json.loads(json.dumps(data)), where="new manifest")
        self.write_json(MANIFEST_NAME, manifest.to_dict())
        return manifest

    def stage(self, **fields: Any) -> Path:
        """Write a provisional manifest so the staged bundle can be opened and measured before it is published.

        Returns:
            The staging directory (a loadable bundle until the next change).
        """
        self._write_manifest(fields)
        return self.staging

    def commit(self, **fields: Any) -> Manifest:
        """Hash every staged file, write the manifest, and move the bundle into place.

        Args:
            **fields: Manifest fields other than ``schema_version``, ``files``,
                ``tools`` and ``created``, which are filled in here.

        Returns:
            The manifest as written.
        """
        manifest = self._write_manifest(fields)
        old = None
        if self.out_dir.exists():
            old = self.out_dir.parent / f".{self.out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.out_dir, old)
        os.replace(self.staging, self.out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return manifest
