"""Text-tower distillation: students by layer selection, losses, corpora, training, checkpoints and resume.

Real parts only: the packaged all-MiniLM-L6-v2 for the BERT layout and the tiny
CLIP checkpoint (real transformers classes and CLIP tokenizer, random weights)
for training, which keeps the file fast on two cores.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from edgemm.export.distill import (
    CHECKPOINT_NAME,
    DEFAULT_STUDENT,
    DistillOptions,
    LabelScorer,
    StudentSpec,
    cross_modal_kl,
    default_layer_selection,
    default_text_corpus,
    distill_text,
    embedding_loss,
    label_kl,
    list_text_students,
    load_checkpoint,
    parse_student_spec,
    read_corpus,
    similarity_kl,
    split_corpus,
    text_student,
    tower_layers,
)
from edgemm.export.models.dual_encoder import imagenet_class_names
from edgemm.runtime.errors import ExportError, InputError

# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def minilm():
    from edgemm.export.models.text import minilm_l6

    return minilm_l6()


@pytest.fixture(scope="module")
def tiny(tiny_clip_dir):
    from edgemm.export.models.clip import Checkpoint

    return Checkpoint(tiny_clip_dir)


@pytest.fixture(scope="module")
def texts():
    """Real short texts: ImageNet names, bare and in two prompts; 60 names held out."""
    names = imagenet_class_names()[:180]
    train = [t.format(n) for n in names[:120] for t in ("{}", "a photo of a {}.")]
    held_out = [t.format(n) for n in names[120:] for t in ("{}", "a photo of a {}.")]
    return train, held_out


FAST = DistillOptions(epochs=3, batch_size=16, lr=2e-3, warmup=0.1, patience=0, checkpoint_every=4)


def _layers(tower):
    return tower.text.encoder.layers if hasattr(tower, "text") else tower.encoder.encoder.layer


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------------------------- students


def test_default_layer_selection_spreads_and_keeps_ends():
    assert default_layer_selection(6, 3) == [0, 2, 5]
    assert default_layer_selection(6, 2) == [0, 5]
    assert default_layer_selection(6, 4) == [0, 2, 3, 5]
    assert default_layer_selection(6, 1) == [5]
    assert default_layer_selection(12, 4) == [0, 4, 7, 11]


def test_minilm_student_keeps_the_teachers_layers(minilm):
    student = text_student(minilm, [0, 2, 5])
    assert tower_layers(student) == 3 and tower_layers(minilm) == 6  # the teacher is untouched
    assert student.encoder.config.num_hidden_layers == 3 and minilm.encoder.config.num_hidden_layers == 6
    for kept, source in zip(_layers(student), (0, 2, 5)):
        assert _same_weights(kept, _layers(minilm)[source])
    assert _same_weights(student.encoder.embeddings, minilm.encoder.embeddings)
    ids = torch.tensor([[101, 1037, 6302, 1997, 1037, 4937, 102]])
    out = student(ids, torch.ones_like(ids))
    assert out.shape == (1, 384) and torch.allclose(out.norm(dim=-1), torch.ones(1))


def test_minilm_student_with_narrower_ffn_keeps_the_strongest_neurons(minilm):
    student = text_student(minilm, 3, ffn=768)
    for kept, source in zip(_layers(student), default_layer_selection(6, 3)):
        teacher_layer = _layers(minilm)[source]
        up, down = teacher_layer.intermediate.dense, teacher_layer.output.dense
        assert kept.intermediate.dense.weight.shape == (768, 384) and kept.output.dense.weight.shape == (384, 768)
        score = up.weight.norm(dim=1) * down.weight.norm(dim=0)
        index = score.topk(768).indices.sort().values
        assert torch.equal(kept.intermediate.dense.weight, up.weight[index])
        assert torch.equal(kept.output.dense.weight, down.weight[:, index])
        assert torch.equal(kept.output.dense.bias, down.bias)
    assert student.encoder.config.intermediate_size == 768


def test_clip_student_keeps_the_teachers_layers(tiny):
    teacher = tiny.text_tower
    student = text_student(teacher, 1, ffn=64)
    assert tower_layers(student) == 1 and tower_layers(teacher) == 2
    kept = _layers(student)[0]
    assert kept.mlp.fc1.out_features == 64 and student.text.config.intermediate_size == 64
    assert torch.equal(kept.self_attn.q_proj.weight, _layers(teacher)[1].self_attn.q_proj.weight)
    assert _same_weights(student.projection, teacher.projection)
    feeds = tiny.feeds(["a photo of a cat", "a red car parked on a wet street at night"])
    out = student(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    assert out.shape == (2, tiny.embedding_dim)


@pytest.mark.parametrize("layers, ffn, message", [
    (6, None, "layers must be 1 to 5"),
    (0, None, "layers must be 1 to 5"),
    ([0, 6], None, "out of range"),
    ([0, 0, 5], None, "repeat a layer"),
    ([5, 0], None, "not increasing"),
    ([], None, "empty list"),
    ([0, 1, 2, 3, 4, 5], None, "keep all 6"),
    ("3", None, "layer count or a list"),
    (3, 1536, "ffn must be a width from 1 to 1535"),
    (3, 0, "ffn must be a width"),
])
def test_bad_student_specs_say_what_to_do(minilm, layers, ffn, message):
    with pytest.raises(InputError, match=message):
        text_student(minilm, layers, ffn)


def test_a_module_that_is_no_text_tower_is_refused():
    with pytest.raises(ExportError, match="not a text tower"):
        text_student(torch.nn.Linear(4, 4), 1)


def test_student_specs_parse_from_the_command_line():
    assert parse_student_spec("layers=3") == StudentSpec(layers=3)
    assert parse_student_spec("layers=0,2,5,ffn=768") == StudentSpec(layers=(0, 2, 5), ffn=768)
    assert parse_student_spec(" layers = 2 , ffn = 512 ") == StudentSpec(layers=2, ffn=512)
    assert DEFAULT_STUDENT in list_text_students()
    assert parse_student_spec(DEFAULT_STUDENT) == StudentSpec(layers=(0, 2, 5), ffn=1280)
    for name in list_text_students():
        assert isinstance(parse_student_spec(name), StudentSpec)
    for bad, message in (("depth=3", "unknown key"), ("layers=x", "integers"), ("ffn=768", "which layers"),
                         ("small", "neither a preset"), ("layers=3,layers=4", "repeated key")):
        with pytest.raises(InputError, match=message):
            parse_student_spec(bad)


# ----------------------------------------------------------------------------------------------- losses


def test_losses_are_zero_for_identical_embeddings_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    t = F.normalize(torch.randn(8, 16, generator=g), dim=-1)
    s = F.normalize(t + 0.5 * torch.randn(8, 16, generator=g), dim=-1)
    other = F.normalize(torch.randn(20, 16, generator=g), dim=-1)
    assert float(embedding_loss(t, t, mse_weight=1.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(similarity_kl(t, t, 0.05)) == 0.0
    assert float(cross_modal_kl(t, t, other, 0.05)) == 0.0
    assert float(embedding_loss(s, t)) > 0.01
    assert float(embedding_loss(s, t, mse_weight=1.0)) > float(embedding_loss(s, t))
    assert float(similarity_kl(s, t, 0.05)) > 0.01
    assert float(cross_modal_kl(s, t, other, 0.05)) > 0.01
    assert float(similarity_kl(s[:1], t[:1], 0.05)) == 0.0  # no pairs in a batch of one


def test_similarity_kl_sees_only_the_structure():
    """A rotated copy has the teacher's similarities exactly: no structure loss, but an embedding loss."""
    g = torch.Generator().manual_seed(1)
    t = F.normalize(torch.randn(8, 16, generator=g), dim=-1)
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    s = t @ rotation
    assert float(similarity_kl(s, t, 0.05)) == pytest.approx(0.0, abs=1e-5)
    assert float(embedding_loss(s, t)) > 0.5


# ----------------------------------------------------------------------------------------------- data


@pytest.mark.parametrize("bundle_fixture", ["default_bundle", "tiny_clip_bundle"])
def test_the_label_score_loss_scores_labels_as_the_runtime_does(bundle_fixture, request, photos):
    """LabelScorer on a bundle's own image outputs reproduces DualEncoder.scores, for class-space and cosine."""
    import numpy as np

    import edgemm
    from edgemm._distill import label_scorer
    from edgemm.runtime.bundle import Bundle

    bundle = Bundle(request.getfixturevalue(bundle_fixture))
    model = edgemm.DualEncoder(bundle, threads=1)
    model.grounding_weight = 0.0  # WordNet grounding's class masses do not depend on the text tower being distilled
    images = [p.image for p in photos[:6]]
    labels = ["a cat", "a rocket", "a cup of coffee", "a person", "a clock"]
    out = model._run_images(images, "rgb", 8)
    s = bundle.manifest.scoring
    if s.kind == "class_space":
        scorer = LabelScorer.from_arrays("class_space", out[s.class_output], model._class_embeddings, 1 / s.tau)
    else:
        scorer = LabelScorer.from_arrays("cosine", out["embedding"], None, s.logit_scale)
    ours = scorer.log_probs(torch.from_numpy(model.embed_texts([model.prompt.format(x) for x in labels]))).exp()
    np.testing.assert_allclose(ours.numpy(), model.scores(images, labels, color="rgb"), atol=2e-5)
    assert label_scorer(bundle, threads=1).kind == s.kind  # what edgemm distill builds, on calibration images


def test_label_kl_is_zero_for_the_teacher_and_pulls_the_student_towards_its_decisions():
    torch.manual_seed(0)
    classes = F.normalize(torch.randn(50, 16), dim=-1)
    probs = torch.softmax(3 * torch.randn(20, 50), dim=1)
    scorer = LabelScorer.from_arrays("class_space", probs.numpy(), classes.numpy(), 20.0)
    teacher = F.normalize(torch.randn(8, 16), dim=-1)
    assert float(label_kl(teacher, teacher, scorer)) == pytest.approx(0.0, abs=1e-6)
    student = F.normalize(teacher + 0.5 * torch.randn(8, 16), dim=-1).requires_grad_()
    loss = label_kl(student, teacher, scorer)
    loss.backward()
    assert float(loss.detach()) > 0 and student.grad.abs().sum() > 0
    with pytest.raises(InputError, match="sigmoid labels are independent"):
        LabelScorer.from_arrays("sigmoid", probs.numpy(), None, 1.0)


def test_label_kl_without_a_scorer_is_refused(tiny, texts):
    train, held_out = texts
    with pytest.raises(InputError, match="label_kl_weight needs a label_scorer"):
        distill_text(tiny.text_tower, tiny.feeds, _student(tiny), train, held_out,
                     DistillOptions(label_kl_weight=1.0))


def test_read_corpus_from_a_file_and_a_folder(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text("a cat\n\n  a   dog  \na cat\n\t\nforklift\n", encoding="utf-8")
    corpus = read_corpus(f)
    assert corpus.texts == ("a cat", "a dog", "forklift") and len(set(corpus.groups)) == 3
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("second file\n", encoding="utf-8")
    (folder / "a.txt").write_text("first file\n", encoding="utf-8")
    (folder / "sub" / "c.txt").write_text("nested\nfirst file\n", encoding="utf-8")
    (folder / "notes.md").write_text("not a text file", encoding="utf-8")
    assert read_corpus(folder).texts == ("first file", "second file", "nested")


def test_bad_corpora_are_refused(tmp_path):
    (tmp_path / "blank.txt").write_text("\n  \n", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    (tmp_path / "empty").mkdir()
    for path, message in ((tmp_path / "blank.txt", "holds no text"), (tmp_path / "latin1.txt", "not UTF-8"),
                          (tmp_path / "empty", "no .txt files"), (tmp_path / "missing.txt", "does not exist")):
        with pytest.raises(InputError, match=message):
            read_corpus(path)
    with pytest.raises(InputError, match="empty"):
        split_corpus([], 0.1)
    with pytest.raises(InputError, match="Give at least 10 distinct texts"):
        split_corpus(["one", "two", "three"], 0.1)
    with pytest.raises(InputError, match=r"in \(0, 1\)"):
        split_corpus(["one", "two", "three"], 1.0)


def test_default_corpus_split_keeps_classes_apart():
    corpus = default_text_corpus()
    assert 10_000 < len(corpus) < 20_000 and len(set(corpus.texts)) == len(corpus)
    assert "tench" in corpus.texts and "a photo of a cat" in corpus.texts  # a sample sentence
    train, held_out = split_corpus(corpus, 0.1, seed=0)
    assert len(held_out) == pytest.approx(0.1 * len(corpus), rel=0.05)
    group = dict(zip(corpus.texts, corpus.groups))
    assert not {group[t] for t in train} & {group[t] for t in held_out}
    assert split_corpus(corpus, 0.1, seed=0) == (train, held_out)  # deterministic
    assert split_corpus(corpus, 0.1, seed=1)[1] != held_out


# ----------------------------------------------------------------------------------------------- training


def _student(tiny):
    return text_student(tiny.text_tower, 1)


def test_training_brings_the_student_closer_on_held_out_texts(tiny, texts):
    train, held_out = texts
    before = torch.get_rng_state()
    student, report = distill_text(tiny.text_tower, tiny.feeds, _student(tiny), train, held_out, FAST)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG is left alone
    first, best = report.history[0], report.history[report.best_epoch]
    assert report.best_epoch >= 1 and best["held_out_loss"] < 0.8 * first["held_out_loss"]
    assert report.held_out_mean_cosine > report.initial_mean_cosine
    assert report.steps == 3 * 15 and report.epochs_run == 3 and not student.training
    assert all(p.requires_grad for p in student.parameters())  # frozen embeddings are handed back trainable
    assert set(report.to_dict()) >= {"held_out_mean_cosine", "held_out_worst_cosine", "history", "options"}


def test_resume_after_an_interruption_gives_the_same_weights(tiny, texts, tmp_path):
    train, held_out = texts
    whole, whole_report = distill_text(tiny.text_tower, tiny.feeds, _student(tiny), train, held_out, FAST,
                                       checkpoint_dir=tmp_path / "whole")

    def interrupt(epoch, step, total, metrics):
        if step == 22 and "loss" in metrics:  # mid-epoch 2, two steps after the checkpoint at step 20
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill_text(tiny.text_tower, tiny.feeds, _student(tiny), train, held_out, FAST,
                     checkpoint_dir=tmp_path / "cut", progress=interrupt)
    assert load_checkpoint(tmp_path / "cut")["state"]["step"] == 20
    assert len(list((tmp_path / "cut").glob("teacher-*.pt"))) == 2  # train and held-out embeddings, reused on resume
    steps = []
    resumed, report = distill_text(tiny.text_tower, tiny.feeds, _student(tiny), train, held_out, FAST,
                                   checkpoint_dir=tmp_path / "cut", resume=True,
                                   progress=lambda e, s, t, m: steps.append(s))
    assert steps[0] == 21 and report.resumed_from_step == 20
    assert _same_weights(resumed, whole)
    assert report.history == whole_report.history and report.best_epoch == whole_report.best_epoch


def test_resume_with_other_texts_or_options_is_refused(tiny, texts, tmp_path):
    train, held_out = texts
    options = DistillOptions(epochs=1, max_steps=2, batch_size=16, checkpoint_every=1)
    distill_text(tiny.text_tower, tiny.feeds, _student(tiny), train, held_out, options, checkpoint_dir=tmp_path)
    assert (tmp_path / CHECKPOINT_NAME).is_file()
    with pytest.raises(InputError, match="training or held-out data differ"):
        distill_text(tiny.text_tower, tiny.feeds, _student(tiny), train[:-2], held_out, options,
                     checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(InputError, match="training options differ: batch_size 16 then, 8 now"):
        distill_text(tiny.text_tower, tiny.feeds, _student(tiny), train, held_out,
                     DistillOptions(epochs=1, max_steps=2, batch_size=8), checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(InputError, match="student is not built the same way"):
        distill_text(tiny.text_tower, tiny.feeds, text_student(tiny.text_tower, [0]), train, held_out, options,
                     checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(InputError, match="already holds a checkpoint"):
        distill_text(tiny.text_tower, tiny.feeds, _student(tiny), train, held_out, options, checkpoint_dir=tmp_path)
    with pytest.raises(InputError, match="holds no distillation checkpoint"):
        distill_text(tiny.text_tower, tiny.feeds, _student(tiny), train, held_out, options,
                     checkpoint_dir=tmp_path / "new", resume=True)


def test_bad_training_inputs_are_refused(tiny, texts):
    train, held_out = texts
    with pytest.raises(InputError, match="no training texts"):
        distill_text(tiny.text_tower, tiny.feeds, _student(tiny), [], held_out, FAST)
    with pytest.raises(InputError, match="no held-out texts"):
        distill_text(tiny.text_tower, tiny.feeds, _student(tiny), train, [], FAST)
    with pytest.raises(InputError, match="other_embeddings must be"):
        distill_text(tiny.text_tower, tiny.feeds, _student(tiny), train, held_out, FAST,
                     other_embeddings=torch.zeros(5, 7))
    with pytest.raises(InputError, match="batch_size must be at least 1"):
        DistillOptions(batch_size=0)
    with pytest.raises(InputError, match="unknown distill options"):
        DistillOptions.from_dict({"epochs": 1, "learning_rate": 1e-3})
