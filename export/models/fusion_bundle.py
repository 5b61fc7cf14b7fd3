"""Fusion bundles: the default towers (with token outputs when the head reads them) plus a trained head.

The head is exported like every graph (``fusion.onnx``) and verified against
PyTorch on real tower features; the manifest's ``fusion`` entry maps each
head input to the tower output that feeds it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgemm.export.bundle_writer import BundleWriter
from edgemm.export.models.dual_encoder import write_default_towers
from edgemm.export.models.fusion import FusionConfig, FusionHead, fusion_spec
from edgemm.export.onnx_export import export_onnx, verify_onnx
from edgemm.runtime.errors import ExportError
from edgemm.runtime.manifest import Manifest

FAMILY = "fusion"
# Head input → where the runtime finds it: "<graph role>/<output>" ("tokens/…": the tokenizer's own arrays).
FEATURE_SOURCES = {
    "image_embedding": "image_encoder/embedding",
    "image_tokens": "image_encoder/image_tokens",
    "text_embedding": "text_encoder/embedding",
    "text_tokens": "text_encoder/text_tokens",
    "text_mask": "tokens/attention_mask",
}


def _verification_batches(names: Sequence[str], features: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    n = len(next(iter(features.values())))
    if n < 2:
        raise ExportError("verifying a fusion head needs at least 2 rows of real features.")
    small = {k: features[k][:1] for k in names}
    full = {k: features[k][: min(n, 64)] for k in names}
    if "text_mask" in names:  # trim the padding the first row does not need: another sequence length
        length = int(small["text_mask"].sum(axis=1).max())
        small = {k: (v[:, :length] if k in ("text_tokens", "text_mask") else v) for k, v in small.items()}
    return [small, full]


def build_fusion_bundle(out_dir: str | Path, head: FusionHead, config: FusionConfig, *, task: str,
                        verify_features: dict[str, np.ndarray], classes: Sequence[str] | None = None,
                        threshold: float = 0.5, rerank_cosine_weight: float = 0.0, name: str = "fusion",
                        training: dict[str, Any] | None = None,
                        overwrite: bool = False, progress: Callable[[str], None] | None = None) -> Manifest:
    """Export the default towers and a trained fusion head as one verified bundle.

    Args:
        out_dir: Bundle directory to create.
        head: The trained head (PyTorch).
        config: Its config (recorded in the manifest).
        task: ``"matching"`` (one logit) or ``"classification"`` (one logit per class).
        verify_features: Real tower features by name (held-out rows), to verify the exported head on.
        classes: Class names in logit order (classification).
        threshold: Matching: the probability from which a pair counts as a match.
        rerank_cosine_weight: Matching: rerank by head logit + this × the search's cosine (0: the probability).
        name: Bundle name.
        training: What the training report says (recorded under ``source.training``).
        overwrite: Replace an existing bundle.
        progress: Called with a short description before each step.

    Returns:
        The written manifest.

    Raises:
        ExportError: Bad task/classes, the directory exists, or export failed.
        VerificationError: A graph drifts from PyTorch.
    """
    if task not in ("matching", "classification"):
        raise ExportError(f"unknown fusion task {task!r}; use 'matching' or 'classification'.")
    if task == "classification" and (not classes or len(classes) != config.classes):
        raise ExportError(f"a classification head with {config.classes} logits needs {config.classes} class names.")
    if task == "matching" and config.classes != 1:
        raise ExportError(f"a matching head has one logit; this config has {config.classes}.")
    step = progress or (lambda _msg: None)
    spec = fusion_spec(config)
    names = [t.name for t in spec.inputs]
    with BundleWriter(out_dir, overwrite=overwrite) as w:
        fields = write_default_towers(w, step, image_tokens="image_tokens" in names, text_tokens="text_tokens" in names)
        step(f"exporting fusion.onnx ({config.architecture} head)")
        head = head.eval()
        export_onnx(head, spec, w.path(spec.file))
        step("verifying the fusion head against PyTorch on real features")
        report = verify_onnx(head, spec, w.path(spec.file), _verification_batches(names, verify_features),
                             description="held-out tower features")
        fusion = {"task": task, "architecture": config.architecture,
                  "inputs": {n: FEATURE_SOURCES[n] for n in names}, "threshold": float(threshold)}
        if rerank_cosine_weight:
            fusion["rerank_cosine_weight"] = float(rerank_cosine_weight)
        if classes:
            w.write_json("fusion_labels.json", list(classes))
            fusion["labels"] = "fusion_labels.json"
        fields["graphs"][spec.role] = spec.manifest_entry()
        fields["verification"][spec.role] = report
        fields["source"]["fusion_head"] = {"config": config.to_dict(), **({"training": training} if training else {})}
        step("writing bundle")
        return w.commit(name=name, family=FAMILY, fusion=fusion, **fields)


def train_fusion_bundle(source: str | Path, out_dir: str | Path, *, architecture: str = "gated",
                        options: Any = None, tanh_gate: bool = False, cache_dir: str | Path | None = None,
                        overwrite: bool = False, progress: Callable[[str, int, int, dict[str, Any]], None] | None = None,
                        ) -> tuple[Manifest, Any]:
    """Train a fusion classifier on (image, text, label) rows and write it as a verified bundle.

    Frozen default-tower features are computed once per distinct image and
    text and cached (``cache_dir``, default ``$EDGEMM_HOME/cache/fusion-features``),
    so re-training with other options costs seconds.

    Args:
        source: A CSV (``image,text,label``) or a folder holding ``data.csv``/``labels.csv``.
        out_dir: Bundle directory to create.
        architecture: ``early``, ``late``, ``gated`` or ``cross_attention``.
        options: ``TrainOptions`` (epochs, modality dropout, early stopping, seed, …).
        tanh_gate: Flamingo-style gates on the cross-attention residuals.
        cache_dir: Feature cache folder.
        overwrite: Replace an existing bundle.
        progress: ``progress(stage, done, total, metrics)`` with stage ``"features"`` or ``"train"``.

    Returns:
        The manifest and the training report.

    Raises:
        InputError: Bad rows (missing files, empty text, unknown labels…), checked before any work.
        VerificationError: The exported head drifts from PyTorch.
    """
    import os

    from edgemm.export.fusion_train import TrainOptions, cache_features, label_targets, read_examples, train_head
    from edgemm.export.models.dual_encoder import default_towers

    options = options or TrainOptions()
    examples, labels = read_examples(source)
    if cache_dir is None:
        home = os.environ.get("EDGEMM_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "edgemm")
        cache_dir = Path(home) / "cache" / "fusion-features"
    report_to = progress or (lambda *_args: None)
    towers = default_towers()
    features = cache_features(towers, examples, cache_dir, lambda done, total: report_to("features", done, total, {}))
    config = FusionConfig.default(architecture, classes=len(labels), tanh_gate=tanh_gate)
    head, report = train_head(config, features, label_targets(examples, labels), options,
                              lambda epoch, total, metrics: report_to("train", epoch, total, metrics))
    manifest = build_fusion_bundle(out_dir, head, config, task="classification", classes=labels,
                                   verify_features=features, name=Path(out_dir).name,
                                   training={**report.to_dict(), "source": str(source)}, overwrite=overwrite)
    return manifest, report
