"""Attention Capture, Attention View and Auto Regions through the host: in process (the
capture changes no result, runs once per call whether applied before or after the
ST-Layout Patch), and end to end through POST /prompt on the sample clip with the random
test model (capture while inverting, heatmaps, K masks; host caching; the inversion cache
is bypassed while capturing; a latent of another run is refused)."""
from __future__ import annotations

import copy
import os
from importlib import import_module

import numpy as np
import pytest
import torch
from PIL import Image
from vg_testlib import REPO, ExecutionFailed, copy_to_input

FRAMES, SIZE = 3, 128     # latent 16x16: token grids 16, 8, 4, 2
PROMPT = "two people walking on a street"


def _args(out):
    return out.args if hasattr(out, "args") else out.result


# ---------------------------------------------------------------- in process
@pytest.fixture(scope="module")
def env(comfy_host, test_models):
    import comfy.sd
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(test_models.small, output_clipvision=False)
    cls = comfy_host.nodes.NODE_CLASS_MAPPINGS
    pack = comfy_host.pack.__name__
    Layout = import_module(pack + ".videograin_core.prompts.layout").Layout
    left = torch.zeros(2, 64, 64)
    left[:, :, :32] = 1
    positive, layout = _args(cls["VideoGrainLayoutConditioning"].execute(
        clip=clip, global_prompt="a red car and a woman", layout=Layout().add(left, "red car").add(1 - left, "woman")))
    negative = comfy_host.nodes.CLIPTextEncode().encode(clip, "")[0]
    return dict(model=model, clip=clip, cls=cls, nodes=comfy_host.nodes, positive=positive, negative=negative,
                layout=layout, latent={"samples": torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))})


def capture(env, model, **kw):
    args = dict(model=model, words="car, woman", prompt="a red car and a woman", cross_grid="1/2+1/4",
                self_grid="1/2", clip=env["clip"])
    args.update(kw)
    return _args(env["cls"]["VideoGrainAttentionCapture"].execute(**args))


def patch(env, model):
    return _args(env["cls"]["VideoGrainSTLayoutPatch"].execute(
        model=model, layout=env["layout"], full_frame_attention=True, self_strength=0.3, cross_strength=1.0,
        end_percent=0.5, self_branch="uncond", size_term="reference", modulate_full_resolution=False))[0]


def sample(env, model):
    return env["nodes"].KSampler().sample(model, 3, 3, 5.0, "ddim", "ddim_uniform", env["positive"], env["negative"],
                                          env["latent"], denoise=1.0)[0]["samples"]


def test_capture_changes_nothing_and_runs_once_per_call(env):
    plain_patched = sample(env, patch(env, env["model"]))
    m_after, rec_after = capture(env, patch(env, env["model"]))     # ST-Layout Patch, then capture
    out_after = sample(env, m_after)
    assert torch.equal(out_after, plain_patched)
    m_before, rec_before = capture(env, env["model"])              # capture (bare runtime), then the patch
    out_before = sample(env, patch(env, m_before))
    assert torch.equal(out_before, plain_patched)
    a, b = rec_after.take_for(out_after), rec_before.take_for(out_before)
    assert {k: s.count for k, s in a.cross.items()} == {k: s.count for k, s in b.cross.items()}
    assert {k: s.count for k, s in a.features.items()} == {k: s.count for k, s in b.features.items()}
    # 3 steps x the cross-attention layers at 1/2 and at 1/4 (small test UNet: one encoder, two decoder each)
    assert a.cross[1].count == 3 * 3 and a.cross[2].count == 3 * 3
    for name in ("car", "woman"):
        assert torch.allclose(a.cross_maps()[name], b.cross_maps()[name], atol=1e-6)
    assert a.self_features().shape == (2, 4, 4, 2 * 320)            # two decoder layers at 1/2


def test_capture_on_an_unpatched_model_changes_nothing(env):
    plain = sample(env, env["model"])
    m, rec = capture(env, env["model"])
    assert torch.equal(sample(env, m), plain)
    maps = rec.take_for(plain).cross_maps()
    assert set(maps) == {"car", "woman"} and maps["car"].shape == (2, 4, 4)
    # the input model is untouched, and trajectory attention still refuses it (bare runtime only)
    assert "patches_replace" not in env["model"].model_options.get("transformer_options", {})
    traj = import_module(env["cls"]["VideoGrainTrajectoryAttention"].__module__)
    assert not traj.has_pack_runtime(m) and traj.has_pack_runtime(patch(env, m))


def test_capture_input_errors_name_the_input(env):
    with pytest.raises(ValueError, match=r"^words: 'bicycle' is not in the prompt"):
        capture(env, env["model"], words="bicycle")
    with pytest.raises(ValueError, match=r"^clip: words are given"):
        capture(env, env["model"], clip=None)
    with pytest.raises(ValueError, match=r"^prompt is empty"):
        capture(env, env["model"], prompt=" ")
    with pytest.raises(ValueError, match=r"^nothing to capture"):
        capture(env, env["model"], words="", self_grid="off")
    with pytest.raises(ValueError, match=r"^layout: it was encoded for 77 tokens but the prompt has 154"):
        capture(env, env["model"], prompt=" ".join(["a"] * 80) + " red car", words="car", layout=env["layout"])
    # a layout alone gives one map per local prompt
    m, rec = capture(env, env["model"], words="", prompt="", clip=None, layout=env["layout"])
    assert [n for n, _ in rec.spec.words] == ["red car", "woman"]


# ---------------------------------------------------------------- through the server
def view_prompt(ckpt: str, video: str) -> dict:
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "load": {"class_type": "VideoGrainVideoLoader", "inputs": {
            "video": video, "skip_first_frames": 0, "select_every_nth": 4, "frame_load_cap": FRAMES, "size": SIZE,
            "crop": "center"}},
        "src": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["ckpt", 1]}},
        "enc": {"class_type": "VAEEncode", "inputs": {"pixels": ["load", 0], "vae": ["ckpt", 2]}},
        "cap": {"class_type": "VideoGrainAttentionCapture", "inputs": {
            "model": ["ckpt", 0], "words": "people, street", "prompt": PROMPT, "cross_grid": "1/2+1/4",
            "self_grid": "1/2", "clip": ["ckpt", 1]}},
        "inv": {"class_type": "VideoGrainDDIMInvert", "inputs": {
            "model": ["cap", 0], "conditioning": ["src", 0], "latent": ["enc", 0], "steps": 3, "cfg": 1.0,
            "use_cache": True}},
        "view": {"class_type": "VideoGrainAttentionView", "inputs": {
            "capture": ["cap", 1], "latent": ["inv", 0], "images": ["load", 0], "opacity": 0.6}},
        "save_view": {"class_type": "SaveImage", "inputs": {"images": ["view", 0], "filename_prefix": "vg_cap/view"}},
        "regions": {"class_type": "VideoGrainAutoRegions", "inputs": {
            "capture": ["cap", 1], "latent": ["inv", 0], "images": ["load", 0], "regions": 3,
            "name_threshold": 0.4, "seed": 0}},
        "masks": {"class_type": "MaskToImage", "inputs": {"mask": ["regions", 0]}},
        "masks2": {"class_type": "MaskToImage", "inputs": {"mask": ["regions", 1]}},
        "masks3": {"class_type": "MaskToImage", "inputs": {"mask": ["regions", 2]}},
        "masks4": {"class_type": "MaskToImage", "inputs": {"mask": ["regions", 3]}},
        **{f"save_m{i}": {"class_type": "SaveImage", "inputs": {"images": [f"masks{'' if i == 1 else i}", 0],
                                                              "filename_prefix": f"vg_cap/m{i}"}} for i in (1, 2, 3, 4)},
        "save_preview": {"class_type": "SaveImage", "inputs": {"images": ["regions", 8], "filename_prefix": "vg_cap/p"}},
        "names": {"class_type": "PreviewAny", "inputs": {"source": ["regions", 9]}},
    }


def _images(client, entry, node):
    out = []
    for item in entry["outputs"][node]["images"]:
        with Image.open(os.path.join(client.output_dir, item["subfolder"], item["filename"])) as im:
            out.append(np.asarray(im.convert("RGB")))
    return out


def run(client, prompt):
    events = []
    entry = client.run_with_progress(prompt, lambda ev, d: events.append((ev, d)), timeout=1800)
    executed = {d.get("node") for ev, d in events if ev == "executing" and d.get("node")}
    sampled = {d.get("node") for ev, d in events if ev == "progress"}
    return entry, executed, sampled


@pytest.mark.server
def test_capture_view_and_regions_on_the_sample_clip(comfy_server, test_models):
    client = comfy_server
    video = copy_to_input(client, os.path.join(REPO, "example_data", "vtest_two_people.mp4"), "cap_two_people.mp4")
    prompt = view_prompt(test_models.small_name, video)
    entry, executed, sampled = run(client, prompt)
    assert "inv" in sampled
    views = _images(client, entry, "save_view")
    assert len(views) == 2 * FRAMES and all(v.shape == (SIZE, SIZE, 3) for v in views)   # people, street
    masks = [np.stack(_images(client, entry, f"save_m{i}"))[..., 0] > 127 for i in (1, 2, 3, 4)]
    assert all(m.shape == (FRAMES, SIZE, SIZE) for m in masks)
    assert (masks[0].astype(int) + masks[1] + masks[2] == 1).all(), "the three masks partition every frame"
    assert all(m.any() for m in masks[:3]) and not masks[3].any(), "mask_4 is empty for K = 3"
    assert masks[0][0, 0, 0], "region 1 holds the first pixel of frame 0"
    (names,) = entry["outputs"]["names"]["text"]
    assert [l.split(":")[0] for l in names.splitlines()] == ["mask_1", "mask_2", "mask_3"]
    assert len(_images(client, entry, "save_preview")) == FRAMES

    # The same prompt again: everything cached, the same images.
    again, executed, sampled = run(client, prompt)
    assert not sampled and "cap" not in executed
    assert all(np.array_equal(a, b) for a, b in zip(views, _images(client, again, "save_view")))

    # A new view setting: only the view re-runs (its maps come from the cached inversion's take).
    p2 = copy.deepcopy(prompt)
    p2["view"]["inputs"]["opacity"] = 0.3
    _, executed, sampled = run(client, p2)
    assert "view" in executed and "inv" not in executed and not sampled

    # New words: a new capture and recorder. The inversion cache holds this inversion, but
    # a capture needs the UNet to run: DDIM Invert samples again, and the maps come back.
    p3 = copy.deepcopy(prompt)
    p3["cap"]["inputs"]["words"] = "people"
    entry3, executed, sampled = run(client, p3)
    assert "inv" in sampled
    assert len(_images(client, entry3, "save_view")) == FRAMES
    assert "bypasses the inversion cache" in client.log_text()
    # masks: the self-attention features did not change with the words
    masks3 = [np.stack(_images(client, entry3, f"save_m{i}"))[..., 0] > 127 for i in (1, 2, 3)]
    assert all(np.array_equal(a, b) for a, b in zip(masks[:3], masks3))


@pytest.mark.server
def test_a_latent_of_another_run_is_refused(comfy_server, test_models):
    client = comfy_server
    video = copy_to_input(client, os.path.join(REPO, "example_data", "vtest_two_people.mp4"), "cap_two_people.mp4")
    prompt = view_prompt(test_models.small_name, video)
    for k in [k for k in prompt if k.startswith(("save_m", "masks", "save_preview", "names", "regions"))]:
        del prompt[k]
    prompt["view"]["inputs"]["latent"] = ["enc", 0]      # the source latent, not the inversion's result
    prompt["hold"] = {"class_type": "SaveLatent", "inputs": {"samples": ["inv", 0], "filename_prefix": "vg_cap/l"}}
    with pytest.raises(ExecutionFailed) as e:
        client.run(prompt, timeout=1800)
    msgs = [m[1] for m in e.value.entry["status"]["messages"] if m[0] == "execution_error"]
    assert msgs and msgs[0]["node_id"] == "view"
    assert msgs[0]["exception_message"].startswith("latent: ")
