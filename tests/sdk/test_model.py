"""The public model API on the real default bundle."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import edgemm
from edgemm.runtime.datasets import SAMPLE_LABELS, SAMPLE_SENTENCES
from sessions import spinning_entry

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden_default.json"


def test_golden_outputs_for_sample_photos(model, photos):
    """Top labels and embeddings of the real photos must not drift between versions."""
    emb = model.embed_images([p.image for p in photos], color="rgb")
    probs = model.scores([p.image for p in photos], SAMPLE_LABELS, color="rgb")
    current = {p.name: {"top1": SAMPLE_LABELS[int(s.argmax())], "embedding": e.round(5).tolist()}
               for p, s, e in zip(photos, probs, emb)}
    if os.environ.get("EDGEMM_UPDATE_GOLDEN") == "1" or not GOLDEN.exists():
        GOLDEN.write_text(json.dumps(current))
        pytest.skip("golden outputs written; re-run to compare")
    golden = json.loads(GOLDEN.read_text())
    assert set(golden) == set(current)
    for name, g in golden.items():
        assert current[name]["top1"] == g["top1"], name
        np.testing.assert_allclose(current[name]["embedding"], g["embedding"], atol=2e-4, err_msg=name)


def test_onnx_runtime_threads_do_not_spin_unless_asked(model, default_bundle):
    # spinning threads hold the cores a frame's preprocessing needs (benchmarks/bench_spinning.py)
    assert spinning_entry(model.image_backend) == spinning_entry(model.text_backend) == "0"
    spinning = edgemm.load(default_bundle, threads=1, spinning=True)
    assert spinning_entry(spinning.image_backend) == spinning_entry(spinning.text_backend) == "1"


def test_object_photos_are_classified_correctly(model, photos):
    results = model.classify([p.image for p in photos], labels=list(SAMPLE_LABELS), color="rgb", top_k=1)
    correct = {p.name for p, r in zip(photos, results) if r[0].label == p.label}
    assert {"skimage.chelsea", "skimage.coffee", "skimage.rocket", "skimage.camera", "skimage.clock",
            "sklearn.china", "sklearn.flower", "matplotlib.grace_hopper"} <= correct


def test_classify_one_frame_returns_sorted_top_k(model, photos):
    frame = np.ascontiguousarray(photos[1].image[:, :, ::-1])  # chelsea as an OpenCV BGR frame
    preds = model.classify(frame, labels=["person", "dog", "cat", "forklift"], top_k=3)
    assert [type(p) for p in preds] == [edgemm.Prediction] * 3
    assert preds[0].label == "cat"
    assert preds[0].score >= preds[1].score >= preds[2].score
    assert len(model.classify(frame, labels=["a", "b"], top_k=10)) == 2  # top_k clipped to the labels


def test_classify_scores_are_probabilities(model, photos):
    probs = model.scores([p.image for p in photos[:4]], ["cat", "cup of coffee", "rocket"], color="rgb")
    assert probs.shape == (4, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-5)


def test_label_embeddings_are_cached_per_label_set(model, photos):
    labels = ["person", "dog", "forklift", "bicycle"]
    model.classify(photos[0].image, labels=labels)
    model.text_backend.last_inference_ms = -1.0  # any text-graph run would overwrite this
    model.classify(photos[1].image, labels=labels)
    assert model.text_backend.last_inference_ms == -1.0
    model.classify(photos[1].image, labels=labels + ["car"])
    assert model.text_backend.last_inference_ms > 0


def test_default_labels_when_none_given(model, photos):
    preds = model.classify(photos[4].image, color="rgb", top_k=1)
    assert preds[0].label == "espresso"
    assert len(model.default_labels) == len(set(model.default_labels)) > 900


def test_text_embeddings_match_sentence_transformers(model):
    from sentence_transformers import SentenceTransformer

    from edgemm.export.models.text import minilm_dir

    texts = list(SAMPLE_SENTENCES)
    ref = SentenceTransformer(str(minilm_dir()), device="cpu").encode(texts, normalize_embeddings=True)
    ours = model.embed_texts(texts, batch_size=3)  # several batches, sorted by length inside
    assert ours.shape == (len(texts), 384)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_text_to_image_search_finds_the_right_photo(model, photos):
    index = edgemm.VectorIndex(dim=model.dim)
    index.add(model.embed_images([p.image for p in photos], color="rgb"), ids=[p.name for p in photos])
    hits = index.search(model.embed_texts(["an espresso in a cup", "a rocket launch"]), k=1)
    assert [h[0].id for h in hits] == ["skimage.coffee", "skimage.rocket"]


@pytest.mark.parametrize(("call", "message"), [
    (lambda m, f: m.classify(f, labels=[]), "labels is empty"),
    (lambda m, f: m.classify(f, labels=["cat", "cat"]), "more than once"),
    (lambda m, f: m.classify(f, labels=["cat", "  "]), "empty or blank"),
    (lambda m, f: m.classify(f, labels="cat"), "wrap it in a list"),
    (lambda m, f: m.classify(f, labels=["cat", 3]), "label 1 is int"),
    (lambda m, f: m.classify(f, labels=["cat"], top_k=0), "top_k must be a positive integer"),
    (lambda m, f: m.classify(np.zeros((4, 4, 5), np.uint8), labels=["cat"]), "expected shape"),
    (lambda m, f: m.classify([f, np.zeros((0, 0, 3), np.uint8)], labels=["cat"]), "image 1.*empty"),
    (lambda m, f: m.classify(f.astype(np.float32), labels=["cat"]), "dtype uint8"),
    (lambda m, f: m.embed_images([f, f, np.zeros((3, 3, 5), np.uint8)], batch_size=2), "image 2: expected shape"),
    (lambda m, f: m.embed_images([]), "no images"),
    (lambda m, f: m.embed_images(f), "takes a list of images"),
    (lambda m, f: m.embed_texts([]), "no texts"),
    (lambda m, f: m.embed_texts("hello"), "wrap it in a list"),
    (lambda m, f: m.embed_texts(None), "takes a list of texts, got NoneType"),
    (lambda m, f: m.embed_texts(["fine", "caf\udce9"]), "text 1 .* lone surrogate"),
    (lambda m, f: m.classify(f, labels=["cat", "caf\udce9"]), "lone surrogate"),
    (lambda m, f: m.embed_images([f], batch_size=0), "batch_size must be a positive integer"),
])
def test_bad_input_raises_input_error(model, call, message):
    frame = np.zeros((48, 64, 3), np.uint8)
    with pytest.raises(edgemm.InputError, match=message):
        call(model, frame)


def test_load_errors(tmp_path, default_bundle):
    with pytest.raises(edgemm.BundleError, match="does not exist"):
        edgemm.load(tmp_path / "missing")
    with pytest.raises(edgemm.BackendError, match="edgemm\\[gpu\\]"):
        edgemm.load(default_bundle, providers=("cuda",))


def test_load_without_path_uses_the_default_home(default_bundle, tmp_path, monkeypatch):
    import shutil

    shutil.copytree(default_bundle, tmp_path / "bundles" / "default")
    monkeypatch.setenv("EDGEMM_HOME", str(tmp_path))
    model = edgemm.load(threads=1)
    assert model.bundle.path == tmp_path / "bundles" / "default"


# -- the manifest is checked against the graphs themselves ------------------------------------


def _edit_manifest(path, change):
    data = json.loads((path / "manifest.json").read_text())
    change(data)
    (path / "manifest.json").write_text(json.dumps(data))


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(embedding_dim=512), "embedding_dim' is 512, but graph 'image_encoder' outputs 384-wide"),
    (lambda d: d["image"].update(size=256), "image.size' is 256, but the image graph takes 'pixels'"),
    (lambda d: d["scoring"].update(class_output="logits"), "scoring.class_output' reads output 'logits'"),
    (lambda d: d["graphs"]["text_encoder"]["inputs"].pop(), "graphs.text_encoder.inputs' are \\['input_ids'\\], "
                                                           "but the graph takes"),
    (lambda d: d["graphs"]["image_encoder"]["inputs"][0].update(dtype="float16"), "is declared float16"),
    (lambda d: d["text"].update(max_length=4096), "text graph fails on a text of text.max_length=4096 tokens"),
])
def test_manifest_values_that_contradict_the_graphs_are_refused_at_load(bundle_copy, change, message):
    _edit_manifest(bundle_copy, change)
    with pytest.raises(edgemm.BundleError, match=message):
        edgemm.load(bundle_copy, threads=1)


def test_class_embeddings_of_the_wrong_shape_are_refused(bundle_copy):
    from edgemm.runtime.bundle import sha256_file

    path = bundle_copy / "class_embeddings.npy"
    np.save(path, np.load(path)[:10])
    _edit_manifest(bundle_copy, lambda d: d["files"].update({"class_embeddings.npy": sha256_file(path)}))
    with pytest.raises(edgemm.BundleError, match=r"class_embeddings has shape \(10, 384\).*1000 classes"):
        edgemm.load(bundle_copy, threads=1)


def test_label_cache_is_safe_when_another_thread_evicts_between_lookup_and_reorder(default_bundle, monkeypatch):
    """Reproduces the race by widening the gap between get() and move_to_end(); without the lock: KeyError."""
    import threading
    import time
    from collections import OrderedDict

    import edgemm._model

    class SlowReorder(OrderedDict):
        def move_to_end(self, key, last=True):
            time.sleep(0.002)  # another thread's eviction lands here
            super().move_to_end(key, last)

    monkeypatch.setattr(edgemm._model, "_LABEL_CACHE_SIZE", 1)
    model = edgemm.load(default_bundle, threads=1)
    model._label_cache = SlowReorder()
    errors, stop = [], threading.Event()

    def hit_one_set():
        try:
            while not stop.is_set():
                model.label_weights(["cat", "dog"])
        except Exception as e:  # noqa: BLE001 - the test reports whatever escapes
            errors.append(e)

    def evict():
        try:
            for i in range(40):
                model.label_weights([f"thing {i}"])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    readers = [threading.Thread(target=hit_one_set) for _ in range(2)]
    for t in readers:
        t.start()
    evict()
    stop.set()
    for t in readers:
        t.join()
    assert errors == []
