"""The packaged evaluation data: emoji drawn from the Debian font, with their names."""

from __future__ import annotations

import numpy as np
import pytest

from edgemm.runtime.datasets import EMOJI_FONT, emoji
from edgemm.runtime.errors import InputError


@pytest.mark.skipif(not EMOJI_FONT.is_file(), reason="apt-get install fonts-noto-color-emoji (scripts/test does)")
def test_emoji_are_coloured_images_with_their_names():
    pairs = emoji()
    assert len(pairs) > 1000
    names = dict(pairs)
    cat = names["cat face"]
    assert cat.shape == (128, 136, 3) and cat.dtype == np.uint8
    assert np.abs(cat.astype(int) - names["rocket"].astype(int)).mean() > 10  # different drawings
    assert len(names) == len(pairs)  # names are unique captions


def test_missing_font_names_the_package(tmp_path):
    with pytest.raises(InputError, match="fonts-noto-color-emoji"):
        emoji(tmp_path / "none.ttf")
