"""Edit metrics: the formulas of videograin_core.metrics.clip_scores against plain numpy on
fixed embeddings, the limits (identical frames), and the VideoGrain Metrics node through
POST /prompt with a random CLIP ViT-L/14 in openai's file layout through VideoGrain Metrics
CLIP Loader, including the refusals of a file without the text projection (what an SD1.5
checkpoint's CLIP is) and of one whose projection is zeros."""
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


def metrics_prompt(clip_name):
    return {
        "load": {"class_type": "VideoGrainVideoLoader", "inputs": {
            "video": "metrics_src.mp4", "skip_first_frames": 0, "select_every_nth": 1, "frame_load_cap": 3,
            "size": 64, "crop": "center"}},
        "edit": {"class_type": "ImageInvert", "inputs": {"image": ["load", 0]}},
        "clip": {"class_type": "VideoGrainMetricsCLIPLoader", "inputs": {"clip_name": clip_name}},
        "metrics": {"class_type": "VideoGrainMetrics", "inputs": {
            "edited": ["edit", 0], "source": ["load", 0], "prompt": "a red fox in the snow",
            "metrics_clip": ["clip", 0]}},
        "show": {"class_type": "PreviewAny", "inputs": {"source": ["metrics", 3]}},
    }


def write_partial_clip(comfy_server, name, *, drop=(), zero=()):
    """A small safetensors file in models/clip_vision with openai's key names: the keys the
    loader checks, less `drop`, with `zero` all zeros (the loader refuses before loading)."""
    from safetensors.torch import save_file
    from vg_testlib import comfyui_path
    sd = {"text_projection.weight": torch.randn(8, 8), "visual_projection.weight": torch.randn(8, 8),
          "text_model.final_layer_norm.weight": torch.ones(8), "vision_model.post_layernorm.weight": torch.ones(8)}
    sd = {k: (torch.zeros_like(v) if k in zero else v) for k, v in sd.items() if k not in drop}
    save_file(sd, os.path.join(comfyui_path(), "models", "clip_vision", name))
    return name


@pytest.mark.server
def test_metrics_node_through_the_server(comfy_server, clip_files):
    from test_video_loader import make_video
    make_video(os.path.join(comfy_server.input_dir, "metrics_src.mp4"), n=3, w=64, h=64, fps=8)
    entry = comfy_server.run(metrics_prompt(clip_files), timeout=1200)
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
def test_the_text_embedding_uses_the_files_projection(comfy_host, clip_files):
    """The prompt's embedding is the pooled output times the projection READ FROM THE FILE
    (a plain matmul written here), whatever the host did with its own copy."""
    from safetensors import safe_open
    from vg_testlib import comfyui_path, pack_modules
    loader = pack_modules(comfy_host, m="nodes.metrics_clip").m
    metrics = pack_modules(comfy_host, m="nodes.metrics").m
    with torch.inference_mode():
        mc = loader.load_metrics_clip(clip_files)
        # scribble over the host's copy: the node must not depend on it
        for name, mod in mc.text.cond_stage_model.named_modules():
            if name.endswith("text_projection"):
                mod.weight.fill_(0.0)
        got = metrics.text_embedding(mc, "a red fox")
        _, pooled = mc.text.encode_from_tokens(mc.text.tokenize("a red fox"), return_pooled="unprojected")
    with safe_open(os.path.join(comfyui_path(), "models", "clip_vision", clip_files), "pt") as f:
        w = f.get_tensor("text_projection.weight").double()
    want = (pooled[:1].double() @ w.T)[0]
    assert got.shape == (w.shape[0],)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.server
def test_a_clip_without_text_projection_is_refused_naming_clip_name(comfy_server):
    """What an SD1.5 checkpoint's CLIP-L is: refused at validation, before anything runs."""
    from test_video_loader import make_video
    from vg_testlib import PromptRejected
    make_video(os.path.join(comfy_server.input_dir, "metrics_src.mp4"), n=3, w=64, h=64, fps=8)
    name = write_partial_clip(comfy_server, "vg_no_text_projection.safetensors", drop=("text_projection.weight",))
    with pytest.raises(PromptRejected) as e:
        comfy_server.queue(metrics_prompt(name))
    body = str(e.value.body)
    assert "clip_name: 'vg_no_text_projection.safetensors' lacks text_projection.weight" in body
    assert "clip-vit-large-patch14" in body
    assert comfy_server.get("/system_stats")  # still serving


@pytest.mark.server
def test_a_zero_projection_is_refused_before_loading(comfy_server):
    from test_video_loader import make_video
    from vg_testlib import ExecutionFailed
    make_video(os.path.join(comfy_server.input_dir, "metrics_src.mp4"), n=3, w=64, h=64, fps=8)
    name = write_partial_clip(comfy_server, "vg_zero_projection.safetensors", zero=("text_projection.weight",))
    with pytest.raises(ExecutionFailed) as e:
        comfy_server.run(metrics_prompt(name), timeout=600)
    msgs = [m[1] for m in e.value.entry["status"]["messages"] if m[0] == "execution_error"]
    assert msgs and msgs[0]["node_id"] == "clip"
    assert re.search(r"^clip_name: 'vg_zero_projection.safetensors' holds a text_projection.weight that is all "
                     r"zeros", msgs[0]["exception_message"])
