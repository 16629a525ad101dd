"""Video Loader: real small videos written with PyAV (mp4 h264, webm vp9, avi mjpeg, mov),
options, memory refusal, path safety, damaged files; in-process and through POST /prompt."""
from __future__ import annotations

import os
import time
from fractions import Fraction
from importlib import import_module

import numpy as np
import pytest
import torch

FORMATS = {  # extension: (codec, pixel format)
    "mp4": ("libx264", "yuv420p"),
    "webm": ("libvpx-vp9", "yuv420p"),
    "avi": ("mjpeg", "yuvj420p"),
    "mov": ("libx264", "yuv420p"),
}


def pattern(n: int, w: int, h: int) -> np.ndarray:
    """uint8 [n, h, w, 3]: stripes moving right, a square moving down, a colour ramp over time."""
    ys, xs = np.mgrid[0:h, 0:w]
    out = np.zeros((n, h, w, 3), np.uint8)
    for i in range(n):
        out[i, ..., 0] = np.where((xs + 3 * i) % 24 < 12, 220, 30)
        sq = (abs(xs - w // 2) < w // 6) & (abs(ys - (h // 4 + 2 * i) % h) < h // 6)
        out[i, ..., 1] = np.where(sq, 230, 40)
        out[i, ..., 2] = int(255 * i / max(n - 1, 1))
    return out


def write_frames(path, frames, fps=12, codec="libx264", pix_fmt="yuv420p", pts=None, audio_seconds=0.0,
                 metadata=None, options=None, sample_aspect=None):
    """Frames [n, h, w, 3 or 4 (RGBA)] uint8 to `path`; `pts` (in 1/1000 s) for variable frame rates,
    `audio_seconds` of silence in a second stream, encoder `options`, non-square pixels
    (`sample_aspect`, a Fraction)."""
    import av
    with av.open(path, mode="w") as c:
        for k, v in (metadata or {}).items():
            c.metadata[k] = v
        s = c.add_stream(codec, rate=Fraction(fps))
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        if options:
            s.options = options
        if sample_aspect:
            s.codec_context.sample_aspect_ratio = sample_aspect
        if pts is not None:
            s.codec_context.time_base = Fraction(1, 1000)
        a = c.add_stream("aac", rate=8000) if audio_seconds else None
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(f, format="rgba" if f.shape[-1] == 4 else "rgb24")
            if pts is not None:
                vf.pts, vf.time_base = pts[i], Fraction(1, 1000)
            for p in s.encode(vf):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
        if a is not None:
            for j in range(int(audio_seconds * 8000) // 1024):
                af = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
                af.sample_rate, af.pts = 8000, j * 1024
                for p in a.encode(af):
                    c.mux(p)
            for p in a.encode():
                c.mux(p)


def make_video(path: str, n: int = 12, w: int = 96, h: int = 64, fps: int = 12) -> np.ndarray:
    codec, pix_fmt = FORMATS[os.path.splitext(path)[1][1:]]
    frames = pattern(n, w, h)
    write_frames(path, frames, fps=fps, codec=codec, pix_fmt=pix_fmt,
           options={"lossless": "1"} if codec == "libvpx-vp9" else None)
    return frames


def _loader(comfy_host):
    return import_module(comfy_host.pack.__name__ + ".nodes.video_loader").VideoGrainVideoLoader


def load(comfy_host, name, **kw):
    opts = dict(skip_first_frames=0, select_every_nth=1, frame_load_cap=0, size=0, crop="center")
    opts.update(kw)
    return _loader(comfy_host).execute(video=name, **opts).args


@pytest.fixture(scope="module")
def input_dir(comfy_host):
    return comfy_host.folder_paths.get_input_directory()


# ---------------------------------------------------------------- decoding
@pytest.mark.parametrize("ext", sorted(FORMATS))
def test_formats_decode_to_the_pattern(comfy_host, input_dir, ext):
    src = make_video(os.path.join(input_dir, f"pattern.{ext}"))
    images, fps, count, transform = load(comfy_host, f"pattern.{ext}")
    assert images.shape == (12, 64, 96, 3) and images.dtype == torch.float32
    assert count == 12 and fps == pytest.approx(12.0)
    assert transform.frame_indices == tuple(range(12)) and transform.size == (96, 64)
    assert 0.0 <= images.min() and images.max() <= 1.0
    err = (images - torch.from_numpy(src).float() / 255).abs().mean().item()
    assert err < 0.06, err
    assert (images[1:] - images[:-1]).abs().mean() > 0.02, "the pattern moves"


def test_skip_stride_cap_size_and_crop(comfy_host, input_dir):
    src = make_video(os.path.join(input_dir, "opts.mp4"), n=20, w=100, h=70)
    images, fps, count, tr = load(comfy_host, "opts.mp4", skip_first_frames=2, select_every_nth=3, frame_load_cap=4,
                                  size=48, crop="center")
    assert tr.frame_indices == (2, 5, 8, 11) and count == 4 and images.shape[0] == 4
    assert fps == pytest.approx(4.0)  # 12 fps / 3
    assert tr.resized_size == (69, 48) and tr.size == (64, 48) and images.shape[1:] == (48, 64, 3)
    # Frame 5 of the source went through the same transform as the loader's frame 1.
    ref = tr.apply_spatial(torch.from_numpy(src[5]).permute(2, 0, 1)[None].float())[0].permute(1, 2, 0) / 255
    assert (images[1] - ref).abs().mean() < 0.06
    _, _, _, tr = load(comfy_host, "opts.mp4", size=0)          # keep size: crop to multiples of 8
    assert tr.size == (96, 64) and tr.crop_box == (2, 3, 96, 64)
    _, _, _, tr = load(comfy_host, "opts.mp4", size=48, crop="none")
    assert tr.size == (72, 48) and tr.crop_box[:2] == (0, 0)
    images, _, _, tr = load(comfy_host, "opts.mp4", size=48, crop="center_square")
    assert tr.size == (48, 48) and images.shape[1:3] == (48, 48)
    _, _, count, tr = load(comfy_host, "opts.mp4", skip_first_frames=15)
    assert count == 5 and tr.source_frame_count == 20


def test_images_and_fps_wire_into_core_create_video(comfy_host, input_dir):
    make_video(os.path.join(input_dir, "wire.mp4"), n=6)
    images, fps, _, _ = load(comfy_host, "wire.mp4", select_every_nth=2)
    create = comfy_host.nodes.NODE_CLASS_MAPPINGS["CreateVideo"]
    video = create.execute(images=images, fps=fps).args[0]
    assert video.get_dimensions() == (96, 64)
    assert float(video.get_components().frame_rate) == pytest.approx(6.0)


# ---------------------------------------------------------------- refusals
def test_request_too_big_for_memory_is_refused_before_decoding(comfy_host, input_dir, monkeypatch):
    import av
    make_video(os.path.join(input_dir, "big.mp4"), n=40, w=64, h=64)
    decoded = []
    real_decode = av.container.InputContainer.decode
    monkeypatch.setattr(av.container.InputContainer, "decode",
                        lambda self, *a, **k: decoded.append(1) or real_decode(self, *a, **k))
    with pytest.raises(ValueError) as e:
        load(comfy_host, "big.mp4", size=8192)  # 40 frames of 8192x8192
    msg = str(e.value)
    assert "big.mp4" in msg and "memory" in msg and "GiB" in msg and "frame_load_cap" in msg, msg
    assert not decoded, "refused before decoding"


@pytest.mark.parametrize("name, words", [
    ("../outside.mp4", "'..' is not allowed"),
    ("sub/../../outside.mp4", "'..' is not allowed"),
    ("/etc/hostname", "absolute paths are not allowed"),
    ("x.mp4 [output]", "only files in the input folder"),
    ("missing.mp4", "does not exist"),
    ("", "no file chosen"),
])
def test_paths_outside_the_input_folder_are_refused(comfy_host, name, words):
    msg = _loader(comfy_host).validate_inputs(video=name)
    assert msg is not True and words in msg, msg
    with pytest.raises(ValueError, match=words.replace(".", r"\.").replace("(", r"\(")):
        load(comfy_host, name)


def test_symlink_out_of_the_input_folder_is_refused(comfy_host, input_dir, tmp_path):
    outside = tmp_path / "secret.mp4"
    make_video(str(outside), n=2)
    link = os.path.join(input_dir, "link_out.mp4")
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(outside, link)
    msg = _loader(comfy_host).validate_inputs(video="link_out.mp4")
    assert "outside the input folder" in msg, msg
    # A symlink that stays inside the folder is fine.
    make_video(os.path.join(input_dir, "real.mp4"), n=2)
    inside = os.path.join(input_dir, "link_in.mp4")
    if not os.path.lexists(inside):
        os.symlink(os.path.join(input_dir, "real.mp4"), inside)
    assert _loader(comfy_host).validate_inputs(video="link_in.mp4") is True


@pytest.mark.parametrize("kind, words", [
    ("empty", "is empty"),
    ("garbage", "could not be read as a video"),
    ("truncated_header", "could not be read as a video"),
])
def test_damaged_files_give_clear_errors(comfy_host, input_dir, kind, words):
    name = f"bad_{kind}.mp4"
    path = os.path.join(input_dir, name)
    if kind == "empty":
        open(path, "wb").close()
    elif kind == "garbage":
        with open(path, "wb") as f:
            f.write(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    else:
        make_video(path + ".full.mp4", n=8)
        with open(path + ".full.mp4", "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[:40])
    with pytest.raises(ValueError) as e:
        load(comfy_host, name)
    assert name in str(e.value) and words in str(e.value), str(e.value)


def test_fingerprint_follows_the_file(comfy_host, input_dir):
    path = os.path.join(input_dir, "fp.mp4")
    make_video(path, n=4)
    node = _loader(comfy_host)
    a = node.fingerprint_inputs(video="fp.mp4")
    assert node.fingerprint_inputs(video="fp.mp4") == a
    time.sleep(0.01)
    make_video(path, n=5)
    assert node.fingerprint_inputs(video="fp.mp4") != a


def test_video_list_offers_uploaded_videos(comfy_host, input_dir):
    make_video(os.path.join(input_dir, "listed.webm"), n=2)
    with open(os.path.join(input_dir, "notes.txt"), "w") as f:
        f.write("x")
    schema = _loader(comfy_host).define_schema()
    video = next(i for i in schema.inputs if i.id == "video")
    assert "listed.webm" in video.options and "notes.txt" not in video.options
    assert video.upload.value == "video_upload"


# ---------------------------------------------------------------- through the real server
def _loader_prompt(name, **kw):
    inputs = dict(video=name, skip_first_frames=0, select_every_nth=1, frame_load_cap=0, size=0, crop="center")
    inputs.update(kw)
    return {"1": {"class_type": "VideoGrainVideoLoader", "inputs": inputs},
            "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}


@pytest.mark.server
def test_loader_to_core_create_and_save_video_through_the_server(comfy_server):
    make_video(os.path.join(comfy_server.input_dir, "srv.mp4"), n=10)
    prompt = _loader_prompt("srv.mp4", select_every_nth=2, size=48)
    del prompt["2"]
    prompt["3"] = {"class_type": "CreateVideo", "inputs": {"images": ["1", 0], "fps": ["1", 1]}}
    prompt["4"] = {"class_type": "SaveVideo", "inputs": {"video": ["3", 0], "filename_prefix": "vg_loader/core",
                                                         "format": "mp4", "codec": "h264"}}
    entry = comfy_server.run(prompt, timeout=300)
    (saved,) = entry["outputs"]["4"]["images"]
    import av
    with av.open(os.path.join(comfy_server.output_dir, saved["subfolder"], saved["filename"])) as c:
        s = c.streams.video[0]
        frames = list(c.decode(s))
        assert len(frames) == 5 and (frames[0].width, frames[0].height) == (72, 48)
        assert float(s.average_rate) == pytest.approx(6.0)


@pytest.mark.server
def test_bad_inputs_fail_clearly_through_the_server(comfy_server, tmp_path):
    d = comfy_server.input_dir
    make_video(os.path.join(d, "ok.mp4"), n=40, w=64, h=64)
    open(os.path.join(d, "empty.mp4"), "wb").close()
    with open(os.path.join(d, "garbage.mp4"), "wb") as f:
        f.write(b"\x00\x01garbage" * 300)
    outside = tmp_path / "outside.mp4"
    make_video(str(outside), n=2)
    if not os.path.lexists(os.path.join(d, "escape.mp4")):
        os.symlink(outside, os.path.join(d, "escape.mp4"))
    cases = [
        (_loader_prompt("../outside.mp4"), "'..' is not allowed"),
        (_loader_prompt(str(outside)), "absolute paths are not allowed"),
        (_loader_prompt("escape.mp4"), "outside the input folder"),
        (_loader_prompt("nothere.mp4"), "does not exist"),
        (_loader_prompt("empty.mp4"), "is empty"),
        (_loader_prompt("garbage.mp4"), "could not be read as a video"),
        (_loader_prompt("ok.mp4", size=8192), "GiB"),
    ]
    for prompt, words in cases:
        err = comfy_server.run_expect_error(prompt, timeout=120)
        assert words in err, (words, err[:2000])
        assert comfy_server.alive(), "the server must keep serving"
    entry = comfy_server.run(_loader_prompt("ok.mp4", frame_load_cap=3), timeout=120)
    assert len(entry["outputs"]["2"]["images"]) == 3


# ---------------------------------------------------------------- awkward but valid files
def _rotate_mp4_display(path):
    """Set the video track's display matrix (tkhd) to a 90 degree clockwise turn, as phones
    store portrait clips: the pixels stay landscape, players turn them."""
    import struct
    data = bytearray(open(path, "rb").read())
    at = data.find(b"tkhd")
    assert at > 0 and data[at + 4] == 0  # version 0 box: 32-bit times
    matrix = at + 4 + 4 + 5 * 4 + 8 + 4 * 2  # after version/flags, times/id/duration, reserved, layer..volume
    struct.pack_into(">9i", data, matrix, 0, 0x10000, 0, -0x10000, 0, 0, 0, 0, 0x40000000)
    open(path, "wb").write(data)


def test_phone_rotation_is_applied(comfy_host, input_dir):
    frames = np.full((3, 48, 64, 3), 20, np.uint8)
    frames[:, :16, :16] = 230  # a bright block at the top left of the stored (landscape) pixels
    path = os.path.join(input_dir, "rotated.mp4")
    write_frames(path, frames)
    _rotate_mp4_display(path)
    images, _, count, tr = load(comfy_host, "rotated.mp4")
    # turned clockwise: portrait, and the block is now at the top right
    assert images.shape == (3, 64, 48, 3) and tr.source_size == (48, 64), images.shape
    assert images[0, :12, -12:].mean() > 0.8 and images[0, :12, :12].mean() < 0.2


def test_non_square_pixels_are_shown_at_their_display_aspect(comfy_host, input_dir):
    """A 64x48 stream with 2:1 pixels (anamorphic) is a 128x48 picture: the loader makes
    square pixels of it, and the transform it reports maps the stored size to the shown one
    (so masks at the stored size line up)."""
    frames = np.full((3, 48, 64, 3), 20, np.uint8)
    frames[:, :, 16:32] = 230  # stored columns 16..31: shown at 32..63
    write_frames(os.path.join(input_dir, "anamorphic.mp4"), frames, sample_aspect=Fraction(2, 1))
    images, _, count, tr = load(comfy_host, "anamorphic.mp4")
    assert images.shape == (3, 48, 128, 3) and tr.source_size == (64, 48) and tr.resized_size == (128, 48)
    assert images[0, :, 36:60].mean() > 0.8 and images[0, :, 4:28].mean() < 0.2 and images[0, :, 68:124].mean() < 0.2
    images, _, _, tr = load(comfy_host, "anamorphic.mp4", size=24)  # short side 24: 64x24 shown
    assert images.shape == (3, 24, 64, 3)


def test_webm_frame_count_ignores_longer_audio_and_fps_follows_variable_timing(comfy_host, input_dir):
    """webm/mkv store no frame count: 30 frames beside 3 s of audio are 30 (the container's
    duration would say 96), and a variable frame rate gets its mean rate, not the nominal."""
    write_frames(os.path.join(input_dir, "audio_long.mkv"), pattern(30, 32, 32), fps=30, audio_seconds=3.0)
    images, fps, count, tr = load(comfy_host, "audio_long.mkv", frame_load_cap=4)
    assert count == 4 and tr.source_frame_count == 30 and fps == pytest.approx(30.0)
    # 60 frames over 2.36 s with a nominal rate of 100: the mean is about 25 fps
    pts = np.cumsum([0] + [20 if i % 2 else 60 for i in range(59)]).tolist()
    write_frames(os.path.join(input_dir, "vfr.mkv"), pattern(60, 32, 32), fps=100, pts=pts)
    images, fps, count, tr = load(comfy_host, "vfr.mkv", skip_first_frames=15)
    assert count == 45 and tr.source_frame_count == 60
    assert fps == pytest.approx(59 / (pts[-1] / 1000), rel=1e-3)


def test_tags_that_are_not_utf8_do_not_block_the_file(comfy_host, input_dir):
    path = os.path.join(input_dir, "latin1_tags.mp4")
    write_frames(path, pattern(3, 32, 32), metadata={"title": "cafe-XX"})
    data = open(path, "rb").read()
    open(path, "wb").write(data.replace(b"cafe-XX", b"caf\xe9-\xff\xfe"))  # same length, not UTF-8
    images, _, count, _ = load(comfy_host, "latin1_tags.mp4")
    assert count == 3


def test_a_damaged_stretch_keeps_the_frames_before_it(comfy_host, input_dir):
    """A packet the decoder rejects after good frames (FFmpeg's InvalidDataError, which is
    also a ValueError): the good frames load, no raw decoder error reaches the user. The
    damage is 30 seeded random bytes in the second half of an MJPEG mkv; the first seed
    whose plain decode fails that way is used, and the test insists there is one."""
    import av
    path = os.path.join(input_dir, "broken_tail.mkv")
    frames = np.random.default_rng(99).integers(0, 256, (40, 48, 64, 3), dtype=np.uint8)
    for seed in range(10):
        write_frames(path, frames, codec="mjpeg", pix_fmt="yuvj420p")
        data = bytearray(open(path, "rb").read())
        rng = np.random.default_rng(seed)
        at = int(rng.integers(len(data) // 2, len(data) - 100))
        data[at:at + 30] = rng.integers(0, 256, 30, dtype=np.uint8).tobytes()
        open(path, "wb").write(bytes(data))
        good = 0
        with av.open(path) as c:
            stream = c.streams.video[0]
            stream.thread_type = "AUTO"
            try:
                for _ in c.decode(stream):
                    good += 1
            except av.error.FFmpegError:
                break
    else:
        pytest.fail("no seed gave a decoder error: this FFmpeg conceals the damage; pick other damage")
    assert 1 <= good < 40
    images, _, count, tr = load(comfy_host, "broken_tail.mkv")
    assert count == good and images.shape[0] == good
