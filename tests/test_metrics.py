"""Edit metrics: the formulas of videograin_core.metrics.clip_scores against plain numpy on
fixed embeddings, the limits (identical frames), and the VideoGrain Metrics node through
POST /prompt with a random CLIP ViT-L/14 in the host's formats (vision half through CLIP
Vision Loader, text half with its projection through CLIP Loader), including the error
for a CLIP without the text projection (an SD1.5 checkpoint's)."""
from __future__ import annotations

import math
import os
import re

import numpy as np
import pytest
import torch

from videograin_core.metrics.clip_scores import EditScores, clip_f, clip_t, q_edit, score_edit

RNG = np.random.default_rng(0)
E = RNG.normal(size=(5, 8))          # five frames' image embeddings
S = RNG.normal(size=8)               # the prompt's text embedding


def np_cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_clip_t_and_clip_f_match_numpy():
    assert math.isclose(clip_t(torch.from_numpy(S), torch.from_numpy(E)), np.mean([np_cos(S, e) for e in E]),
                        rel_tol=1e-12)
    assert math.isclose(clip_f(torch.from_numpy(E)), np.mean([np_cos(E[i], E[i + 1]) for i in range(4)]),
                        rel_tol=1e-12)
    assert math.isnan(clip_f(torch.from_numpy(E[:1])))
    # scale-free: embeddings need not be normalised
    assert math.isclose(clip_t(torch.from_numpy(3 * S), torch.from_numpy(E * 0.1)),
                        clip_t(torch.from_numpy(S), torch.from_numpy(E)), rel_tol=1e-12)
    with pytest.raises(ValueError, match="^clip: the text embedding has 7 dimensions"):
        clip_t(torch.zeros(7), torch.from_numpy(E))


def test_q_edit_is_the_ratio_of_the_scaled_scores():
    assert math.isclose(q_edit(36.56, 1.42), 25.746, rel_tol=1e-4)   # the paper's Table 1
    assert q_edit(30.0, 0.0) == math.inf and math.isnan(q_edit(30.0, math.nan))


def moving_clip(frames=4, size=64, step=2):
    """A textured image sliding right by `step` px a frame (DIS finds it)."""
    g = torch.Generator().manual_seed(1)
    base = torch.nn.functional.interpolate(torch.rand(1, 3, size // 4, (size + step * frames) // 4, generator=g),
                                           scale_factor=4, mode="bilinear")[0].permute(1, 2, 0)
    return torch.stack([base[:, (frames - t) * step:(frames - t) * step + size] for t in range(frames)])


def test_identical_frames_give_clip_f_100_and_warp_err_0():
    frame = moving_clip(1)[0]
    clip = frame[None].repeat(4, 1, 1, 1)
    enc = lambda images: images.mean(dim=(1, 2))            # any deterministic image encoder
    s = score_edit(clip, clip, torch.tensor([1.0, 0.5, 0.2]), enc)
    assert s.clip_f == pytest.approx(100.0, abs=1e-9)
    assert s.warp_err == pytest.approx(0.0, abs=1e-9)
    assert s.q_edit > 1e6                                      # CLIP-T over (almost) nothing
    assert s.counted_fraction > 0.9


def test_warp_err_follows_the_source_motion_not_the_edit():
    src = moving_clip()
    enc = lambda images: images.mean(dim=(1, 2))
    text = torch.tensor([1.0, 0.0, 0.0])
    same = score_edit(src, src, text, enc)            # the edit moves as the source: small error
    shuffled = score_edit(src.flip(0), src, text, enc)  # frames in reverse: motion disagrees
    assert same.warp_err < 1.0 < shuffled.warp_err
    assert isinstance(same, EditScores) and "Warp-Err (x100)" in same.table()
    # x100 scale: CLIP-T is 100 x the raw mean cosine
    e = enc(src).double()
    assert same.clip_t == pytest.approx(100 * clip_t(text, e), rel=1e-12)
    with pytest.raises(ValueError, match="^source is 4 frames of 64x64 but edited is 3 frames"):
        score_edit(src[:3], src, text, enc)


# ---------------------------------------------------------------- through the server
@pytest.fixture(scope="module")
def clip_files(comfy_server):
    from vg_testlib import comfyui_path, load_script
    maker = load_script("make_test_models")
    return maker.write_clip_pair(os.path.join(comfyui_path(), "models"))


def metrics_prompt(clip_name, ckpt, text_from="file"):
    p = {
        "load": {"class_type": "VideoGrainVideoLoader", "inputs": {
            "video": "metrics_src.mp4", "skip_first_frames": 0, "select_every_nth": 1, "frame_load_cap": 3,
            "size": 64, "crop": "center"}},
        "edit": {"class_type": "ImageInvert", "inputs": {"image": ["load", 0]}},
        "vision": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": clip_name}},
        "text": {"class_type": "CLIPLoader", "inputs": {"clip_name": clip_name, "type": "stable_diffusion"}},
        "metrics": {"class_type": "VideoGrainMetrics", "inputs": {
            "edited": ["edit", 0], "source": ["load", 0], "prompt": "a red fox in the snow",
            "clip_vision": ["vision", 0], "clip": ["text", 0]}},
        "show": {"class_type": "PreviewAny", "inputs": {"source": ["metrics", 3]}},
    }
    if text_from == "checkpoint":
        p["ckpt"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}
        p["metrics"]["inputs"]["clip"] = ["ckpt", 1]
        del p["text"]
    return p


@pytest.mark.server
def test_metrics_node_through_the_server(comfy_server, clip_files, test_models):
    from test_video_loader import make_video
    make_video(os.path.join(comfy_server.input_dir, "metrics_src.mp4"), n=3, w=64, h=64, fps=8)
    entry = comfy_server.run(metrics_prompt(clip_files, test_models.small_name), timeout=1200)
    (table,) = entry["outputs"]["metrics"]["text"]
    values = dict(re.findall(r"^(CLIP-T \(x100\)|CLIP-F \(x100\)|Warp-Err \(x100\)|Q-edit)\s+(\S+)", table, re.M))
    assert len(values) == 4, table
    ct, cf, we, qe = (float(values[k]) for k in ("CLIP-T (x100)", "CLIP-F (x100)", "Warp-Err (x100)", "Q-edit"))
    assert -100 <= ct <= 100 and -100 <= cf <= 100.0001 and we >= 0
    assert qe == pytest.approx(ct / we, rel=2e-2, abs=0.01)
    (shown,) = entry["outputs"]["show"]["text"]                  # the q_edit FLOAT output, unrounded
    assert float(shown) == pytest.approx(qe, abs=0.006)
    assert "3 frames" in table


@pytest.mark.server
def test_a_clip_without_text_projection_is_refused_naming_clip(comfy_server, clip_files, test_models):
    from test_video_loader import make_video
    from vg_testlib import ExecutionFailed
    make_video(os.path.join(comfy_server.input_dir, "metrics_src.mp4"), n=3, w=64, h=64, fps=8)
    prompt = metrics_prompt(clip_files, test_models.small_name, text_from="checkpoint")
    with pytest.raises(ExecutionFailed) as e:
        comfy_server.run(prompt, timeout=600)
    msgs = [m[1] for m in e.value.entry["status"]["messages"] if m[0] == "execution_error"]
    assert msgs and msgs[0]["node_id"] == "metrics"
    assert re.search(r"^clip: the model's text projection is missing from its file", msgs[0]["exception_message"])
    assert "clip-vit-large-patch14" in msgs[0]["exception_message"]
