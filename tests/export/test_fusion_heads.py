"""Fusion heads: every architecture exports and verifies; training, the feature cache and CSV input."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from edgemm.export.fusion_train import (
    Example,
    TrainOptions,
    apply_modality_dropout,
    cache_features,
    label_targets,
    predict_logits,
    read_examples,
    train_head,
)
from edgemm.export.models.fusion import (
    ARCHITECTURES,
    FEATURE_INPUTS,
    FusionConfig,
    build_head,
    fusion_spec,
    random_features,
    tower_features,
)
from edgemm.export.onnx_export import export_onnx, verify_onnx
from edgemm.runtime.errors import InputError

# (case id, architecture, classes, overrides): every registered architecture, in each of its variants.
CASES = [
    ("early", "early", 1, {}),
    ("early-pooled-tokens", "early", 1, {"pooled_image_tokens": True}),
    ("early-unequal-dims", "early", 4, {"image_dim": 256}),
    ("late", "late", 3, {}),
    ("gated", "gated", 3, {"pooled_image_tokens": True}),
    ("cross_attention", "cross_attention", 1, {}),
    ("cross_attention-tanh-2-layers", "cross_attention", 5, {"tanh_gate": True, "layers": 2}),
]


def test_every_architecture_has_an_export_case():
    assert set(ARCHITECTURES) == {"early", "late", "gated", "cross_attention"}
    assert {arch for _, arch, _, _ in CASES} == set(ARCHITECTURES)


@pytest.mark.parametrize(("architecture", "classes", "overrides"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_head_exports_and_matches_pytorch(tmp_path, architecture, classes, overrides):
    config = FusionConfig.default(architecture, classes, hidden=64, **overrides)
    head = build_head(config).eval()
    spec = fusion_spec(config)
    assert spec.role == "fusion" and spec.family == "fusion"
    assert [t.name for t in spec.inputs] == list(head.input_names)
    assert set(head.input_names) <= set(FEATURE_INPUTS)
    assert list(head.input_names) == [n for n in FEATURE_INPUTS if n in head.input_names]  # forward order

    path = export_onnx(head, spec, tmp_path / spec.file)
    graph = onnx.load(path).graph
    assert [i.name for i in graph.input] == list(head.input_names)
    assert [o.name for o in graph.output] == ["logits"]
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    for name, shape in dims.items():
        assert shape[0] == "batch"
        if name in ("text_tokens", "text_mask"):
            assert shape[1] == "seq"
        if name == "image_tokens":
            assert shape[1:] == [49, 1280]  # the patch grid is fixed

    # Two batch sizes and two text lengths, with ragged masks: the dynamic axes are exercised.
    batches = [{n: a for n, a in random_features(config, b, t, seed=b).items() if n in head.input_names}
               for b, t in ((1, 3), (6, 11))]
    report = verify_onnx(head, spec, path, batches, description="random features")
    assert report["passed"] and report["max_abs_diff"]["logits"] <= spec.atol
    assert report["inputs"] == "7 input rows of random features"
    with torch.no_grad():
        assert head(*(torch.from_numpy(batches[1][n]) for n in head.input_names)).shape == (6, classes)


def test_embedding_only_heads_need_nothing_but_the_two_embeddings():
    for arch in ("early", "late", "gated"):
        assert build_head(FusionConfig.default(arch)).input_names == ("image_embedding", "text_embedding")
    assert build_head(FusionConfig.default("cross_attention")).input_names == ("image_tokens", "text_tokens",
                                                                                "text_mask")


def test_config_round_trips_and_rejects_bad_values():
    config = FusionConfig.default("cross_attention", 3, tanh_gate=True, layers=2)
    assert FusionConfig.from_dict(config.to_dict()) == config
    with pytest.raises(InputError, match="unknown fusion architecture 'transformer'"):
        FusionConfig.default("transformer")
    with pytest.raises(InputError, match="tanh_gate applies to cross_attention only"):
        FusionConfig.default("early", tanh_gate=True)
    with pytest.raises(InputError, match="multiple of heads"):
        FusionConfig.default("cross_attention", hidden=30, heads=4)
    with pytest.raises(InputError, match=r"unknown keys \['colour'\]"):
        FusionConfig.from_dict({**config.to_dict(), "colour": 1})
    with pytest.raises(InputError, match="missing"):
        FusionConfig.from_dict({"architecture": "early"})


def test_padding_does_not_change_cross_attention_logits():
    config = FusionConfig.default("cross_attention", 2, hidden=64)
    head = build_head(config).eval()
    f = {k: torch.from_numpy(v) for k, v in random_features(config, 3, 6).items()}
    f["text_mask"][1, 4:] = 0
    padded = dict(f, text_tokens=torch.cat([f["text_tokens"], torch.randn(3, 4, 384)], 1),
                  text_mask=torch.cat([f["text_mask"], torch.zeros(3, 4, dtype=torch.long)], 1))
    garbage = dict(f, text_tokens=f["text_tokens"].clone())
    garbage["text_tokens"][1, 4:] = 100.0  # states under the mask must not matter
    with torch.no_grad():
        ref = head.forward_named(f)
        assert torch.allclose(head.forward_named(padded), ref, atol=1e-5)
        assert torch.allclose(head.forward_named(garbage), ref, atol=1e-5)


def test_tanh_gate_starts_as_identity_so_image_tokens_do_not_matter():
    f = {k: torch.from_numpy(v) for k, v in random_features(FusionConfig.default("cross_attention"), 4, 5).items()}
    other = dict(f, image_tokens=torch.rand_like(f["image_tokens"]) * 6)
    gated = build_head(FusionConfig.default("cross_attention", tanh_gate=True, layers=2, hidden=64)).eval()
    plain = build_head(FusionConfig.default("cross_attention", hidden=64)).eval()
    with torch.no_grad():
        assert torch.equal(gated.forward_named(f), gated.forward_named(other))
        assert not torch.allclose(plain.forward_named(f), plain.forward_named(other))
        for block in gated.blocks:
            block.alpha_attn.fill_(0.5)
        assert not torch.allclose(gated.forward_named(f), gated.forward_named(other))


# --------------------------------------------------------------------------- training


def _pair_problem(n: int, clusters: int = 6, seed: int = 0,
                  draws: int | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Matching where only the pair decides: image and text each come from one of ``clusters`` topics.

    Half the pairs share a topic (label 1). Each side's topic is uniform whatever the label, so
    neither modality alone says anything: a head must compare them. ``seed`` fixes the topics,
    ``draws`` (default: ``seed``) the sampled pairs.
    """
    rng = np.random.default_rng(seed)
    image_centres = rng.standard_normal((clusters, 384))
    text_centres = rng.standard_normal((clusters, 384))
    rng = np.random.default_rng([seed, seed if draws is None else draws])
    image_topic = rng.integers(0, clusters, n)
    label = rng.integers(0, 2, n)
    text_topic = np.where(label == 1, image_topic, (image_topic + rng.integers(1, clusters, n)) % clusters)

    def unit(a: np.ndarray) -> np.ndarray:
        return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)

    features = {"image_embedding": unit(image_centres[image_topic] + 0.8 * rng.standard_normal((n, 384))),
                "text_embedding": unit(text_centres[text_topic] + 0.8 * rng.standard_normal((n, 384)))}
    return features, label


FAST = TrainOptions(epochs=30, batch_size=32, lr=3e-3, patience=5, seed=0)


def test_early_fusion_learns_a_pair_interaction_that_late_fusion_cannot():
    features, y = _pair_problem(600)
    early, early_report = train_head(FusionConfig.default("early", hidden=64), features, y, FAST)
    late, late_report = train_head(FusionConfig.default("late", hidden=64), features, y, FAST)
    assert early_report.val_accuracy > 0.9
    assert late_report.val_accuracy < 0.65  # a sum of per-modality scores is blind to the pair
    assert abs(early_report.baseline_accuracy - 0.5) < 0.1
    held_out, y_held_out = _pair_problem(1000, seed=0, draws=99)  # same topics, new pairs
    accuracy = ((predict_logits(early, held_out)[:, 0] > 0) == y_held_out).mean()
    assert accuracy > 0.85
    assert "validation accuracy" in early_report.summary()


def test_early_stopping_restores_the_best_epoch():
    features, y = _pair_problem(120, seed=1)
    flipped = y.copy()
    flipped[::4] ^= 1  # label noise: a large head overfits the training rows and validation loss turns up
    validation = np.zeros(len(y), bool)
    validation[::3] = True
    options = TrainOptions(epochs=60, batch_size=16, lr=1e-2, weight_decay=0.0, patience=4, balance=False, seed=3)
    seen = []
    head, report = train_head(FusionConfig.default("early", hidden=256, dropout=0.0), features, flipped, options,
                              lambda epoch, total, metrics: seen.append((epoch, total, metrics["val_loss"])),
                              validation=validation)
    assert report.stopped_early and report.epochs_run < 60
    assert report.best_epoch == report.epochs_run - 4
    losses = [h["val_loss"] for h in report.history]
    assert report.val_loss == min(losses) == losses[report.best_epoch - 1]
    assert [s[0] for s in seen] == list(range(1, report.epochs_run + 1)) and seen[0][1] == 60
    rows = np.flatnonzero(validation)
    logits = torch.from_numpy(predict_logits(head, {k: v[rows] for k, v in features.items()}))
    restored = float(F.binary_cross_entropy_with_logits(logits[:, 0], torch.from_numpy(flipped[rows]).float()))
    assert restored == pytest.approx(report.val_loss, abs=1e-5)  # the weights are the best epoch's, not the last's


def test_training_is_deterministic_given_the_seed():
    features, y = _pair_problem(200, seed=2)
    options = TrainOptions(epochs=4, batch_size=32, modality_dropout=0.3, seed=7)
    config = FusionConfig.default("gated", hidden=32)
    a, report_a = train_head(config, features, y, options)
    b, report_b = train_head(config, features, y, options)
    c, _ = train_head(config, features, y, TrainOptions(epochs=4, batch_size=32, modality_dropout=0.3, seed=8))
    assert report_a.history == report_b.history
    for (name, ta), tb, tc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(ta, tb), name
    assert any(not torch.equal(ta, tc) for ta, tc in zip(a.state_dict().values(), c.state_dict().values()))


def test_pairs_index_image_and_text_features_separately():
    features, y = _pair_problem(300, seed=4)
    images = {"image_embedding": features["image_embedding"][:150]}  # the same 150 images, each in two pairs
    texts = {"text_embedding": features["text_embedding"]}
    pairs = (np.r_[np.arange(150), np.arange(150)], np.arange(300))
    fused = {**images, **texts}
    head, report = train_head(FusionConfig.default("early", hidden=32), fused, y, TrainOptions(epochs=2), pairs=pairs)
    assert report.train_rows + report.val_rows == 300
    direct = {"image_embedding": features["image_embedding"][:150][pairs[0]], "text_embedding": texts["text_embedding"]}
    assert np.allclose(predict_logits(head, fused, pairs=pairs), predict_logits(head, direct), atol=1e-6)
    with pytest.raises(InputError, match="outside feature 'image_embedding'"):
        train_head(FusionConfig.default("early"), fused, y, TrainOptions(epochs=1), pairs=(pairs[0] + 200, pairs[1]))


def test_train_head_rejects_misaligned_inputs():
    features, y = _pair_problem(50)
    with pytest.raises(InputError, match="lack \\['image_tokens', 'text_tokens', 'text_mask'\\]"):
        train_head(FusionConfig.default("cross_attention"), features, y, TrainOptions(epochs=1))
    with pytest.raises(InputError, match="49 rows but there are 50 targets"):
        train_head(FusionConfig.default("early"), {**features, "text_embedding": features["text_embedding"][:49]}, y)
    with pytest.raises(InputError, match=r"targets must be in \[0, 2\)"):
        train_head(FusionConfig.default("early"), features, y + 1)
    with pytest.raises(InputError, match="modality_dropout"):
        TrainOptions(modality_dropout=1.5)


def test_modality_dropout_zeroes_one_whole_modality_per_row():
    config = FusionConfig.default("cross_attention")
    batch = {k: torch.from_numpy(v) for k, v in random_features(config, 200, 4).items()}
    batch = {"image_embedding": batch["image_embedding"], "image_tokens": batch["image_tokens"][:, :3, :8],
             "text_embedding": batch["text_embedding"], "text_tokens": batch["text_tokens"],
             "text_mask": batch["text_mask"]}
    before = {k: v.clone() for k, v in batch.items()}
    out = apply_modality_dropout(batch, 1.0, torch.Generator().manual_seed(0))
    image_gone = (out["image_embedding"].abs().sum(1) == 0) & (out["image_tokens"].abs().sum((1, 2)) == 0)
    text_gone = (out["text_embedding"].abs().sum(1) == 0) & (out["text_tokens"].abs().sum((1, 2)) == 0)
    assert torch.all(image_gone ^ text_gone)  # exactly one modality per row
    assert 60 < int(image_gone.sum()) < 140  # picked 50/50
    assert torch.equal(out["text_mask"], before["text_mask"])
    for k in batch:
        assert torch.equal(batch[k], before[k])  # the caller's tensors are untouched
    kept = apply_modality_dropout(batch, 0.0, torch.Generator().manual_seed(0))
    assert all(torch.equal(kept[k], batch[k]) for k in batch)
    some = apply_modality_dropout(batch, 0.25, torch.Generator().manual_seed(0))
    dropped = (some["image_embedding"].abs().sum(1) == 0) | (some["text_embedding"].abs().sum(1) == 0)
    assert 25 < int(dropped.sum()) < 75


def test_pair_batches_encode_each_image_once_with_the_same_result():
    """Training through a pair index (shared image encodings, dropped images as a zero image) = row by row."""
    from edgemm.export.fusion_train import _Rows

    config = FusionConfig.default("cross_attention", hidden=32)
    head = build_head(config).eval()
    images = random_features(config, 5, 6, seed=1)
    texts = random_features(config, 9, 6, seed=2)
    features = {**{k: images[k] for k in ("image_embedding", "image_tokens")},
                **{k: texts[k] for k in ("text_embedding", "text_tokens", "text_mask")}}
    pairs = (np.array([0, 0, 1, 4, 4, 4, 2, 3, 1, 0]), np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 0]))
    direct = {k: v[pairs[0] if k.startswith("image") else pairs[1]] for k, v in features.items()}
    rows = torch.arange(10)
    out = {}
    with torch.no_grad():
        for p in (0.0, 0.6):
            shared = _Rows(head.input_names, features, pairs).logits(head, rows, p, torch.Generator().manual_seed(3))
            single = _Rows(head.input_names, direct, None).logits(head, rows, p, torch.Generator().manual_seed(3))
            assert torch.allclose(shared, single, atol=1e-5), p
            out[p] = shared
    assert not torch.allclose(out[0.0], out[0.6])  # some rows did lose a modality


def test_modality_dropout_teaches_the_head_to_do_without_a_modality():
    """Topic classification where either modality suffices; at test time the text is missing."""
    rng = np.random.default_rng(5)
    topics, n = 4, 800
    y = rng.integers(0, topics, n)
    image_centres, text_centres = rng.standard_normal((2, topics, 384))
    features = {"image_embedding": (image_centres[y] + 1.5 * rng.standard_normal((n, 384))).astype(np.float32) / 20,
                "text_embedding": (text_centres[y] + 0.3 * rng.standard_normal((n, 384))).astype(np.float32) / 20}
    train = np.arange(n) < 600
    options = TrainOptions(epochs=25, batch_size=32, lr=2e-3, patience=0, seed=0)
    config = FusionConfig.default("gated", topics, hidden=64)
    fit = {k: v[train] for k, v in features.items()}
    test_no_text = {"image_embedding": features["image_embedding"][~train],
                    "text_embedding": np.zeros_like(features["text_embedding"][~train])}
    accuracy = {}
    for p in (0.0, 0.5):
        head, report = train_head(config, fit, y[train], TrainOptions(**{**vars(options), "modality_dropout": p}))
        assert report.options["modality_dropout"] == p
        accuracy[p] = (predict_logits(head, test_no_text).argmax(1) == y[~train]).mean()
    # With the text zeroed both heads still classify from the image here (the image alone separates
    # these topics), so only the floor is asserted; apply_modality_dropout is tested directly above.
    assert accuracy[0.5] > 0.8


# --------------------------------------------------------------------------- reading examples


def _png(path: Path, colour: tuple[int, int, int]) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 16), colour).save(path)


def _write_csv(path: Path, rows: list[list[str]], header: tuple[str, ...] = ("image", "text", "label", "note")) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture
def image_folder(tmp_path) -> Path:
    _png(tmp_path / "red.png", (200, 0, 0))
    _png(tmp_path / "sub" / "blue.png", (0, 0, 200))
    _png(tmp_path / "green.png", (0, 200, 0))
    _png(tmp_path / "white.png", (250, 250, 250))
    return tmp_path


GOOD_ROWS = [["red.png", "a red square", "warm", "x"], ["sub/blue.png", "a blue square", "cold", ""],
             ["green.png", "a green square", "cold", ""], ["white.png", "hot white light", "warm", ""]]


def test_a_good_csv_parses(image_folder):
    examples, labels = read_examples(_write_csv(image_folder / "rows.csv", GOOD_ROWS))
    assert labels == ["cold", "warm"]
    assert [e.text for e in examples] == ["a red square", "a blue square", "a green square", "hot white light"]
    assert examples[1].image == image_folder / "sub" / "blue.png" and examples[1].image.is_file()
    assert label_targets(examples, labels).tolist() == [1, 0, 0, 1]
    # The same rows as data.csv in a folder, and a given label list keeps its order.
    _write_csv(image_folder / "data.csv", GOOD_ROWS)
    again, given = read_examples(image_folder, labels=["warm", "cold"])
    assert again == examples and given == ["warm", "cold"]


def test_missing_files_are_listed_with_their_lines(image_folder):
    rows = GOOD_ROWS + [["nope.png", "gone", "warm", ""], ["also/missing.jpg", "gone too", "cold", ""]]
    path = _write_csv(image_folder / "rows.csv", rows)
    before = sorted(image_folder.rglob("*"))
    with pytest.raises(InputError, match=r"2 missing image files.*line 6: nope\.png; line 7: also/missing\.jpg"):
        read_examples(path)
    assert sorted(image_folder.rglob("*")) == before  # nothing written


def test_unknown_labels_name_the_line(image_folder):
    path = _write_csv(image_folder / "rows.csv", GOOD_ROWS + [["red.png", "a red square", "tepid", ""]])
    with pytest.raises(InputError, match=r"unknown labels.*line 6: 'tepid'"):
        read_examples(path, labels=["warm", "cold"])


def test_missing_columns_empty_fields_and_thin_labels(image_folder):
    path = _write_csv(image_folder / "rows.csv", [r[:2] for r in GOOD_ROWS], header=("image", "caption"))
    with pytest.raises(InputError, match=r"line 1: the header lacks the column\(s\) \['text', 'label'\]"):
        read_examples(path)
    path = _write_csv(image_folder / "rows.csv", GOOD_ROWS + [["red.png", "  ", "warm", ""]])
    with pytest.raises(InputError, match=r"rows with empty fields: line 6 \(text\)"):
        read_examples(path)
    path = _write_csv(image_folder / "rows.csv", GOOD_ROWS + [["red.png", "red", "lukewarm", ""]])
    with pytest.raises(InputError, match=r"fewer than 2 rows: 'lukewarm' \(1\)"):
        read_examples(path)
    with pytest.raises(InputError, match="has a header but no rows"):
        read_examples(_write_csv(image_folder / "rows.csv", []))


def test_unreadable_images_and_ambiguous_folders(image_folder):
    (image_folder / "broken.png").write_bytes(b"not a png at all")
    path = _write_csv(image_folder / "rows.csv", GOOD_ROWS + [["broken.png", "broken", "warm", ""]])
    with pytest.raises(InputError, match=r"1 unreadable image files: line 6: broken\.png unreadable"):
        read_examples(path)
    _write_csv(image_folder / "data.csv", GOOD_ROWS)
    _write_csv(image_folder / "labels.csv", GOOD_ROWS)
    with pytest.raises(InputError, match="holds both data.csv and labels.csv"):
        read_examples(image_folder)
    with pytest.raises(InputError, match="holds neither data.csv nor labels.csv"):
        read_examples(image_folder / "sub")
    with pytest.raises(InputError, match="does not exist"):
        read_examples(image_folder / "absent.csv")


# --------------------------------------------------------------------------- feature cache


class _CountingClassifier(nn.Module):
    """A tiny stand-in backbone (the cache is under test, not the tower): 224px → 7x7x8 grid → 10 classes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 32, stride=32)
        self.fc = nn.Linear(8, 10)
        self.calls = 0

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += len(x)
        return torch.relu(self.conv(x))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features.mean((2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class _CountingText(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(256, 6)
        self.calls = 0

    def token_states(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.calls += len(ids)
        return self.embed(ids)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(-1).float()
        return F.normalize((self.embed(ids) * m).sum(1) / m.sum(1), dim=-1)


class _CharEmbedder:
    def __init__(self):
        self.tower = _CountingText()

    def feeds(self, texts):
        length = max(len(t) for t in texts)
        ids = np.zeros((len(texts), length), np.int64)
        mask = np.zeros((len(texts), length), np.int64)
        for i, t in enumerate(texts):
            ids[i, :len(t)] = [min(ord(c), 255) for c in t]
            mask[i, :len(t)] = 1
        return {"input_ids": ids, "attention_mask": mask}


def _small_towers():
    from edgemm.export.models.dual_encoder import ConseImageTower

    torch.manual_seed(0)
    image = ConseImageTower(_CountingClassifier(), F.normalize(torch.randn(10, 6), dim=-1), temperature=1.0, top_k=3)
    return image.eval(), _CharEmbedder()


def test_cache_computes_each_item_once_and_reuses_it(image_folder, tmp_path):
    image, text = _small_towers()
    rng = np.random.default_rng(0)
    array = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
    examples = [Example(image_folder / "red.png", "red", "a"), Example(array, "noise", "b"),
                Example(image_folder / "red.png", "red again", "a"), Example(array.copy(), "noise", "b")]
    cache = tmp_path / "cache"
    steps = []
    first = cache_features((image, text), examples, cache, lambda done, total: steps.append((done, total)))
    assert image.classifier.calls == 2 and text.tower.calls == 3  # duplicate images/texts computed once
    assert steps[-1] == (5, 5)
    assert first["image_tokens"].shape == (4, 49, 8) and first["image_embedding"].shape == (4, 6)
    assert first["text_tokens"].shape == (4, 9, 6) and first["text_mask"].sum(1).tolist() == [3, 5, 9, 5]
    assert np.array_equal(first["image_tokens"][0], first["image_tokens"][2])
    assert sorted(p.name.split("-")[0] for p in cache.iterdir()) == ["image"] * 2 + ["text"] * 3  # no temp files

    again = cache_features((image, text), examples, cache, lambda done, total: steps.append((done, total)))
    assert image.classifier.calls == 2 and text.tower.calls == 3  # nothing recomputed
    assert len(steps) == 2
    for name in first:
        assert np.array_equal(first[name], again[name])

    # Same towers through the uncached path agree; a damaged entry is recomputed; new weights miss the cache.
    direct = tower_features(image, text, None, ["red", "noise"])
    assert np.allclose(direct["text_embedding"], first["text_embedding"][:2])
    text_calls = text.tower.calls
    next(cache.glob("image-*")).write_bytes(b"truncated")
    cache_features((image, text), examples, cache)
    assert image.classifier.calls == 3 and text.tower.calls == text_calls  # only the damaged image
    with torch.no_grad():
        image.classifier.fc.bias += 1
    cache_features((image, text), examples, cache)
    assert image.classifier.calls == 5 and text.tower.calls > text_calls  # new weights: every item recomputed


@pytest.fixture(scope="module")
def default_towers_once():
    from edgemm.export.models.dual_encoder import default_towers

    return default_towers()


def test_tower_features_match_the_default_towers(default_towers_once):
    from edgemm.export.models.dual_encoder import reference_pixels
    from edgemm.runtime.datasets import SAMPLE_SENTENCES, sample_photos

    image, text, _ = default_towers_once
    pixels = reference_pixels([p.image for p in sample_photos()[:3]])
    texts = list(SAMPLE_SENTENCES[:4])
    f = tower_features(image, text, pixels, texts)
    with torch.no_grad():
        embedding, _ = image(torch.from_numpy(pixels))
        grid = image.classifier.forward_features(torch.from_numpy(pixels))
        feeds = text.feeds(texts)
        ids, mask = torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])
        text_embedding = text.tower(ids, mask)
    assert f["image_embedding"].shape == (3, 384) and f["image_tokens"].shape == (3, 49, 1280)
    assert np.allclose(f["image_embedding"], embedding.numpy(), atol=1e-5)
    assert np.allclose(f["image_tokens"], grid.flatten(2).transpose(1, 2).numpy(), atol=1e-5)
    assert np.allclose(f["text_embedding"], text_embedding.numpy(), atol=1e-5)
    assert f["text_tokens"].shape == (4, ids.shape[1], 384) and np.array_equal(f["text_mask"], feeds["attention_mask"])
    assert type(image.classifier).__name__ == "EfficientNetLite"  # the head-only swap was undone
    with pytest.raises(InputError, match=r"pixels must be \(N, 3, H, W\)"):
        tower_features(image, text, pixels[0], None)
