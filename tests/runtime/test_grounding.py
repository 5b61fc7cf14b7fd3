"""Labels grounded in WordNet (runtime/grounding.py) over the default bundle's ImageNet classes."""

import json
from pathlib import Path

import numpy as np
import pytest

import edgemm
from edgemm.runtime.grounding import LabelGrounding

TABLE = Path(__file__).resolve().parents[2] / "export" / "models" / "data" / "imagenet_wordnet.json"


@pytest.fixture(scope="module")
def grounding():
    return LabelGrounding(json.loads(TABLE.read_text()), 1000)


@pytest.mark.skipif(not Path("/usr/share/wordnet/data.noun").exists(), reason="WordNet (wordnet-base) not installed")
def test_the_committed_table_is_the_scripts():
    import runpy

    script = runpy.run_path(str(Path(__file__).resolve().parents[2] / "scripts" / "make_wordnet_table.py"))
    assert json.loads(TABLE.read_text()) == script["table"]()


@pytest.mark.parametrize("label, synset", [
    ("person", "n00007846"), ("a person", "n00007846"), ("People", "n00007846"), ("a woman", "n00007846"),
    ("children", "n00007846"), ("men", "n00007846"), ("an animal", "n00015388"), ("a vehicle", "n04524313"),
    ("a fruit", "n13134947"), ("a musical instrument", "n03800933"), ("a piece of clothing", "n03051540"),
    ("a building", "n02913152"), ("a red car", "n02958343"), ("cats", "n02121620"), ("a photo of a dog", "n02084071"),
    ("buses", "n02924116"), ("tabby cat", "n02123045"),
])
def test_labels_resolve_to_their_synset(grounding, label, synset):
    assert grounding.synset(label) == synset


@pytest.mark.parametrize("label", ["a person riding a bike", "zxqv", "", "!!!", "a photo of"])
def test_free_text_does_not_resolve(grounding, label):
    assert grounding.synset(label) is None


def test_each_class_counts_for_the_most_specific_label(grounding):
    animal, dog, thing = grounding.masks(["an animal", "a dog", "zxqv"])
    assert thing is None
    dogs = grounding.covered("dog")
    assert dog[dogs].all() and dog.sum() == len(dogs)
    assert not animal[dogs].any() and animal.sum() == len(grounding.covered("animal")) - len(dogs)
    alone, = grounding.masks(["an animal"])
    assert alone.sum() == len(grounding.covered("animal"))


def test_an_object_keeps_what_nothing_else_claims(grounding):
    person, animal, vehicle, obj = grounding.masks(["a person", "an animal", "a vehicle", "an object"])
    assert not (obj * (animal + vehicle + person)).any()
    assert obj.sum() > 400


@pytest.mark.parametrize("table, problem", [
    ({"format": 2}, "format 1"),
    ({"format": 1, "classes": 10, "synsets": [], "lemmas": {}}, "image graph has 1000"),
    ({"format": 1, "classes": 1000, "synsets": [["n1", [], [1000]]], "lemmas": {}}, "outside"),
    ({"format": 1, "classes": 1000, "synsets": [["n1", [], [-1]]], "lemmas": {}}, "outside"),
    ({"format": 1, "classes": 1000, "synsets": [["n1", [], ["a"]]], "lemmas": {}}, "outside"),
    ({"format": 1, "classes": 1000, "synsets": [["n1", [], [1]]], "lemmas": {"x": [1]}}, "senses"),
    ({"format": 1, "classes": 1000, "synsets": [["n1", [], [1]]], "lemmas": {"x": [True]}}, "senses"),
    ({"format": 1, "classes": 1000, "synsets": [["n1", [], [1]]], "lemmas": {}, "plurals": {"a": 1}}, "plurals"),
    ([1, 2], "format 1"),
])
def test_hostile_tables_are_refused(table, problem):
    with pytest.raises(edgemm.BundleError, match=problem):
        LabelGrounding(table, 1000)


def test_the_default_bundle_grounds_category_labels(model, photos):
    """The cat photo is an animal among person/animal/vehicle/object, and a cat among cat/dog."""
    assert model.grounding is not None and model.manifest.scoring.hierarchy == "wordnet.json"
    cat = next(p for p in photos if p.name == "skimage.chelsea").image
    assert model.classify(cat, ["a person", "an animal", "a vehicle", "an object"], color="rgb")[0].label == "an animal"
    assert model.classify(cat, ["person", "dog", "cat", "forklift"], color="rgb")[0].label == "cat"
    free = model.scores([cat], ["a person riding a bike", "a bowl of soup"], color="rgb")
    assert np.allclose(free.sum(1), 1.0)


def test_a_bundle_without_the_table_scores_as_before(bundle_copy, photos):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    for field, name in (("hierarchy", "wordnet.json"), ("grounding_prior", "grounding_prior.npy")):  # a schema-3 one
        del manifest["scoring"][field]
        manifest["files"].pop(name, None)
        (bundle_copy / name).unlink()
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    model = edgemm.load(bundle_copy, check_hashes=False)
    assert model.grounding is None
    probs = model.scores([photos[0].image], ["a person", "an animal"], color="rgb")
    assert probs.shape == (1, 2) and np.allclose(probs.sum(), 1.0)


def test_a_hostile_table_in_a_bundle_is_a_bundle_error(bundle_copy):
    (bundle_copy / "wordnet.json").write_text(json.dumps({"format": 1, "classes": 1000, "synsets": [["n", [], [5000]]],
                                                          "lemmas": {}}))
    with pytest.raises(edgemm.BundleError, match="scoring.hierarchy"):
        edgemm.load(bundle_copy, check_hashes=False)


@pytest.mark.parametrize("path", ["../wordnet.json", "/etc/passwd", "missing.json"])
def test_the_table_must_be_a_listed_file_inside_the_bundle(bundle_copy, path):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["scoring"]["hierarchy"] = path
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(edgemm.BundleError, match="scoring.hierarchy"):
        edgemm.load(bundle_copy)


def test_plant_takes_the_first_sense_that_covers_enough_classes(grounding):
    grounding.min_classes = 2
    try:  # "plant" as a factory covers 1 class; as an organism (daisy, lady's slipper) 2
        assert grounding.synset("a plant") == "n03956922" and len(grounding.covered("a plant")) == 2
    finally:
        grounding.min_classes = 1


def test_the_content_free_prior_changes_grounded_scores_only(model, photos):
    outputs = model._run_images([p.image for p in photos], "rgb", 16)
    assert model.grounding_prior_power > 0 and model.grounding_prior.shape == (1000,)
    labels = ["an animal", "a vehicle", "a cup of coffee on a saucer"]  # the last resolves to nothing
    with_prior = model.scores_of(outputs, labels)
    power = model.grounding_prior_power
    model.grounding_prior_power = 0.0
    try:
        without = model.scores_of(outputs, labels)
        text_only = model.scores_of(outputs, ["a cup of coffee on a saucer", "an old red truck driving fast"])
    finally:
        model.grounding_prior_power = power
    assert np.abs(with_prior - without).max() > 1e-3  # the prior moved grounded masses
    assert np.allclose(model.scores_of(outputs, ["a cup of coffee on a saucer", "an old red truck driving fast"]),
                       text_only)  # labels that do not resolve never see it
    assert np.allclose(with_prior.sum(1), 1.0)


@pytest.mark.parametrize("prior, problem", [
    (np.full(999, 1e-3, np.float32), "1000 positive class probabilities"),
    (np.zeros(1000, np.float32), "positive"),
    (np.full((1000, 1), 1e-3, np.float32), "1-D float array"),
    (np.full(1000, np.nan, np.float32), "NaN"),
])
def test_a_hostile_prior_is_a_bundle_error(bundle_copy, prior, problem):
    np.save(bundle_copy / "grounding_prior.npy", prior)
    with pytest.raises(edgemm.BundleError, match=problem):
        edgemm.load(bundle_copy, check_hashes=False)


def test_a_built_in_bundle_from_another_edgemm_is_stale(default_bundle, tmp_path):
    from edgemm._model import _stale_default

    assert _stale_default(tmp_path / "nothing") == "is not built"
    assert _stale_default(default_bundle) is None  # made by this edgemm
    old = tmp_path / "old"
    old.mkdir()
    manifest = json.loads((default_bundle / "manifest.json").read_text())
    manifest["tools"]["edgemm"] = "0.0.1"
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert "built by edgemm 0.0.1" in _stale_default(old)
    (old / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 99}))
    assert "cannot be read" in _stale_default(old) and "newer" in _stale_default(old)
