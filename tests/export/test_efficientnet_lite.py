"""EfficientNet-Lite0 rebuilt from the packaged state dict, checked on real photos."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgemm.export.models.dual_encoder import imagenet_class_names, reference_pixels
from edgemm.export.models.efficientnet_lite import _same_pads, efficientnet_lite0


@pytest.mark.parametrize(("size", "kernel", "stride", "pads"), [
    (224, 3, 2, (0, 1)),  # TensorFlow pads strided convs only at the end
    (112, 3, 1, (1, 1)),
    (56, 5, 2, (1, 2)),
    (7, 1, 1, (0, 0)),
])
def test_same_padding_matches_tensorflow(size, kernel, stride, pads):
    assert _same_pads(size, kernel, stride) == pads


def test_packaged_weights_load_strictly_and_classify_real_photos(photos):
    model = efficientnet_lite0()  # load_state_dict(strict=True) inside
    names = imagenet_class_names()
    by_name = {p.name: p.image for p in photos}
    pixels = torch.from_numpy(reference_pixels([by_name[n] for n in ("skimage.chelsea", "skimage.coffee", "skimage.rocket")]))
    with torch.no_grad():
        top = model(pixels).softmax(-1).topk(3).indices.numpy()
    cat_classes = {"tabby cat", "tiger cat", "Egyptian Mau", "a cat having a striped coat"}
    assert {names[i] for i in top[0]} & cat_classes
    assert names[top[1][0]] == "espresso"
    assert names[top[2][0]] in {"missile", "projectile"} or "missile" in {names[i] for i in top[2]}


def test_batchnorm_uses_tensorflow_epsilon():
    model = efficientnet_lite0(pretrained=False)
    eps = {m.eps for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert eps == {1e-3}
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(4.65e6, rel=0.02)
    assert np.isclose(model(torch.zeros(1, 3, 224, 224)).shape[1], 1000)
