"""Zero-shot accuracy on the full Fashion-MNIST test set (slow: ~4 min on 2 cores)."""

from __future__ import annotations

import pytest

from edgemm._eval import eval_fashion_mnist


@pytest.mark.slow
def test_fashion_mnist_full_test_set_reaches_35_percent(model):
    result = eval_fashion_mnist(model)
    assert result["images"] == 10_000
    assert result["top1"] >= 0.35, result["per_class_top1"]
