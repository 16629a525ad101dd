"""A catalogue of bad (and borderline-legal) inputs, every one sent through the real server
with POST /prompt as a mutation of one small edit:

    Video Loader -> Region Mask -> Local Prompt -> Layout Conditioning -> ST-Layout Patch
    -> DDIM Invert -> Sample -> Decode -> Save Video   (+ SaveLatent of the result and the source)

Errors must name the input and come before any sampling (no progress event from the
inversion or the sampler); legal cases must do the right thing, checked on the latents.
Afterwards the server still answers and a valid edit still succeeds. Also: hostile
filename prefixes and the cache's file names (security)."""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import time
import types
import uuid

import numpy as np
import pytest
import torch
from PIL import Image
from test_video_loader import make_video
from vg_testlib import ExecutionFailed, PromptRejected, comfyui_path, edit_prompt, file_identity, load_script

SIZE, SRC_FRAMES = 64, 6
SAMPLING_NODES = ("inv", "sample", "p2ps")
# An error a node reports must come before that node or any later one samples; the nodes it
# depends on ran (and sampled) first.
UPSTREAM = {"sample": {"inv"}, "p2ps": {"inv"}}


# ---------------------------------------------------------------- inputs on disk
def _png(path, arr):
    Image.fromarray(np.asarray(arr, np.uint8), "L").save(path)


def _mask(w=SIZE, h=SIZE, frac=0.5):
    m = np.zeros((h, w), np.uint8)
    m[:, : int(round(w * frac))] = 255
    return m


def write_sd2_like_unet(models_dir: str) -> str:
    """A tiny random SD2-family UNet (context_dim 1024, linear transformer projections),
    written like scripts/make_test_models.py does; the host detects it as SD20."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    maker = load_script("make_test_models")
    cfg = dict(maker.SMALL_UNET, context_dim=1024, use_linear_in_transformer=True, num_heads=-1,
               num_head_channels=64)
    recipe = json.dumps({"cfg": cfg, "version": maker.RECIPE_VERSION}, sort_keys=True)
    path = os.path.join(models_dir, "diffusion_models", "videograin_test_sd2like_unet.safetensors")
    if os.path.exists(path):
        with safe_open(path, "pt") as f:
            if (f.metadata() or {}).get("recipe") == recipe:
                return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(maker._unet_sd(cfg, 0), path + ".partial", metadata={"recipe": recipe})
    os.replace(path + ".partial", path)
    return path


@pytest.fixture(scope="module")
def env(comfy_server, test_models, tmp_path_factory):
    d = comfy_server.input_dir
    make_video(os.path.join(d, "bad_src.mp4"), n=SRC_FRAMES, w=SIZE, h=SIZE, fps=12)
    open(os.path.join(d, "bad_empty.mp4"), "wb").close()
    with open(os.path.join(d, "bad_src.mp4"), "rb") as f:
        data = f.read()
    with open(os.path.join(d, "bad_truncated.mp4"), "wb") as f:
        f.write(data[: len(data) // 2])
    import av  # an audio-only file: a real container without a video stream
    with av.open(os.path.join(d, "bad_sound.wav"), "w") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        fr = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        fr.sample_rate = 8000
        for p in s.encode(fr):
            c.mux(p)
        for p in s.encode():
            c.mux(p)
    outside = tmp_path_factory.mktemp("outside")
    make_video(str(outside / "secret.mp4"), n=2, w=SIZE, h=SIZE)
    link = os.path.join(d, "bad_escape.mp4")
    if not os.path.lexists(link):
        os.symlink(outside / "secret.mp4", link)
    _png(os.path.join(d, "bad_left.png"), _mask())
    _png(os.path.join(d, "bad_left34.png"), _mask(frac=0.75))
    _png(os.path.join(d, "bad_zero.png"), _mask(frac=0))
    _png(os.path.join(d, "bad_one.png"), _mask(frac=1))
    _png(os.path.join(d, "bad_small.png"), _mask(32, 32))
    for name, n in (("bad_seq3", 3), ("bad_seq6", SRC_FRAMES)):
        os.makedirs(os.path.join(d, name), exist_ok=True)
        for i in range(n):
            _png(os.path.join(d, name, f"{i:03}.png"), _mask())
    shutil.copytree(os.path.join(d, "bad_seq6"), os.path.join(d, "bad_seq_damaged"), dirs_exist_ok=True)
    with open(os.path.join(d, "bad_seq_damaged", "003.png"), "wb") as f:  # frame 3 is one the edit uses
        f.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with open(os.path.join(d, "bad_mask_noise.mp4"), "wb") as f:
        f.write(bytes(range(256)) * 8)
    sd2 = write_sd2_like_unet(os.path.join(comfyui_path(), "models"))
    return types.SimpleNamespace(client=comfy_server, ckpt=test_models.small_name, cnet=test_models.small_cnet_name,
                                 sd2=os.path.basename(sd2), outside=str(outside))


# ---------------------------------------------------------------- the base edit
def base_prompt(ckpt: str, tag: str = "base", steps: int = 2) -> dict:
    """A 2-frame 64x64 edit (frames 0 and 3 of a 6-frame clip), one region on the left half,
    plus the result and source latents saved for the checks of legal cases."""
    prompt = edit_prompt(ckpt, "bad_src.mp4", "bad_left.png", steps=steps, end_percent=0.5, prefix=f"vg_bad/{tag}",
                         select_every_nth=3, frame_load_cap=2, size=SIZE)
    prompt["lat"] = {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": f"vg_bad_lat/{tag}"}}
    prompt["srclat"] = {"class_type": "SaveLatent", "inputs": {"samples": ["enc", 0], "filename_prefix": f"vg_bad_src/{tag}"}}
    return prompt


class Result(types.SimpleNamespace):
    """status: success | rejected (POST /prompt validation) | error (execution)."""

    @property
    def sampled(self) -> set:
        return {d.get("node") for ev, d in self.events if ev == "progress"} & set(SAMPLING_NODES)


def run_case(client, prompt: dict, timeout: float = 600) -> Result:
    events = []
    t0 = time.time()
    try:
        entry = client.run_with_progress(prompt, lambda ev, d: events.append((ev, d)), timeout)
        return Result(status="success", entry=entry, text="", nodes=set(), events=events, seconds=time.time() - t0)
    except PromptRejected as e:
        body = e.body if isinstance(e.body, dict) else {}
        return Result(status="rejected", entry=None, text=json.dumps(e.body), nodes=set(body.get("node_errors") or {}),
                      events=events, seconds=time.time() - t0)
    except ExecutionFailed as e:
        msgs = [m[1] for m in e.entry["status"].get("messages", []) if m[0] == "execution_error"]
        return Result(status="error", entry=e.entry, text=json.dumps(msgs), nodes={m.get("node_id") for m in msgs},
                      events=events, seconds=time.time() - t0)


def saved_latent(client, entry, node="lat") -> torch.Tensor:
    from safetensors.torch import load_file
    (item,) = entry["outputs"][node]["latents"]
    return load_file(os.path.join(client.output_dir, item["subfolder"], item["filename"]))["latent_tensor"]


def saved_video(client, entry, node="save"):
    import av
    item = entry["outputs"][node]["images"][0]
    with av.open(os.path.join(client.output_dir, item["subfolder"], item["filename"])) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]
    return len(frames), (frames[0].shape[1], frames[0].shape[0])


# ---------------------------------------------------------------- mutations
def put(node, **inputs):
    def f(p, env):
        p[node]["inputs"].update(inputs)
    return f


def seq(*fns):
    def f(p, env):
        for fn in fns:
            fn(p, env)
    return f


def add(**nodes):
    def f(p, env):
        p.update(copy.deepcopy(nodes))
    return f


def drop(node, key):
    def f(p, env):
        del p[node]["inputs"][key]
    return f


def mask_file(path):
    """The region from VideoGrainRegionMaskFromFile instead of LoadImageMask."""
    return seq(add(region={"class_type": "VideoGrainRegionMaskFromFile", "inputs": {
        "path": path, "transform": ["load", 3], "threshold": 0.5, "channel": "luminance"}}),
        lambda p, env: p.pop("mask"))


def second_region(image, prompt, size=None):
    """A second Local Prompt chained after the first (its mask from `image` through the
    Region Mask node, or a raw SolidMask of `size` wired straight in)."""
    def f(p, env):
        if size:
            p["mask2"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": size, "height": size}}
            src = ["mask2", 0]
        else:
            p["mask2"] = {"class_type": "LoadImageMask", "inputs": {"image": image, "channel": "red"}}
            p["region2"] = {"class_type": "VideoGrainRegionMask", "inputs": {"mask": ["mask2", 0],
                                                                             "transform": ["load", 3], "threshold": 0.5}}
            src = ["region2", 0]
        p["local2"] = {"class_type": "VideoGrainLocalPrompt", "inputs": {"mask": src, "local_prompt": prompt,
                                                                         "layout": ["local", 0]}}
        p["cond"]["inputs"]["layout"] = ["local2", 0]
    return f


def other_latent(**loader):
    """The latent VAE-encoded from a second loader (other frames / size) than the masks'."""
    def f(p, env):
        p["load2"] = copy.deepcopy(p["load"])
        p["load2"]["inputs"].update(loader)
        p["enc"]["inputs"]["pixels"] = ["load2", 0]
    return f


def controlnet_hint(frames):
    """ControlNet on both conditionings (inversion and sampling) with a hint of `frames` images."""
    def f(p, env):
        p["cnet"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": env.cnet}}
        p["hint"] = copy.deepcopy(p["load"])
        p["hint"]["inputs"].update(select_every_nth=1, frame_load_cap=frames)
        p["apply"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": ["cond", 0], "negative": ["empty", 0], "control_net": ["cnet", 0], "image": ["hint", 0],
            "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}}
        p["inv"]["inputs"]["conditioning"] = ["apply", 1]
        p["sample"]["inputs"].update(positive=["apply", 0], negative=["apply", 1])
    return f


def sd2_model(p, env):
    p["unet"] = {"class_type": "UNETLoader", "inputs": {"unet_name": env.sd2, "weight_dtype": "default"}}
    p["patch"]["inputs"]["model"] = ["unet", 0]


def abs_video(p, env):
    p["load"]["inputs"]["video"] = os.path.join(env.client.input_dir, "bad_src.mp4")


def trajectories(**loader):
    """Trajectory attention on the patched model for inversion and sampling, its flow from a
    loader with `loader` changes (another clip or size), or from the edit's own frames."""
    def f(p, env):
        src = "load"
        if loader:
            p["load3"] = copy.deepcopy(p["load"])
            p["load3"]["inputs"].update(loader)
            src = "load3"
        p["traj"] = {"class_type": "VideoGrainFlowTrajectories", "inputs": {"images": [src, 0], "method": "DIS (OpenCV)"}}
        p["tatt"] = {"class_type": "VideoGrainTrajectoryAttention", "inputs": {
            "model": ["patch", 0], "trajectories": ["traj", 0], "resolutions": "full"}}
        p["inv"]["inputs"]["model"] = ["tatt", 0]
        p["sample"]["inputs"]["model"] = ["tatt", 0]
    return f


LONG = " ".join(["a"] * 80)  # 80 one-token words: the prompt needs a second 77-token window


# ---------------------------------------------------------------- checks of the legal cases
def _rerun(ctx, prompt, mutate, tag):
    p = copy.deepcopy(prompt)
    mutate(p, ctx.env)
    for node, pre in (("save", "vg_bad/"), ("lat", "vg_bad_lat/"), ("srclat", "vg_bad_src/")):
        p[node]["inputs"]["filename_prefix"] = pre + tag
    r = run_case(ctx.env.client, p)
    assert r.status == "success", r.text[:3000]
    return r


def p2p_sample(source=0, target=1, control="p2p"):
    """A P2P Control + P2P Sample on the base edit's inversion (the P2P Sample's source and
    target wired from outputs `source` / `target` of the P2P Control, its p2p from `control`)."""
    text = dict(clip=["ckpt", 1], mode="word swap", cross_replace=0.2, self_replace=0.5, reweight="",
                blend_source_word="", blend_target_word="", blend_threshold=0.3, parity_bug=False)

    def f(p, env):
        p["p2p"] = {"class_type": "VideoGrainP2PControl",
                    "inputs": dict(text, source_prompt="a fox in the snow", target_prompt="a cat in the snow")}
        p["p2p_other"] = {"class_type": "VideoGrainP2PControl",
                          "inputs": dict(text, source_prompt="a dog on the grass", target_prompt="a cow on the grass")}
        p["p2ps"] = {"class_type": "VideoGrainP2PSample", "inputs": {
            "model": ["ckpt", 0], "source": ["p2p", source], "target": ["p2p", target], "p2p": [control, 2],
            "negative": ["empty", 0], "inversion": ["inv", 1], "cfg": 7.5, "source_mode": "direct",
            "frame_attention": "all frames"}}
        p["dec"]["inputs"]["samples"] = ["p2ps", 0]
        del p["sample"], p["lat"]   # the base edit's own sampler is not part of this graph
    return f


def frames_and_size(frames, size):
    def check(ctx, prompt, r):
        assert saved_video(ctx.env.client, r.entry) == (frames, size)
        assert saved_latent(ctx.env.client, r.entry).shape == (frames, 4, size[1] // 8, size[0] // 8)
    return check


def output_is_source(ctx, prompt, r):
    """All-zero masks: no region, so every step is blended back: the result is the source."""
    out, src = saved_latent(ctx.env.client, r.entry), saved_latent(ctx.env.client, r.entry, "srclat")
    assert torch.allclose(out, src, atol=1e-4), (out - src).abs().max()


def blend_is_a_no_op(ctx, prompt, r):
    """All-one masks: the trajectory blend must change nothing (same latent as blend off)."""
    off = _rerun(ctx, prompt, put("sample", blend="off"), ctx.tag + "_off")
    assert torch.equal(saved_latent(ctx.env.client, r.entry), saved_latent(ctx.env.client, off.entry))


def outside_union_is_source(cols):
    """Latent columns `cols` and beyond lie outside every region: they are the source."""
    def check(ctx, prompt, r):
        out, src = saved_latent(ctx.env.client, r.entry), saved_latent(ctx.env.client, r.entry, "srclat")
        assert torch.allclose(out[..., cols:], src[..., cols:], atol=1e-4)
        assert not torch.allclose(out[..., :cols], src[..., :cols], atol=1e-2), "the regions were edited"
    return check


def local_prompt_has_effect(ctx, prompt, r):
    """The local prompt in the second CLIP window is spliced and modulated: the edit
    differs from the same layout without text (and keeps the source outside the region)."""
    plain = _rerun(ctx, prompt, put("local", local_prompt=""), ctx.tag + "_notext")
    a, b = saved_latent(ctx.env.client, r.entry), saved_latent(ctx.env.client, plain.entry)
    assert not torch.allclose(a, b, atol=1e-4)
    outside_union_is_source(4)(ctx, prompt, r)


def injection_changes_the_edit_inside_the_regions(ctx, prompt, r):
    """PnP on: the edit differs from the same edit without injection, and outside the
    regions the latent is still the source (the blend comes after injection)."""
    off = _rerun(ctx, prompt, put("sample", inject_step=0), ctx.tag + "_off")
    a, b = saved_latent(ctx.env.client, r.entry), saved_latent(ctx.env.client, off.entry)
    assert not torch.allclose(a[..., :4], b[..., :4], atol=1e-3)
    outside_union_is_source(4)(ctx, prompt, r)


def positive_is_ignored(ctx, prompt, r):
    """cfg 0 is the unconditional prediction: another positive prompt gives the same edit."""
    other = _rerun(ctx, prompt, seq(put("cond", global_prompt="a blue fox in the snow"),
                                    put("local", local_prompt="blue fox")), ctx.tag + "_blue")
    assert torch.allclose(saved_latent(ctx.env.client, r.entry), saved_latent(ctx.env.client, other.entry), atol=1e-5)


# ---------------------------------------------------------------- the catalogue
# (id, mutation, node that must report it, message regex | check of a legal case)
CASES = [
    # P2P Sample: a control of other prompts, and source/target swapped; refused before its sampling
    ("p2p-control-of-other-prompts", p2p_sample(control="p2p_other"), "p2ps",
     r"source: this is not the conditioning the P2P control was made for"),
    ("p2p-source-target-swapped", p2p_sample(source=1, target=0), "p2ps",
     r"source: this is not the conditioning the P2P control was made for \(source and target are swapped\)"),
    # Video Loader: files and paths
    ("video-missing", put("load", video="bad_nothere.mp4"), "load", r"video 'bad_nothere\.mp4' does not exist"),
    ("video-empty", put("load", video="bad_empty.mp4"), "load", r"video 'bad_empty\.mp4' is empty \(0 bytes\)"),
    ("video-truncated", put("load", video="bad_truncated.mp4"), "load",
     r"video 'bad_truncated\.mp4' (could not be read as a video|could not be decoded|contains no decodable)"),
    ("video-not-a-video", put("load", video="bad_sound.wav"), "load", r"video 'bad_sound\.wav' has no video stream"),
    ("video-dotdot", put("load", video="../bad_src.mp4"), "load", r"video '\.\./bad_src\.mp4': '\.\.' is not allowed"),
    ("video-absolute", abs_video, "load", r"absolute paths are not allowed"),
    ("video-symlink-out", put("load", video="bad_escape.mp4"), "load",
     r"video 'bad_escape\.mp4' resolves outside the input folder"),
    # Video Loader: frame selection and size
    ("no-frames-after-skip", put("load", skip_first_frames=10), "load",
     r"video 'bad_src\.mp4' has 6 frames: skip_first_frames=10 leaves none"),
    ("stride-0", put("load", select_every_nth=0), "load", r"select_every_nth"),
    ("crop-unknown", put("load", crop="diagonal"), "load", r"crop.*'diagonal'"),
    ("size-below-8", put("load", size=4), "load", r"4x4 is smaller than 8 pixels on one side: choose a larger size"),
    ("frame-cap-0-is-all", put("load", frame_load_cap=0, select_every_nth=2), None, frames_and_size(3, (64, 64))),
    ("size-not-multiple-of-8", put("load", size=60), None, frames_and_size(2, (56, 56))),
    # Region masks
    ("mask-frame-count", mask_file("bad_seq3"), "region",
     r"mask 'bad_seq3' has 3 frames but the video has 6 source frames \(2 loaded\)"),
    ("mask-size", put("mask", image="bad_small.png"), "region",
     r"mask is 32x32 but the video's source frames are 64x64 and the loaded frames 64x64"),
    ("masks-differ-in-size", second_region(None, "snow", size=32), "local2",
     r"region mask is 32x32 but the layout's regions are 64x64"),
    ("mask-image-damaged", mask_file("bad_seq_damaged"), "region",
     r"mask image '003\.png' could not be read \(\w+\): the file is damaged or not an image"),
    ("mask-video-damaged", mask_file("bad_mask_noise.mp4"), "region",
     r"mask video 'bad_mask_noise\.mp4' could not be read as a video"),
    ("mask-path-dotdot", mask_file("../bad_left.png"), "region", r"path '\.\./bad_left\.png' leaves the input folder"),
    ("mask-path-absolute", mask_file("/etc/hostname"), "region", r"path '/etc/hostname' is absolute"),
    ("mask-all-zero", put("mask", image="bad_zero.png"), None, output_is_source),
    ("mask-all-one", put("mask", image="bad_one.png"), None, blend_is_a_no_op),
    ("masks-overlap", second_region("bad_left34.png", "snow"), None, outside_union_is_source(6)),
    # Prompts
    ("local-not-in-global", put("local", local_prompt="blue bird"), "cond",
     r"local prompt 'blue bird' does not occur in the global prompt 'a red fox in the snow'"),
    ("global-empty", put("cond", global_prompt=""), "cond", r"global_prompt is empty.*'red fox'"),
    ("local-across-77-window", put("cond", global_prompt=" ".join(["a"] * 74) + " red fox"), "cond",
     r"local prompt 'red fox' crosses a 77-token window boundary"),
    ("local-prompt-empty", put("local", local_prompt=""), None, outside_union_is_source(4)),
    ("prompt-over-77-tokens", put("cond", global_prompt=LONG + " a red fox in the snow"), None,
     local_prompt_has_effect),
    # Model, sampling settings, latents
    ("non-sd15-model", sd2_model, "patch", r"model: VideoGrain needs a Stable Diffusion 1\.5 family UNet.*context_dim 1024"),
    ("invert-steps-0", put("inv", steps=0), "inv", r"steps"),
    ("invert-steps-1", put("inv", steps=1), "inv", r"Value 1 smaller than min of 2\", \"details\": \"steps"),  # the range
    ("invert-cfg-0-no-negative", put("inv", cfg=0.0), "inv", r"cfg is 0\.0 but no negative conditioning is connected"),
    ("invert-nothing", drop("inv", "latent"), "inv", r"nothing to invert: connect a latent"),
    ("sample-cfg-0", put("sample", cfg=0.0), None, positive_is_ignored),
    ("latent-size-vs-layout", other_latent(size=128), "inv",
     r"layout: the region masks are 64x64 but the latent is 16x16"),
    ("latent-frames-vs-layout", seq(mask_file("bad_seq6"), other_latent(frame_load_cap=3, select_every_nth=1)), "inv",
     r"layout: the region masks have 2 frames but the video latent has 3 frames"),
    ("controlnet-hint-count", controlnet_hint(3), "inv",
     r"conditioning: the ControlNet hint has 3 images but the video has 2 frames"),
    ("trajectories-other-clip", trajectories(frame_load_cap=3, select_every_nth=1), "inv",
     r"trajectories: they were computed from 3 frames of 64x64 but the video latent is 2 frames of 64x64"),
    ("trajectories-other-size", trajectories(size=128), "inv",
     r"trajectories: they were computed from 2 frames of 128x128 but the video latent is 2 frames of 64x64"),
    ("trajectories-raft-weights-missing", seq(trajectories(), put("traj", method="RAFT (torchvision)")), "traj",
     r"raft_weights: RAFT needs its weights file .* in .*optical_flow"),
    ("trajectories-model-not-patched", seq(trajectories(), put("tatt", model=["ckpt", 0])), "tatt",
     r"model: trajectory attention runs inside VideoGrain's attention runtime"),
    ("trajectories-legal", trajectories(), None, frames_and_size(2, (64, 64))),
    # PnP feature injection (the base edit has 2 steps)
    ("pnp-steps-beyond-schedule", put("inv", pnp_steps=2), "inv",
     r"pnp_steps is 2 but 2 steps with the reference alignment have records for at most 1 sampling steps"),
    ("inject-without-features", put("sample", inject_step=1), "sample",
     r"inject_step is 1 but the inversion has no PnP features: set pnp_steps to at least 1"),
    ("inject-beyond-recorded", seq(put("inv", pnp_steps=1), put("sample", inject_step=2)), "sample",
     r"inject_step is 2 but the inversion recorded PnP features for 1 steps only"),
    ("pnp-aligned-all-steps", seq(put("inv", pnp_steps=2, pnp_alignment="aligned"), put("sample", inject_step=2)),
     None, injection_changes_the_edit_inside_the_regions),
]


def test_catalogue_is_big_and_ids_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids)) >= 25


@pytest.mark.server
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(env, case):
    cid, mutate, node, expect = case
    tag = re.sub(r"[^a-z0-9_]", "_", cid)
    prompt = base_prompt(env.ckpt, tag)
    mutate(prompt, env)
    if not callable(expect):
        # The host runs whatever outputs still validate: keep only those fed by the edit.
        del prompt["srclat"]
    r = run_case(env.client, prompt)
    if callable(expect):  # a legal input: it must run and do the right thing
        assert r.status == "success", r.text[:3000]
        expect(types.SimpleNamespace(env=env, tag=tag), prompt, r)
    else:
        assert r.status in ("rejected", "error"), f"{cid}: expected an error, got {r.status}"
        assert re.search(expect, r.text), f"{cid}: {expect!r} not in {r.text[:3000]}"
        assert node in r.nodes, f"{cid}: expected node {node} to report it, got {r.nodes}"
        late = r.sampled - UPSTREAM.get(node, set())
        assert not late, f"{cid}: refused only after sampling started ({late})"
    assert env.client.alive()


@pytest.mark.server
def test_damaged_cache_entry_is_recomputed_and_rewritten(env):
    client = env.client
    cache = os.path.join(os.path.dirname(client.output_dir), "user", "__videograin_cache")
    prompt = base_prompt(env.ckpt, "cache_a")
    prompt["load"]["inputs"]["skip_first_frames"] = 1  # a source of its own: its own cache key
    before = set(os.listdir(cache)) if os.path.isdir(cache) else set()
    first = run_case(client, prompt)
    assert first.status == "success" and "inv" in first.sampled, first.text[:3000]
    (name,) = set(os.listdir(cache)) - before
    path = os.path.join(cache, name)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    log_at = len(client.log_text())
    # threshold 0.45 gives the same binary mask: the host re-runs the chain, the cache key is the same
    prompt["region"]["inputs"]["threshold"] = 0.45
    second = run_case(client, prompt)
    assert second.status == "success" and "inv" in second.sampled, second.text[:3000]
    assert re.search(r"inversion cache entry [0-9a-f]{12} was damaged: .*; recomputing", client.log_text()[log_at:])
    assert os.path.getsize(path) == size, "the entry was written again"
    assert torch.equal(saved_latent(client, first.entry), saved_latent(client, second.entry))
    before_hit = file_identity(path)  # a rewrite makes a new inode; a hit only touches the entry's time
    prompt["region"]["inputs"]["threshold"] = 0.4
    third = run_case(client, prompt)
    assert third.status == "success" and "inv" not in third.sampled, "a healthy entry is a hit"
    assert file_identity(path) == before_hit


# ---------------------------------------------------------------- security: where files go
def _files(root):
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        out.update(os.path.join(dirpath, f) for f in filenames)
    return out


@pytest.mark.server
def test_hostile_filename_prefix_writes_nothing_outside_the_server_folders(env):
    client = env.client
    work = os.path.dirname(client.output_dir)
    allowed = [os.path.join(work, k) + os.sep for k in ("input", "output", "temp", "user")]
    absolute_target = os.path.join(env.outside, f"vg_escape_{uuid.uuid4().hex[:8]}")
    parent = os.path.dirname(work)  # where "../../x" from the output folder would land
    before, before_host = _files(parent), _files(comfyui_path())
    for i, prefix in enumerate(("../../vg_escape", "../vg_escape", absolute_target + "/edit", "/vg_escape_root")):
        prompt = base_prompt(env.ckpt, f"hostile{i}")
        prompt["save"]["inputs"]["filename_prefix"] = prefix
        prompt["lat"]["inputs"]["filename_prefix"] = prefix + "_lat"
        r = run_case(client, prompt)
        if r.status != "success":  # the host refuses the escape: a clear error naming the output folder
            assert re.search(r"outside the output folder", r.text), r.text[:3000]
            assert r.nodes <= {"save", "lat"}, r.nodes
        assert client.alive()
    stray = sorted(f for f in _files(parent) - before if not any(f.startswith(a) for a in allowed))
    assert not stray, f"written outside input/output/temp/user: {stray}"
    assert not [f for f in _files(comfyui_path()) - before_host if "vg_escape" in f]
    assert not os.path.exists(absolute_target) and not os.path.exists("/vg_escape_root")
    # The inversion cache holds only files named by hex digests (no user text in names).
    cache = os.path.join(work, "user", "__videograin_cache")
    names = os.listdir(cache)
    assert names and all(re.fullmatch(r"[0-9a-f]{64}\.safetensors", n) for n in names), names


@pytest.mark.server
def test_server_still_answers_and_a_valid_edit_succeeds(env):
    assert env.client.get("/system_stats")["system"]
    r = run_case(env.client, base_prompt(env.ckpt, "after_all", steps=3))
    assert r.status == "success", r.text[:3000]
    assert "sample" in r.sampled  # the progress detector used above does see sampling
    assert saved_video(env.client, r.entry) == (2, (SIZE, SIZE))
