"""Heatmaps of captured maps (videograin_core.capture.render): one image per map per
frame, hot where the map is high, the word written on it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from videograin_core.capture.render import colormap, draw_label, heatmap_images, normalise

F_, H_, W_ = 3, 64, 96


def synthetic():
    """'man' high in the top-right quarter of every frame, 'dog' in the bottom-left."""
    man = torch.full((F_, 8, 12), 0.01)
    man[:, :4, 6:] = 0.3
    dog = torch.full((F_, 8, 12), 0.02)
    dog[:, 4:, :6] = 0.1
    return {"man": man, "dog": dog}


def test_shape_and_order():
    frames = torch.rand(F_, H_, W_, 3)
    out = heatmap_images(synthetic(), frames, 0.6)
    assert out.shape == (2 * F_, H_, W_, 3) and out.dtype == torch.float32
    assert float(out.min()) >= 0 and float(out.max()) <= 1


def test_heat_where_the_map_is_high():
    frames = torch.full((F_, H_, W_, 3), 0.5)
    out = heatmap_images(synthetic(), frames, 0.8, label=False)
    man = out[:F_]
    hot = man[:, 4:28, 60:92]           # inside the high quarter, away from the blurred border
    cold = man[:, 40:, :40]
    assert float(hot[..., 0].mean()) > 0.75 and float(hot[..., 2].mean()) < 0.2   # red
    assert float(cold[..., 2].mean()) > 0.25 and float(cold[..., 0].mean()) < 0.15  # blue
    dog = out[F_:]
    assert float(dog[:, 40:, 4:40, 0].mean()) > float(dog[:, 4:28, 60:92, 0].mean()) + 0.5


def test_the_word_is_written_on_each_image():
    frames = torch.full((F_, H_, W_, 3), 0.5)
    plain = heatmap_images(synthetic(), frames, 0.6, label=False)
    labelled = heatmap_images(synthetic(), frames, 0.6)
    diff = (labelled - plain).abs().amax(-1) > 0.02                # [2F, H, W]
    assert bool(diff[:, : H_ // 2, : W_ // 2].any(-1).any(-1).all()), "every image has its label"
    assert not bool(diff[:, H_ // 2:, :].any()) and not bool(diff[:, :, W_ // 2 + 8:].any()), "top-left only"
    white = (labelled > 0.98).all(-1)
    assert bool(white[:, :20, :40].any(-1).any(-1).all()), "white text pixels in the label box"
    # the two words are written differently
    assert not torch.equal(diff[0], diff[F_])


def test_label_font_without_system_fonts():
    img = np.zeros((40, 120, 3), np.uint8)
    out = draw_label(img.copy(), "person")
    assert (out == 255).all(-1).sum() > 15


def test_normalise_over_the_whole_clip_and_colours():
    m = torch.tensor([[[0.0, 1.0]], [[2.0, 4.0]]])
    n = normalise(m)
    assert torch.allclose(n.flatten(), torch.tensor([0.0, 0.25, 0.5, 1.0]))
    assert torch.equal(normalise(torch.ones(2, 2, 2)), torch.zeros(2, 2, 2))
    c = colormap(torch.tensor([0.0, 1.0]))
    assert c[0, 2] > c[0, 0] and c[1, 0] > c[1, 2]


def test_frame_count_must_match():
    with pytest.raises(ValueError, match="images has 2 frames but the captured maps have 3"):
        heatmap_images(synthetic(), torch.rand(2, H_, W_, 3))
