"""The shipped sample clip and its masks are consistent, small, and reproducible."""
from __future__ import annotations

import glob
import os

import av
import numpy as np
import pytest
from PIL import Image
from vg_testlib import REPO, load_script

DATA = os.path.join(REPO, "example_data")
REGIONS = ("person_left", "person_right", "background", "head_left")


FRAMES, HEIGHT, WIDTH = 24, 256, 256  # as example_data/README.md states


def _frames():
    with av.open(os.path.join(DATA, "vtest_two_people.mp4")) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def test_clip_is_the_stated_h264():
    with av.open(os.path.join(DATA, "vtest_two_people.mp4")) as c:
        s = c.streams.video[0]
        assert (s.codec_context.name, s.format.name) == ("h264", "yuv420p")
        assert (s.height, s.width) == (HEIGHT, WIDTH)
    frames = _frames()
    assert len(frames) == FRAMES
    assert all(f.shape == (HEIGHT, WIDTH, 3) for f in frames)


def _masks(region):
    files = sorted(glob.glob(os.path.join(DATA, "masks", region, "*.png")))
    return [np.array(Image.open(f).convert("L")) for f in files]


def test_clip_and_masks_line_up():
    frames = _frames()
    assert len(frames) >= 16
    h, w, _ = frames[0].shape
    assert h % 8 == 0 and w % 8 == 0
    masks = {r: _masks(r) for r in REGIONS}
    for r, ms in masks.items():
        assert len(ms) == len(frames), r
        for m in ms:
            assert m.shape == (h, w)
            assert set(np.unique(m)) <= {0, 255}
    for i in range(len(frames)):
        left, right, bg, head = (masks[r][i] > 0 for r in REGIONS)
        assert left.sum() > 200 and right.sum() > 200, i
        assert not (left & right).any(), i
        assert np.array_equal(bg, ~(left | right)), i
        assert head.any() and not (head & ~left).any(), i
        # identities stay on their side
        assert np.nonzero(left)[1].mean() < np.nonzero(right)[1].mean(), i


def test_sample_data_is_small():
    total = sum(os.path.getsize(p) for p in glob.glob(os.path.join(DATA, "**", "*"), recursive=True) if os.path.isfile(p))
    assert total < 1_000_000, total


def test_script_reproduces_the_masks(tmp_path):
    maker = load_script("make_sample_clip")
    try:
        source = maker.find_source()
    except SystemExit:
        pytest.skip("vtest.avi is not on this machine (apt-get install opencv-doc): reproduction not checked")
    maker.make(source, str(tmp_path))
    for r in REGIONS:
        mine = sorted(os.listdir(os.path.join(DATA, "masks", r)))
        assert mine == sorted(os.listdir(tmp_path / "masks" / r))
        # the pixels, not the PNG bytes: another libpng/zlib in OpenCV may pack the same image otherwise
        differ = [n for n in mine if not np.array_equal(np.asarray(Image.open(os.path.join(DATA, "masks", r, n))),
                                                        np.asarray(Image.open(tmp_path / "masks" / r / n)))]
        assert not differ, (r, differ)
    with av.open(str(tmp_path / "vtest_two_people.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == len(_frames())
