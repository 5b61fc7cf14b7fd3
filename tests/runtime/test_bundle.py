"""Bundles that are missing, altered or too new are refused with a clear error."""

from __future__ import annotations

import json

import pytest

from edgemm.runtime.bundle import Bundle
from edgemm.runtime.errors import BundleError
from edgemm.runtime.manifest import SCHEMA_VERSION


def _edit_manifest(path, change):
    data = json.loads((path / "manifest.json").read_text())
    change(data)
    (path / "manifest.json").write_text(json.dumps(data))


def test_default_bundle_opens(default_bundle):
    assert Bundle(default_bundle).manifest.name == "default"


def test_missing_path(tmp_path):
    with pytest.raises(BundleError, match="does not exist.*edgemm export default"):
        Bundle(tmp_path / "nope")


def test_directory_without_manifest(tmp_path):
    with pytest.raises(BundleError, match="not an edgemm bundle"):
        Bundle(tmp_path)


def test_altered_file_is_refused(bundle_copy):
    with open(bundle_copy / "labels.json", "a") as f:
        f.write(" ")
    with pytest.raises(BundleError, match="labels.json' does not match the hash"):
        Bundle(bundle_copy)
    Bundle(bundle_copy, check_hashes=False)  # an explicit opt-out still opens it


def test_missing_file_is_refused(bundle_copy):
    (bundle_copy / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="incomplete: 'tokenizer.json' is missing"):
        Bundle(bundle_copy)


def test_newer_schema_is_refused(bundle_copy):
    _edit_manifest(bundle_copy, lambda d: d.update(schema_version=SCHEMA_VERSION + 1))
    with pytest.raises(BundleError, match="newer than this edgemm understands.*Upgrade edgemm"):
        Bundle(bundle_copy)


def test_malformed_manifest_is_refused(bundle_copy):
    _edit_manifest(bundle_copy, lambda d: d.pop("graphs"))
    with pytest.raises(BundleError, match="malformed manifest"):
        Bundle(bundle_copy)
    (bundle_copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="cannot be read as JSON"):
        Bundle(bundle_copy)


def test_truncated_onnx_file_is_refused_before_loading(bundle_copy):
    onnx_file = bundle_copy / "image_encoder.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:1000])
    with pytest.raises(BundleError, match="image_encoder.onnx' does not match"):
        Bundle(bundle_copy)


def test_schema_1_bundles_still_open(bundle_copy):
    """Bundles written before schema 2 lack the new fields; their defaults keep them meaning the same."""
    def downgrade(d):
        d["schema_version"] = 1
        d["image"].pop("resize")
        d["text"].pop("padding")
        d["scoring"].pop("logit_bias")

    _edit_manifest(bundle_copy, downgrade)
    m = Bundle(bundle_copy).manifest
    assert m.schema_version == 1 and m.image.resize == "crop" and m.text.padding == "longest"
