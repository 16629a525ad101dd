"""Trajectory attention inside the attention runtime, through the real host: the Flow
Trajectories and Trajectory Attention nodes on the small test model against an
independent dense reference (full-frame attention, then a float64 masked attention over
each token's trajectory at the full-resolution layers), in batched and separate
cond/uncond calls, in inversion (its cache key too) and with one frame."""
from __future__ import annotations

import math
from importlib import import_module

import pytest
import torch
from test_parity import split_calls

FRAMES, LATENT = 3, 8


def _args(out):
    return out.args if hasattr(out, "args") else out.result


def moving_square_clip(frames=FRAMES, size=LATENT * 8, step=8):
    """A smooth background with a textured square moving right by `step` px per frame."""
    g = torch.Generator().manual_seed(0)
    up = lambda n, s: torch.nn.functional.interpolate(torch.rand(1, 3, n, n, generator=g), size=(s, s),
                                                      mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
    base, patch = up(4, size) * 0.4, 0.5 + 0.5 * up(6, 24)
    clip = base.expand(frames, -1, -1, -1).clone()
    for t in range(frames):
        clip[t, 16:40, 8 + t * step:32 + t * step] = patch
    return clip


@pytest.fixture(scope="module")
def env(comfy_host, test_models):
    import comfy.sd
    nodes = comfy_host.nodes
    cls = nodes.NODE_CLASS_MAPPINGS
    pack = comfy_host.pack.__name__
    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(test_models.small, output_clipvision=False)
    Layout = import_module(pack + ".videograin_core.prompts.layout").Layout
    left = torch.zeros(FRAMES, LATENT * 8, LATENT * 8)
    left[:, :, :32] = 1
    positive, layout = _args(cls["VideoGrainLayoutConditioning"].execute(
        clip=clip, global_prompt="a red car and a woman", layout=Layout().add(left, "red car").add(1 - left, "woman")))
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    trajectories = _args(cls["VideoGrainFlowTrajectories"].execute(images=moving_square_clip()))[0]
    lat = torch.nn.functional.interpolate(torch.randn(FRAMES, 4, 3, 3, generator=torch.Generator().manual_seed(2)),
                                          size=(LATENT, LATENT), mode="bilinear") * 3
    return dict(model=model, clip=clip, positive=positive, negative=negative, layout=layout, latent=lat, cls=cls,
                nodes=nodes, trajectories=trajectories, pack=pack)


def unmodulated(env, **kw):
    """ST-Layout Patch with full-frame attention only (no modulation, per-frame norms)."""
    args = dict(model=env["model"], layout=env["layout"], full_frame_attention=True, self_strength=0.0,
                cross_strength=0.0, end_percent=0.3, self_branch="uncond", size_term="reference",
                modulate_full_resolution=False, frame_pooled_group_norm=False)
    args.update(kw)
    return _args(env["cls"]["VideoGrainSTLayoutPatch"].execute(**args))[0]


def with_trajectories(env, model, trajectories=None, resolutions="full"):
    return _args(env["cls"]["VideoGrainTrajectoryAttention"].execute(
        model=model, trajectories=trajectories or env["trajectories"], resolutions=resolutions))[0]


def ksample(env, model, latent=None, cfg=5.0, steps=2):
    return env["nodes"].KSampler().sample(model, 7, steps, cfg, "ddim", "ddim_uniform", env["positive"],
                                          env["negative"], {"samples": env["latent"] if latent is None else latent},
                                          denoise=1.0)[0]["samples"]


def dense_reference(model, trajectories):
    """attn1 of every layer, written independently: softmax attention over all frames of
    each chunk (float64); at the full-resolution layers, then, for every token a float64
    softmax over q.k of the tokens of its own trajectory (a dense [N, N] mask) times that
    output."""
    def attn1(q, k, v, extra):
        chunks = len(extra["cond_or_uncond"])
        b, lq, c = q.shape
        f, heads = b // chunks, extra["n_heads"]
        d = c // heads
        split = lambda t: t.double().reshape(chunks, f * lq, heads, d).transpose(1, 2)  # [n, heads, N, d]
        qh, kh, vh = split(q), split(k), split(v)
        o = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), -1) @ vh
        act, orig = extra["activations_shape"], extra["original_shape"]
        if act[-2] == orig[-2] and act[-1] == orig[-1]:  # a full-resolution layer
            ids = trajectories.at_grid(act[-2], act[-1]).token_trajectory
            same = ids[:, None] == ids[None, :]
            logits = (qh @ kh.transpose(-1, -2) / math.sqrt(d)).masked_fill(~same, float("-inf"))
            o = torch.softmax(logits, -1) @ o
        return o.transpose(1, 2).reshape(b, lq, c).to(q.dtype)

    m = model.clone()
    for name, _ in m.model.diffusion_model.named_modules():
        if name.endswith("transformer_blocks.0"):
            parts = name.split(".")
            kind = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}[parts[0]]
            m.set_model_attn1_replace(attn1, kind, 0 if kind == "middle" else int(parts[1]), 0)
    return m


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_the_flow_follows_the_square(env):
    tr = env["trajectories"]
    assert tr.frames == FRAMES and tr.frame_hw == (LATENT * 8, LATENT * 8)
    inside = tr.flows[:, 20:36, 12:28]  # the square's interior in frame t
    assert float(inside[..., 0].median()) == pytest.approx(8.0, abs=1.0)
    assert float(inside[..., 1].abs().median()) < 1.0
    # at the latent grid (8x8 cells of 8 px) the square's cells chain across all frames
    traj = tr.at_grid(LATENT, LATENT)
    assert int(traj.lengths.max()) == FRAMES


@pytest.mark.parametrize("cfg", [5.0, 1.0])
def test_trajectory_attention_through_the_host_equals_a_dense_reference(env, cfg):
    ours = ksample(env, with_trajectories(env, unmodulated(env)), cfg=cfg)
    reference = ksample(env, dense_reference(env["model"], env["trajectories"]), cfg=cfg)
    without = ksample(env, unmodulated(env), cfg=cfg)
    assert rel(ours, reference) < 1e-4, rel(ours, reference)
    assert rel(without, reference) > 1e-3  # the step does something the reference sees


def test_batched_and_separate_cond_uncond_calls_agree(env):
    m = with_trajectories(env, unmodulated(env))
    separate = m.clone()
    separate.set_model_unet_function_wrapper(split_calls)
    assert rel(ksample(env, separate), ksample(env, m)) < 1e-5


def test_more_resolutions_change_more_and_one_frame_changes_nothing(env):
    base = unmodulated(env)
    full = ksample(env, with_trajectories(env, base))
    assert rel(ksample(env, with_trajectories(env, base, resolutions="full + 1/2")), full) > 1e-4
    # a single frame: every trajectory is one cell, whose attention is its own output
    one = _args(env["cls"]["VideoGrainFlowTrajectories"].execute(images=moving_square_clip(frames=1)))[0]
    _, layout1 = _args(env["cls"]["VideoGrainLayoutConditioning"].execute(
        clip=env["clip"], global_prompt="a red car and a woman",
        layout=import_module(env["pack"] + ".videograin_core.prompts.layout").Layout().add(
            torch.ones(1, LATENT * 8, LATENT * 8), "red car")))
    base1 = unmodulated(env, layout=layout1)
    lat1 = env["latent"][:1]
    assert torch.equal(ksample(env, with_trajectories(env, base1, trajectories=one), latent=lat1),
                       ksample(env, base1, latent=lat1))


def test_inversion_runs_it_and_its_cache_key_covers_it(env, comfy_host, tmp_path, monkeypatch):
    invert_mod = import_module(env["pack"] + ".nodes.ddim_invert")
    monkeypatch.setattr(invert_mod, "cache_folder", lambda: str(tmp_path))
    run = lambda model: _args(invert_mod.VideoGrainDDIMInvert.execute(
        model=model, conditioning=env["negative"], steps=3, cfg=1.0, use_cache=True,
        latent={"samples": env["latent"]}))[1]
    base = unmodulated(env)
    plain, traj = run(base), run(with_trajectories(env, base))
    assert not torch.equal(plain.latent, traj.latent)
    assert len(list(tmp_path.iterdir())) == 2
    assert torch.equal(run(with_trajectories(env, base)).latent, traj.latent)  # a hit, same entry


def test_bad_inputs_are_refused_before_sampling(env):
    other = _args(env["cls"]["VideoGrainFlowTrajectories"].execute(images=moving_square_clip(frames=2)))[0]
    m = with_trajectories(env, unmodulated(env), trajectories=other)
    with pytest.raises(ValueError, match=r"trajectories: they were computed from 2 frames of 64x64 but the video "
                                         r"latent is 3 frames of 64x64"):
        ksample(env, m)
    with pytest.raises(ValueError, match="model: trajectory attention runs inside VideoGrain's attention runtime"):
        with_trajectories(env, env["model"])
    with pytest.raises(ValueError, match=r"images are 60x64: .*multiples of 8"):
        env["cls"]["VideoGrainFlowTrajectories"].execute(images=moving_square_clip()[:, :, :60])
    with pytest.raises(ValueError, match=r"raft_weights: RAFT needs its weights file .* in .*optical_flow"):
        env["cls"]["VideoGrainFlowTrajectories"].execute(images=moving_square_clip(), method="RAFT (torchvision)")
