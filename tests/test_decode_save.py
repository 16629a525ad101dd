"""Decode and Save Video, and the whole edit chain through POST /prompt on a small real video:
Video Loader -> Region Mask -> Local Prompt -> Layout Conditioning -> ST-Layout Patch ->
DDIM Invert -> Sample -> Decode -> Save Video."""
from __future__ import annotations

import json
import os
from importlib import import_module

import av
import numpy as np
import pytest
import torch
from PIL import Image
from test_video_loader import make_video
from vg_testlib import edit_prompt


def probe(path):
    with av.open(path) as c:
        s = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(s)]
        return {"frames": len(frames), "size": (frames[0].shape[1], frames[0].shape[0]),
                "fps": float(s.average_rate), "codec": s.codec_context.name, "first": frames[0], "all": frames}


@pytest.fixture(scope="module")
def small(comfy_host, test_models):
    import comfy.sd
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(test_models.small)
    return vae


def _node(comfy_host, module, name):
    return getattr(import_module(f"{comfy_host.pack.__name__}.nodes.{module}"), name)


# ---------------------------------------------------------------- in-process
def test_decode_in_chunks_matches_a_single_decode(comfy_host, small):
    dec = _node(comfy_host, "decode", "VideoGrainDecode")
    lat = torch.randn(5, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    whole = small.decode(lat)
    out = dec.execute(samples={"samples": lat}, vae=small, max_frames_per_chunk=2).args[0]
    assert out.shape == (5, 64, 96, 3) and torch.allclose(out, whole, atol=1e-5)
    mod = import_module(f"{comfy_host.pack.__name__}.nodes.decode")
    assert mod.chunk_frames(small, lat, 2) <= 2 and mod.chunk_frames(small, lat, 16) >= 1
    with pytest.raises(ValueError, match="samples must be a latent"):
        dec.execute(samples={"samples": torch.zeros(1, 4, 2, 8, 8)}, vae=small)


def test_save_writes_h264_mp4_and_side_by_side(comfy_host):
    save = _node(comfy_host, "save_video", "VideoGrainSaveVideo")
    g = torch.Generator().manual_seed(1)
    edit = torch.rand(6, 48, 64, 3, generator=g)
    src = torch.rand(6, 48, 64, 3, generator=g)
    out = save.execute(images=edit, fps=7.5, filename_prefix="vg_save/test", crf=10, source=src)
    results = out.ui.as_dict()["images"]
    assert len(results) == 2 and all(r["type"] == "output" for r in results)
    outdir = comfy_host.folder_paths.get_output_directory()
    main = probe(os.path.join(outdir, results[0]["subfolder"], results[0]["filename"]))
    sbs = probe(os.path.join(outdir, results[1]["subfolder"], results[1]["filename"]))
    assert (main["frames"], main["size"], main["codec"]) == (6, (64, 48), "h264") and main["fps"] == pytest.approx(7.5)
    assert sbs["frames"] == 6 and sbs["size"] == (128, 48)
    assert not [f for f in os.listdir(os.path.join(outdir, "vg_save")) if f.endswith(".partial")]
    # Odd sizes are padded to even (yuv420p); a second save gets the next number.
    out = save.execute(images=torch.rand(2, 33, 45, 3), fps=8.0, filename_prefix="vg_save/test")
    (r,) = out.ui.as_dict()["images"]
    assert r["filename"] != results[0]["filename"]
    assert probe(os.path.join(outdir, r["subfolder"], r["filename"]))["size"] == (46, 34)
    with pytest.raises(ValueError, match="source has 3 frames but images has 6"):
        save.execute(images=edit, fps=8.0, filename_prefix="vg_save/x", source=src[:3])
    with pytest.raises(ValueError, match="fps must be > 0"):
        save.execute(images=edit, fps=0.0, filename_prefix="vg_save/x")


def test_save_refuses_a_symlinked_folder_that_leads_out(comfy_host, tmp_path):
    save = _node(comfy_host, "save_video", "VideoGrainSaveVideo")
    outdir = comfy_host.folder_paths.get_output_directory()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    link = os.path.join(outdir, "vg_link_out")
    if not os.path.lexists(link):
        os.symlink(outside, link)
    with pytest.raises(ValueError, match=r"filename_prefix 'vg_link_out/x' leads out of the output folder"):
        save.execute(images=torch.rand(2, 16, 16, 3), fps=8.0, filename_prefix="vg_link_out/x")
    # a folder that does not exist yet behind the link: refused before anything is created
    with pytest.raises(ValueError, match=r"filename_prefix 'vg_link_out/new/x' leads out of the output folder"):
        save.execute(images=torch.rand(2, 16, 16, 3), fps=8.0, filename_prefix="vg_link_out/new/x")
    assert not os.listdir(outside)
    inside = os.path.join(outdir, "vg_link_in")  # a link that stays inside is fine
    os.makedirs(os.path.join(outdir, "vg_real"), exist_ok=True)
    if not os.path.lexists(inside):
        os.symlink(os.path.join(outdir, "vg_real"), inside)
    save.execute(images=torch.rand(2, 16, 16, 3), fps=8.0, filename_prefix="vg_link_in/x")
    assert [f for f in os.listdir(os.path.join(outdir, "vg_real")) if f.endswith(".mp4")]


def test_side_by_side_and_writing_go_a_frame_at_a_time(comfy_host, tmp_path):
    """The side-by-side frames are made lazily (per-frame resize = the batched reference);
    write_video encodes an iterator of frames exactly as it encodes the stacked tensor, and
    a frame of another size stops it with no file left behind."""
    import torch.nn.functional as F
    mod = import_module(f"{comfy_host.pack.__name__}.nodes.save_video")
    video_io = import_module(f"{comfy_host.pack.__name__}.videograin_core.video.video_io")
    g = torch.Generator().manual_seed(2)
    src, edit = torch.rand(4, 96, 128, 3, generator=g), torch.rand(4, 48, 64, 3, generator=g)
    frames = mod.side_by_side(src, edit)
    assert not isinstance(frames, torch.Tensor)
    small_src = F.interpolate(src.movedim(-1, 1), size=(48, 64), mode="bilinear", align_corners=False,
                              antialias=True).movedim(1, -1).clamp(0, 1)
    want = torch.cat([small_src, edit], dim=2)
    got = list(frames)
    assert len(got) == 4 and all(torch.allclose(f, w, atol=1e-6) for f, w in zip(got, want))

    a, b = str(tmp_path / "stacked.mp4"), str(tmp_path / "iter.mp4")
    video_io.write_video(a, want, 8.0, crf=10)
    video_io.write_video(b, iter(got), 8.0, crf=10)
    fa, fb = probe(a)["all"], probe(b)["all"]
    assert len(fa) == len(fb) == 4 and all(np.array_equal(x, y) for x, y in zip(fa, fb))
    bad = str(tmp_path / "bad.mp4")
    with pytest.raises(ValueError, match="frame 2 is 64x40 but frame 0 is 64x48"):
        video_io.write_video(bad, iter([edit[0], edit[1], torch.rand(40, 64, 3), edit[3]]), 8.0)
    assert not [n for n in os.listdir(tmp_path) if n.startswith("bad")]


# ---------------------------------------------------------------- through the real server
def _write_mask_png(path, w, h):
    m = np.zeros((h, w), np.uint8)
    m[:, : w // 2] = 255
    Image.fromarray(m, "L").save(path)


def chain_prompt(ckpt, video, mask_png, steps=3, **loader):
    return edit_prompt(ckpt, video, mask_png, steps=steps, prefix="vg_chain/edit", source=True, **loader)


@pytest.mark.server
def test_full_edit_chain_through_the_server(comfy_server, test_models):
    make_video(os.path.join(comfy_server.input_dir, "chain.mp4"), n=10, w=96, h=64, fps=12)
    _write_mask_png(os.path.join(comfy_server.input_dir, "chain_mask.png"), 96, 64)
    prompt = chain_prompt(test_models.small_name, "chain.mp4", "chain_mask.png")
    entry = comfy_server.run(prompt, timeout=600)
    saved = entry["outputs"]["save"]["images"]
    assert [s["filename"].endswith(("_.mp4", "_sbs.mp4")) for s in saved] == [True, True]
    edit = probe(os.path.join(comfy_server.output_dir, saved[0]["subfolder"], saved[0]["filename"]))
    sbs = probe(os.path.join(comfy_server.output_dir, saved[1]["subfolder"], saved[1]["filename"]))
    assert edit["frames"] == 4 and edit["size"] == (96, 64) and edit["fps"] == pytest.approx(6.0)
    assert sbs["frames"] == 4 and sbs["size"] == (192, 64)
    # The workflow travels in the file, as ComfyUI's own video nodes put it there
    with av.open(os.path.join(comfy_server.output_dir, saved[0]["subfolder"], saved[0]["filename"])) as c:
        stored = json.loads(c.metadata["prompt"])
    assert {k: v["class_type"] for k, v in stored.items()} == {k: v["class_type"] for k, v in prompt.items()}
    # The inversion was cached in the host's persistent user folder, never in temp.
    cache = os.path.join(os.path.dirname(comfy_server.output_dir), "user", "__videograin_cache")
    assert [f for f in os.listdir(cache) if f.endswith(".safetensors")]
    # Again with another seed: the inversion comes from the cache, the result is the same
    # (blend on the deterministic trajectory ignores the seed).
    prompt["sample"]["inputs"]["seed"] = 1
    entry = comfy_server.run(prompt, timeout=600)
    again = entry["outputs"]["save"]["images"][0]
    again = probe(os.path.join(comfy_server.output_dir, again["subfolder"], again["filename"]))
    assert np.array_equal(again["first"], edit["first"])


@pytest.mark.server
def test_chain_errors_through_the_server(comfy_server, test_models):
    make_video(os.path.join(comfy_server.input_dir, "chain_err.mp4"), n=6, w=96, h=64)
    _write_mask_png(os.path.join(comfy_server.input_dir, "chain_err_mask.png"), 96, 64)
    bad_cfg = chain_prompt(test_models.small_name, "chain_err.mp4", "chain_err_mask.png", steps=2)
    bad_cfg["inv"]["inputs"]["cfg"] = 3.0
    err = comfy_server.run_expect_error(bad_cfg, timeout=300)
    assert "no negative conditioning is connected" in err, err[:2000]
    outside = {"load": bad_cfg["load"], "save": {"class_type": "VideoGrainSaveVideo", "inputs": {
        "images": ["load", 0], "fps": ["load", 1], "filename_prefix": "../../escape", "crf": 19}}}
    err = comfy_server.run_expect_error(outside, timeout=300)
    assert "outside the output folder" in err, err[:2000]
    assert comfy_server.alive()
