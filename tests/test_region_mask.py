"""Region masks line up with the frames: the Video Loader's frame selection, resize and
crop are applied to masks from any host MASK, mask videos, PNG sequences and single
images; paths stay inside the input folder."""
from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch
from vg_testlib import pack_modules


@pytest.fixture(scope="module")
def core(comfy_host):
    return pack_modules(comfy_host, ft="videograin_core.video.frame_transform", rm="videograin_core.video.region_masks",
                        layout="videograin_core.prompts.layout")


def _node(comfy_host, node_id):
    return comfy_host.nodes.NODE_CLASS_MAPPINGS[node_id]


def _run(cls, **kw):
    out = cls.execute(**kw)
    return out.args if hasattr(out, "args") else out.result


def _source_masks(frames=6, w=40, h=24):
    """Distinct per-frame masks at source size: a block that moves right each frame."""
    m = torch.zeros(frames, h, w)
    for i in range(frames):
        m[i, 4:20, 2 + 4 * i: 14 + 4 * i] = 1.0
    return m


def _transform(core, **kw):
    # A non-square source, resized (short side 16) and centre-cropped, every 2nd frame.
    args = dict(skip_first=1, every_nth=2, frame_cap=0, short_side=16, crop="center")
    args.update(kw)
    return core.ft.plan_transform((40, 24), 6, **args)


def _expected(t, masks):
    sel = masks[list(t.frame_indices)]
    return t.apply_spatial(sel[:, None], mode="nearest")[:, 0] > 0.5


def test_host_mask_at_source_size_gets_the_frames_transform(comfy_host, core):
    t = _transform(core)
    assert t.frame_indices == (1, 3, 5) and t.size == (24, 16)  # 40x24 -> 27x16 -> crop 24x16
    masks = _source_masks() * 0.8  # soft values: binarised at the threshold
    (out,) = _run(_node(comfy_host, "VideoGrainRegionMask"), mask=masks, transform=t, threshold=0.5)
    assert out.shape == (3, 16, 24) and out.dtype == torch.float32
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(out.bool(), _expected(t, masks))
    # the crop offset matters: a plain resize without the crop would not line up
    plain = torch.nn.functional.interpolate(masks[[1, 3, 5], None], size=(16, 24), mode="nearest-exact")[:, 0] > 0.5
    assert not torch.equal(out.bool(), plain)
    # threshold is honoured
    (none,) = _run(_node(comfy_host, "VideoGrainRegionMask"), mask=masks, transform=t, threshold=0.9)
    assert none.sum() == 0


def test_frames_selected_or_passed_or_broadcast(comfy_host, core):
    node = _node(comfy_host, "VideoGrainRegionMask")
    t = _transform(core)
    loaded = torch.zeros(3, 16, 24)
    loaded[1, 2:5, 3:9] = 1
    (out,) = _run(node, mask=loaded, transform=t, threshold=0.5)
    assert torch.equal(out, loaded)  # already the loaded frames' count and size: passes through
    (one,) = _run(node, mask=_source_masks()[:1], transform=t, threshold=0.5)
    assert one.shape == (1, 16, 24)  # one mask for every frame
    with pytest.raises(ValueError, match=r"mask has 4 frames but the video has 6 source frames \(3 loaded\)"):
        _run(node, mask=torch.zeros(4, 24, 40), transform=t, threshold=0.5)
    with pytest.raises(ValueError, match=r"mask is 30x20 but the video's source frames are 40x24 and the loaded frames 24x16"):
        _run(node, mask=torch.zeros(3, 20, 30), transform=t, threshold=0.5)


def test_crop_none_and_square(comfy_host, core):
    node = _node(comfy_host, "VideoGrainRegionMask")
    masks = _source_masks()
    for crop in ("none", "center_square"):
        t = _transform(core, crop=crop, skip_first=0, every_nth=1)
        (out,) = _run(node, mask=masks, transform=t, threshold=0.5)
        assert tuple(out.shape[1:]) == (t.size[1], t.size[0])
        assert torch.equal(out.bool(), _expected(t, masks))


def source_frame(i, h, w):
    """A soft block that moves with the frame index, at source size."""
    m = torch.zeros(h, w)
    m[100 + 5 * i: 700 + 5 * i, 200 + 10 * i: 900 + 10 * i] = 0.8
    return m


_MEASURE = """
import json, sys, torch
from proc_memory import peak_rss_bytes, settle_and_reset_peak
from videograin_core.video import frame_transform as ft, region_masks as rm
w, h, n = 1920, 1080, 120
t = ft.plan_transform((w, h), n, skip_first=0, every_nth=4, frame_cap=0, short_side=64, crop="center")
base = settle_and_reset_peak()
out = rm.align_mask_frames((source_frame(i, h, w) for i in range(n)), t, 0.5, "mask")
print(json.dumps({"base": base, "extra": peak_rss_bytes() - (base or 0), "shape": list(out.shape)}))
"""


def test_mask_frames_are_aligned_one_at_a_time(core):
    """A long full-HD mask source through align_mask_frames (the file node's path): the peak
    memory stays near the result, where the 120 source frames alone would be 950 MiB of
    float32; and every frame matches the per-frame reference.

    Measured in a fresh process with glibc's mmap threshold fixed at 64 KiB, so that every
    large buffer goes back to the system when freed and the high-water mark is what was
    alive at once (with the default dynamic threshold the heap keeps a few hundred MiB of
    freed frames, which says nothing about this code)."""
    import inspect
    import json
    import subprocess
    import sys

    from vg_testlib import REPO
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536",
               PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "bench")]))
    script = _MEASURE.replace("import json, sys, torch\n", "import json, sys, torch\n" + inspect.getsource(source_frame))
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["base"] is not None, "this test needs Linux /proc/self/clear_refs"
    assert r["shape"] == [30, 64, 112]
    assert r["extra"] < 96 * 2**20, f"{r['extra'] / 2**20:.0f} MiB to align 120 full-HD mask frames"

    w, h, n = 1920, 1080, 24
    t = core.ft.plan_transform((w, h), n, skip_first=1, every_nth=3, frame_cap=0, short_side=64, crop="center")
    out = core.rm.align_mask_frames((source_frame(i, h, w) for i in range(n)), t, 0.5, "mask")  # count unknown
    assert out.shape == (len(t.frame_indices), t.size[1], t.size[0]) and out.dtype == torch.bool
    for j, i in enumerate(t.frame_indices):
        want = t.apply_spatial(source_frame(i, h, w)[None, None], mode="nearest")[0, 0] > 0.5
        assert torch.equal(out[j], want)
    assert out.any(dim=(1, 2)).all()


def test_mask_frame_errors_name_the_frame_and_stop_early(core):
    t = _transform(core)
    frames = [torch.zeros(24, 40)] * 3 + [torch.zeros(20, 40)] + [torch.zeros(24, 40)] * 2
    with pytest.raises(ValueError, match=r"mask 'm': frame 3 is 40x20 but frame 0 is 40x24"):
        core.rm.align_mask_frames(iter(frames), t, what="mask 'm'")
    read = []

    def counted():
        for m in frames:
            read.append(1)
            yield m
    # a known count that fits nothing fails before a frame is read
    with pytest.raises(ValueError, match=r"has 4 frames but the video has 6 source frames"):
        core.rm.align_mask_frames(counted(), t, count=4)
    assert not read
    with pytest.raises(ValueError, match=r"mask has no frames"):
        core.rm.align_mask_frames(iter([]), t)


def test_dropped_frames_that_come_unread_are_never_read(core):
    t = _transform(core)  # picks source frames 1, 3, 5 of 6
    masks = _source_masks()
    read = []

    def reader(i):
        def read_frame():
            read.append(i)
            return masks[i]
        return read_frame
    out = core.rm.align_mask_frames((reader(i) for i in range(6)), t, count=6)
    assert read == [1, 3, 5]
    assert torch.equal(out, _expected(t, masks))
    # a size mismatch among the read frames names the first frame read, not frame 0
    masks[5] = 0
    bad = [reader(i) for i in range(5)] + [lambda: torch.zeros(20, 40)]
    with pytest.raises(ValueError, match=r"frame 5 is 40x20 but frame 1 is 40x24"):
        core.rm.align_mask_frames(iter(bad), t, count=6)


def _write_png(path, arr):
    from PIL import Image
    Image.fromarray((arr * 255).astype(np.uint8), mode="L").save(path)


def test_from_file_sequence_image_and_video(comfy_host, core):
    node = _node(comfy_host, "VideoGrainRegionMaskFromFile")
    inp = comfy_host.folder_paths.get_input_directory()
    t = _transform(core)
    masks = _source_masks()
    seq = os.path.join(inp, "vg_masks", "person")
    os.makedirs(seq, exist_ok=True)
    for i in range(6):  # frame_2 sorts before frame_10: natural order
        _write_png(os.path.join(seq, f"frame_{i * 5}.png"), masks[i].numpy())
    (out,) = _run(node, path="vg_masks/person", transform=t, threshold=0.5, channel="luminance")
    assert torch.equal(out.bool(), _expected(t, masks))
    # only the images of the frames the clip uses are read: the others may be anything
    for i in (0, 2, 4):
        with open(os.path.join(seq, f"frame_{i * 5}.png"), "wb") as f:
            f.write(b"not a png")
    (again,) = _run(node, path="vg_masks/person", transform=t, threshold=0.5, channel="luminance")
    assert torch.equal(again, out)

    _write_png(os.path.join(inp, "vg_single.png"), masks[0].numpy())
    (one,) = _run(node, path="vg_single.png", transform=t, threshold=0.5, channel="luminance")
    assert one.shape == (1, 16, 24)
    assert torch.equal(one.bool(), t.apply_spatial(masks[:1, None], mode="nearest")[:, 0] > 0.5)

    # a mask video (GIF: lossless, so the comparison is exact)
    from PIL import Image
    frames = [Image.fromarray((m.numpy() * 255).astype(np.uint8), mode="L").convert("RGB") for m in masks]
    frames[0].save(os.path.join(inp, "vg_mask.gif"), save_all=True, append_images=frames[1:], duration=40, loop=0)
    (vid,) = _run(node, path="vg_mask.gif", transform=t, threshold=0.5, channel="luminance")
    assert torch.equal(vid.bool(), _expected(t, masks))


def test_damaged_mask_image_names_the_file(comfy_host, core):
    """A damaged mask image among the frames the clip uses: a clear error naming the file (a
    damaged mask video: tests/test_bad_inputs.py)."""
    node = _node(comfy_host, "VideoGrainRegionMaskFromFile")
    inp = comfy_host.folder_paths.get_input_directory()
    t = _transform(core)
    seq = os.path.join(inp, "vg_masks", "damaged")
    os.makedirs(seq, exist_ok=True)
    for i, m in enumerate(_source_masks()):
        _write_png(os.path.join(seq, f"{i}.png"), m.numpy())
    with open(os.path.join(seq, "3.png"), "r+b") as f:  # frame 3 is one the clip uses
        f.truncate(30)
    with pytest.raises(ValueError, match=r"mask image '3\.png' could not be read \(\w+\): the file is damaged"):
        _run(node, path="vg_masks/damaged", transform=t, threshold=0.5, channel="luminance")


def test_16_bit_masks_and_alpha_that_the_decoder_drops(comfy_host, core):
    """A 16-bit greyscale PNG keeps its values (8-bit conversion clipped them all to white);
    a mask video asked for alpha whose frames decode without alpha (webm VP9 through
    FFmpeg's own decoder) is refused instead of reading as all inside."""
    from PIL import Image
    from test_video_loader import write_frames
    node = _node(comfy_host, "VideoGrainRegionMaskFromFile")
    inp = comfy_host.folder_paths.get_input_directory()
    t = _transform(core)
    deep = np.zeros((24, 40), np.uint16)
    deep[:, :20] = 60000   # 0.92: inside
    deep[:, 20:] = 10000   # 0.15: outside (8-bit conversion made this 255 too)
    Image.fromarray(deep).save(os.path.join(inp, "vg_mask16.png"))
    assert Image.open(os.path.join(inp, "vg_mask16.png")).mode.startswith("I")
    (m,) = _run(node, path="vg_mask16.png", transform=t, threshold=0.5, channel="luminance")
    want = t.apply_spatial(torch.from_numpy(deep[None, None].astype(np.float32) / 65535), mode="nearest")[0] > 0.5
    assert torch.equal(m.bool(), want) and 0 < m.mean() < 1

    rgba = np.full((6, 24, 40, 4), 255, np.uint8)
    rgba[:, :, :20, 3] = 0  # left half transparent
    write_frames(os.path.join(inp, "vg_alpha.webm"), rgba, fps=8, codec="libvpx-vp9", pix_fmt="yuva420p")
    try:
        (a,) = _run(node, path="vg_alpha.webm", transform=t, threshold=0.5, channel="alpha")
    except ValueError as e:  # this FFmpeg drops webm alpha: said so
        assert re.search(r"mask video 'vg_alpha\.webm': channel 'alpha' was asked for but its frames decode "
                         r"without alpha", str(e)), e
    else:  # a decoder that keeps the alpha: then it must be the real one, not all opaque
        opaque = torch.zeros(6, 24, 40)
        opaque[:, :, 20:] = 1
        assert torch.equal(a.bool(), _expected(t, opaque))


def test_a_phone_rotated_mask_video_is_turned_like_the_frames(comfy_host, core):
    from test_video_loader import _rotate_mp4_display, write_frames
    node = _node(comfy_host, "VideoGrainRegionMaskFromFile")
    inp = comfy_host.folder_paths.get_input_directory()
    stored = np.full((3, 48, 64, 3), 10, np.uint8)
    stored[:, :, :16] = 245  # the left 16 columns of the stored (landscape) pixels
    path = os.path.join(inp, "vg_mask_rotated.mp4")
    write_frames(path, stored)
    _rotate_mp4_display(path)
    t = core.ft.plan_transform((48, 64), 3)  # the loader plans the upright (portrait) size
    (m,) = _run(node, path="vg_mask_rotated.mp4", transform=t, threshold=0.5, channel="luminance")
    want = torch.zeros(3, 64, 48, dtype=torch.bool)
    want[:, :16, :] = True  # turned clockwise: the left columns became the top rows
    assert torch.equal(m.bool(), want)


def test_from_file_refuses_paths_out_of_the_input_folder(comfy_host, core, tmp_path):
    node = _node(comfy_host, "VideoGrainRegionMaskFromFile")
    inp = comfy_host.folder_paths.get_input_directory()
    t = _transform(core)
    outside = tmp_path / "outside"
    outside.mkdir()
    _write_png(str(outside / "m.png"), np.ones((24, 40), np.float32))
    link = os.path.join(inp, "vg_link_out")
    if not os.path.lexists(link):
        os.symlink(str(outside), link)
    for path, msg in [("../secret.png", r"leaves the input folder"), (str(outside / "m.png"), "is absolute"),
                      ("vg_link_out/m.png", "outside the input folder"), ("vg_link_out", "outside the input folder"),
                      ("nope.png", "does not exist"), ("", "is empty")]:
        with pytest.raises(ValueError, match=msg):
            _run(node, path=path, transform=t, threshold=0.5, channel="luminance")
    # a link inside a sequence folder that points out is refused too
    seq = os.path.join(inp, "vg_seq_with_link")
    os.makedirs(seq, exist_ok=True)
    _write_png(os.path.join(seq, "a.png"), np.ones((24, 40), np.float32))
    if not os.path.lexists(os.path.join(seq, "b.png")):
        os.symlink(str(outside / "m.png"), os.path.join(seq, "b.png"))
    with pytest.raises(ValueError, match="link out of the input folder"):
        _run(node, path="vg_seq_with_link", transform=t, threshold=0.5, channel="luminance")


def test_local_prompt_chains_and_checks_frames(comfy_host, core):
    node = _node(comfy_host, "VideoGrainLocalPrompt")
    a = torch.zeros(3, 16, 24)
    a[:, :, :12] = 1
    (lay,) = _run(node, mask=a, local_prompt="a red car")
    (lay,) = _run(node, mask=torch.ones(1, 16, 24), local_prompt="", layout=lay)  # one frame broadcasts
    assert lay.prompts == ["a red car", ""]
    assert lay.masks(3).shape == (3, 2, 16, 24)
    with pytest.raises(ValueError, match="region mask has 2 frames but the layout's other masks have 3 frames"):
        _run(node, mask=torch.ones(2, 16, 24), local_prompt="x", layout=lay)
    with pytest.raises(ValueError, match="region mask is 8x8 but the layout's regions are 24x16"):
        _run(node, mask=torch.ones(3, 8, 8), local_prompt="x", layout=lay)
    with pytest.raises(ValueError, match="has 3 mask frames but the video has 5 frames"):
        lay.masks(5)


def _write_mp4(path, frames=6, w=40, h=24):
    from test_video_loader import write_frames
    write_frames(path, np.stack([np.full((h, w, 3), 20 * i, np.uint8) for i in range(frames)]), fps=8)


@pytest.mark.server
def test_server_reports_bad_mask_paths_and_keeps_serving(comfy_server):
    _write_mp4(os.path.join(comfy_server.input_dir, "vg_src.mp4"))
    os.makedirs(os.path.join(comfy_server.input_dir, "vg_seq"), exist_ok=True)
    for i in range(6):
        _write_png(os.path.join(comfy_server.input_dir, "vg_seq", f"{i}.png"), _source_masks()[i].numpy())

    def prompt(path):
        return {
            "1": {"class_type": "VideoGrainVideoLoader", "inputs": {"video": "vg_src.mp4", "skip_first_frames": 0,
                  "select_every_nth": 2, "frame_load_cap": 0, "size": 16, "crop": "center"}},
            "2": {"class_type": "VideoGrainRegionMaskFromFile", "inputs": {"path": path, "transform": ["1", 3],
                  "threshold": 0.5, "channel": "luminance"}},
            "3": {"class_type": "VideoGrainLocalPrompt", "inputs": {"mask": ["2", 0], "local_prompt": "x"}},
            "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 0]}},
        }
    err = comfy_server.run_expect_error(prompt("../../etc/passwd"))
    assert "leaves the input folder" in err, err
    err = comfy_server.run_expect_error(prompt("/etc/passwd"))
    assert "is absolute" in err, err
    comfy_server.run(prompt("vg_seq"), timeout=120)
    assert comfy_server.alive()
