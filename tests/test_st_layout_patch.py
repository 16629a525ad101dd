"""ST-Layout Patch through the real host: the host's own samplers (KSampler,
KSamplerAdvanced) run the patched small SD1.5 test model; bad inputs fail with clear
errors through POST /prompt."""
from __future__ import annotations

from importlib import import_module

import pytest
import torch
from vg_testlib import warnings_logged

FRAMES, LATENT = 2, 8            # 2 frames of 8x8 latent (64x64 px): token grids 8, 4, 2, 1
STEPS, CFG = 3, 5.0
TEXT = "a red car and a woman"


def _args(out):
    return out.args if hasattr(out, "args") else out.result


@pytest.fixture(scope="module")
def env(comfy_host, test_models):
    import comfy.controlnet
    import comfy.sd
    nodes = comfy_host.nodes
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(test_models.small, output_clipvision=False)
    pack = comfy_host.pack.__name__
    Layout = import_module(pack + ".videograin_core.prompts.layout").Layout
    left = torch.zeros(FRAMES, LATENT * 8, LATENT * 8)
    left[:, :, :32] = 1
    left[1, :, :16] = 0  # the region moves between frames
    lay = Layout().add(left, "red car").add(1 - left, "woman")
    cls = nodes.NODE_CLASS_MAPPINGS
    positive, layout = _args(cls["VideoGrainLayoutConditioning"].execute(clip=clip, global_prompt=TEXT, layout=lay))
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    long_negative = nodes.CLIPTextEncode().encode(clip, " ".join(["blurry"] * 90))[0]
    latent = {"samples": torch.zeros(FRAMES, 4, LATENT, LATENT)}
    cnet = comfy.controlnet.load_controlnet(test_models.small_cnet)
    return dict(model=model, clip=clip, positive=positive, negative=negative, long_negative=long_negative,
                layout=layout, raw_layout=lay, latent=latent, cnet=cnet, nodes=nodes, cls=cls, pack=pack)


def patch(env, model=None, **kw):
    args = dict(model=model or env["model"], layout=env["layout"], full_frame_attention=True, self_strength=0.3,
                cross_strength=1.0, end_percent=0.3, self_branch="uncond", size_term="reference",
                modulate_full_resolution=False, frame_pooled_group_norm=False)
    args.update(kw)
    return _args(env["cls"]["VideoGrainSTLayoutPatch"].execute(**args))[0]


def sample(env, model, cfg=CFG, positive=None, negative=None, steps=STEPS):
    out = env["nodes"].KSampler().sample(model, 7, steps, cfg, "ddim", "ddim_uniform", positive or env["positive"],
                                         negative or env["negative"], env["latent"], denoise=1.0)
    return out[0]["samples"]


@pytest.fixture(scope="module")
def plain(env):
    return sample(env, env["model"])


def close(a, b, rel=1e-5):
    """Equal up to float reassociation (different batch splits sum in another order)."""
    return float((a - b).abs().max()) <= rel * float(a.abs().max())


def reference_full_frame(model, kernel=None):
    """An independent full-frame self-attention: each cond/uncond chunk's frames are one
    sequence of F*h*w tokens, attended with one of the host's attention functions (default:
    the one the host chose at start-up)."""
    import comfy.ldm.modules.attention as attention
    kernel = kernel or attention.optimized_attention

    def attn1(q, k, v, extra):
        n = len(extra["cond_or_uncond"])
        b, lq, c = q.shape
        f = b // n
        o = kernel(q.reshape(n, f * lq, c), k.reshape(n, f * lq, c), v.reshape(n, f * lq, c),
                   extra["n_heads"], attn_precision=extra.get("attn_precision"))
        return o.reshape(b, lq, c)

    m = model.clone()
    for kind, number in transformer_blocks(m):
        m.set_model_attn1_replace(attn1, kind, number, 0)
    return m


def transformer_blocks(model):
    """(block, number) of every transformer block of the UNet, as the replace keys name them."""
    for name, _ in model.model.diffusion_model.named_modules():
        if name.endswith("transformer_blocks.0"):
            parts = name.split(".")
            kind = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}[parts[0]]
            yield kind, 0 if kind == "middle" else int(parts[1])


# ---------------------------------------------------------------- equivalences
def test_strength_zero_without_full_frame_is_bit_identical(env, plain):
    before = repr(sorted(env["model"].model_options.get("transformer_options", {}).keys()))
    out = sample(env, patch(env, self_strength=0.0, cross_strength=0.0, full_frame_attention=False))
    assert torch.equal(out, plain)
    # the input MODEL is unchanged
    assert repr(sorted(env["model"].model_options.get("transformer_options", {}).keys())) == before
    assert "patches_replace" not in env["model"].model_options.get("transformer_options", {})


def test_strength_zero_with_full_frame_equals_a_plain_full_frame_run(env, plain):
    import comfy.ldm.modules.attention as attention
    mod = import_module(env["pack"] + ".nodes.st_layout_patch")
    out = sample(env, patch(env, self_strength=0.0, cross_strength=0.0))
    # bit-identical to the same kernel the patch picks for calls over all frames ...
    kernel = mod.frames_attention_kernel(torch.device("cpu"))
    assert torch.equal(out, sample(env, reference_full_frame(env["model"], kernel)))
    # ... and equal up to float reassociation to the host's own choice (sub-quadratic on the CPU)
    assert close(out, sample(env, reference_full_frame(env["model"], attention.optimized_attention)), rel=1e-4)
    assert not torch.equal(out, plain)  # full-frame attention does change the result


def test_full_frame_attention_kernel_choice(env, monkeypatch):
    """On the CPU the host's default sub-quadratic attention is replaced by its SDPA function
    for calls over all frames; a user's explicit choice and other devices keep the host's."""
    import comfy.ldm.modules.attention as attention
    from comfy.cli_args import args
    mod = import_module(env["pack"] + ".nodes.st_layout_patch")
    cpu = torch.device("cpu")
    assert attention.optimized_attention is attention.get_attention_function("sub_quad")  # the host's CPU default
    assert mod.frames_attention_kernel(cpu) is attention.get_attention_function("pytorch")
    assert mod.frames_attention_kernel(torch.device("cuda")) is attention.optimized_attention
    monkeypatch.setattr(args, "use_quad_cross_attention", True)
    assert mod.frames_attention_kernel(cpu) is attention.optimized_attention
    monkeypatch.setattr(args, "use_quad_cross_attention", False)
    with monkeypatch.context() as m:   # a host without the attention registry: its module functions
        m.delattr(attention, "get_attention_function")
        assert mod.frames_attention_kernel(cpu) is attention.attention_pytorch
    monkeypatch.setenv(mod.FRAMES_ATTENTION_ENV, "host")
    assert mod.frames_attention_kernel(cpu) is attention.optimized_attention


def test_calls_over_all_frames_go_to_the_frames_kernel(env):
    """Routing inside the runtime: the unmodulated self-attention over all frames (whole
    call, or the chunks left over beside a modulated one) goes to frames_attention; per-frame
    self-attention and cross-attention to the host's; a chained replace takes all of them."""
    rt_mod = import_module(env["pack"] + ".videograin_core.attention.runtime")
    calls = []

    def kernel(name):
        def fn(q, k, v, extra):
            calls.append((name, tuple(q.shape), k.shape[1]))
            return torch.zeros(q.shape[0], q.shape[1], v.shape[2])
        return fn

    def layout_attention(q, k, v, heads, qr, kr, cw):
        calls.append(("layout", tuple(q.shape), k.shape[1]))
        return torch.zeros(q.shape[0], q.shape[1], v.shape[2])

    h = w = LATENT // 2  # a modulated grid (halved once)
    extra = {"cond_or_uncond": [0, 1], "n_heads": 2, "activations_shape": [2 * FRAMES, 8, h, w],
             "original_shape": [2 * FRAMES, 4, LATENT, LATENT], "sigmas": torch.tensor([14.6]),
             "sample_sigmas": torch.tensor([14.6, 1.0, 0.0])}
    q = torch.randn(2 * FRAMES, h * w, 8)

    def run(options, previous=None, which="attn1", k=q):
        calls.clear()
        rt = rt_mod.STLayoutRuntime(env["layout"], options, kernel("host"), lambda s: torch.tensor([999.0]),
                                    layout_attention, frames_attention=kernel("frames"))
        fn = (rt.make_attn1 if which == "attn1" else rt.make_attn2)(previous)
        out = fn(q, k, k, extra)
        assert out.shape == q.shape
        return list(calls)

    all_frames = FRAMES * h * w
    assert run(rt_mod.PatchOptions(self_strength=0.0)) == [("frames", (2, all_frames, 8), all_frames)]
    # the uncond chunk modulated, the cond chunk (the rest) over all frames
    assert run(rt_mod.PatchOptions(self_branch="uncond")) == [("layout", (1, all_frames, 8), all_frames),
                                                               ("frames", (1, all_frames, 8), all_frames)]
    assert run(rt_mod.PatchOptions(self_strength=0.0, full_frame_attention=False)) == [
        ("host", (2 * FRAMES, h * w, 8), h * w)]
    text = torch.randn(2 * FRAMES, env["raw_layout"].token_count or 77, 8)
    assert [c[0] for c in run(rt_mod.PatchOptions(cross_strength=0.0), which="attn2", k=text)] == ["host"]
    assert [c[0] for c in run(rt_mod.PatchOptions(self_strength=0.0), previous=kernel("chained"))] == ["chained"]


def test_full_frame_attention_memory_is_linear_in_frames(env):
    """64 frames of 8x8 tokens, cond+uncond, 8 heads: one self-attention call over all
    frames. The host's sub-quadratic CPU attention would hold [4096 x 4096] fp32 logits for
    16 batch-heads (1 GiB, plus its softmax); the patch's call holds about its output."""
    import comfy.ldm.modules.attention as attention
    from vg_testlib import load_script
    mem = load_script("proc_memory", folder="bench")
    replaced = patch(env, self_strength=0.0, cross_strength=0.0).model_options["transformer_options"]["patches_replace"]
    attn1 = next(iter(replaced["attn1"].values()))  # any block: unmodulated, all alike
    frames, hw, c, heads = 64, 64, 320, 8
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2 * frames, hw, c, generator=g) for _ in range(3))
    extra = {"cond_or_uncond": [1, 0], "n_heads": heads}
    base = mem.settle_and_reset_peak()
    assert base is not None, "this test needs Linux /proc/self/clear_refs"
    out = attn1(q, k, v, extra)
    extra_peak = mem.peak_rss_bytes() - base
    assert extra_peak < 128 * 2**20, f"{extra_peak / 2**20:.0f} MiB for one full-frame attention call"
    want = attention.attention_sub_quad(q.reshape(2, frames * hw, c), k.reshape(2, frames * hw, c),
                                        v.reshape(2, frames * hw, c), heads)
    assert close(out, want.reshape(out.shape), rel=1e-5)



def test_modulation_changes_the_output_only_while_active(env):
    unmod = sample(env, patch(env, self_strength=0.0, cross_strength=0.0))
    # active for 0% of the steps: exactly no modulation
    assert torch.equal(sample(env, patch(env, end_percent=0.0)), unmod)
    active = sample(env, patch(env, end_percent=0.3, self_branch="both"))  # first of 3 steps
    assert not close(active, unmod, 1e-3)
    # the same run split at step 1: modulated model for step 0, unmodulated for steps 1..2
    ksa = env["nodes"].KSamplerAdvanced()
    mid = ksa.sample(patch(env, end_percent=1.0, self_branch="both"), "enable", 7, STEPS, CFG, "ddim", "ddim_uniform",
                     env["positive"], env["negative"], env["latent"], 0, 1, "enable")[0]
    split = ksa.sample(patch(env, self_strength=0.0, cross_strength=0.0), "disable", 7, STEPS, CFG, "ddim",
                       "ddim_uniform", env["positive"], env["negative"], mid, 1, 10000, "disable")[0]["samples"]
    assert close(split, active)
    # active for all steps changes more (little: treg(t) = ((t-1)/1000)^5 is small late)
    assert not close(sample(env, patch(env, end_percent=1.0, self_branch="both")), active, 1e-6)


def test_each_option_changes_the_output(env):
    base = sample(env, patch(env, end_percent=1.0))
    for kw in (dict(self_branch="cond"), dict(size_term="paper", self_branch="both"),
               dict(modulate_full_resolution=True), dict(cross_strength=0.0), dict(self_strength=0.0),
               dict(full_frame_attention=False)):
        assert not close(sample(env, patch(env, end_percent=1.0, **kw)), base, 1e-4), kw


# ---------------------------------------------------------------- batching
def _separate_calls(model, seen):
    """A clone whose sampler evaluates cond and uncond in separate UNet calls (what the
    host does under memory pressure), through the host's keyed calc_cond_batch wrapper."""
    import comfy.patcher_extension as pe

    def one_at_a_time(executor, model_, conds, x_in, timestep, model_options, *args, **kwargs):
        out = []
        for i in range(len(conds)):
            only = [c if j == i else None for j, c in enumerate(conds)]
            out.append(executor(model_, only, x_in, timestep, model_options, *args, **kwargs)[i])
            seen.append(i)
        return out

    m = model.clone()
    m.add_wrapper_with_key(pe.WrappersMP.CALC_COND_BATCH, "test_separate_calls", one_at_a_time)
    return m


def test_separate_cond_uncond_calls_match_the_batched_run(env):
    batched = sample(env, patch(env, self_branch="both", end_percent=1.0))
    seen = []
    sep = sample(env, _separate_calls(patch(env, self_branch="both", end_percent=1.0), seen))
    assert 0 in seen and 1 in seen
    assert close(sep, batched)
    # negative of a different token length (90 words: 154 tokens) batched with the 77-token positive:
    # the positive is repeated; its regions must follow it, the negative gets none
    b_long = sample(env, patch(env, self_branch="both", end_percent=1.0), negative=env["long_negative"])
    s_long = sample(env, _separate_calls(patch(env, self_branch="both", end_percent=1.0), []),
                    negative=env["long_negative"])
    assert close(b_long, s_long)


def test_cfg_one_skips_uncond_and_still_modulates_cross_attention(env):
    unmod = sample(env, patch(env, self_strength=0.0, cross_strength=0.0), cfg=1.0)
    cross = sample(env, patch(env, self_strength=0.0, end_percent=1.0), cfg=1.0)
    assert not close(cross, unmod, 1e-3)
    # self modulation on the uncond branch only: nothing to modulate when cfg is 1
    assert torch.equal(sample(env, patch(env, cross_strength=0.0, end_percent=1.0), cfg=1.0), unmod)


def test_controlnet_on_the_conditioning(env):
    hint = torch.rand(FRAMES, LATENT * 8, LATENT * 8, 3, generator=torch.Generator().manual_seed(0))
    pos, neg = env["nodes"].ControlNetApplyAdvanced().apply_controlnet(env["positive"], env["negative"], env["cnet"],
                                                                       hint, 0.8, 0.0, 1.0)
    m = patch(env, end_percent=1.0)
    with_cn = sample(env, m, positive=pos, negative=neg)
    assert torch.isfinite(with_cn).all()
    assert not close(with_cn, sample(env, m), 1e-3)


def test_an_existing_replace_is_chained(env, plain):
    import comfy.ldm.modules.attention as attention
    calls = []

    def counting(q, k, v, extra):
        calls.append(extra["block"])
        return attention.optimized_attention(q, k, v, extra["n_heads"], attn_precision=extra.get("attn_precision"))

    m = env["model"].clone()
    m.set_model_attn1_replace(counting, "input", 1)          # (block, number) key
    m.set_model_attn2_replace(counting, "middle", 0, 0)      # (block, number, index) key
    out = sample(env, patch(env, model=m, self_strength=0.0, cross_strength=0.0, full_frame_attention=False))
    assert torch.equal(out, plain)
    assert ("input", 1) in calls and ("middle", 0) in calls


def test_a_chained_replace_gets_the_branches_of_its_rows(env):
    """While modulation runs, the rows it does not modulate go to a replace set before the
    patch (here one that splits its batch by branch, as IP-Adapter-like packs do) with a
    `cond_or_uncond` that lists just those rows' branches; the bypass is logged once."""
    import comfy.ldm.modules.attention as attention
    seen = {"attn1": set(), "attn2": set()}

    def by_branch(kind):
        def attn(q, k, v, extra):
            cu = extra["cond_or_uncond"]
            assert q.shape[0] % len(cu) == 0 and len(extra["uuids"]) == len(cu), (q.shape, cu, extra["uuids"])
            seen[kind].add(tuple(cu))
            return attention.optimized_attention(q, k, v, extra["n_heads"], attn_precision=extra.get("attn_precision"))
        return attn

    m = env["model"].clone()
    for kind, number in transformer_blocks(m):
        m.set_model_attn1_replace(by_branch("attn1"), kind, number, 0)
        m.set_model_attn2_replace(by_branch("attn2"), kind, number, 0)
    with warnings_logged(env["pack"] + ".videograin_core.attention.runtime") as messages:
        for full_frame in (True, False):
            sample(env, patch(env, model=m, end_percent=1.0, full_frame_attention=full_frame))
    # self-attention modulates the uncond branch: the chained replace gets the cond rows
    # alone; cross-attention modulates cond: it gets the uncond rows alone
    assert (0,) in seen["attn1"] and (1,) in seen["attn2"], seen
    assert sum("another attention replace was set" in m for m in messages) == 2  # once per patched model


def test_continuous_model_sampling_is_warned_about(env):
    """treg reads discrete 0..999 timesteps: a model patched to continuous sampling would get
    almost no modulation, which the patch says when it is applied."""
    with warnings_logged() as messages:
        patch(env)
        assert not [m for m in messages if "not SD1.5's discrete schedule" in m]
        edm = env["cls"]["ModelSamplingContinuousEDM"]().patch(env["model"], "eps", 120.0, 0.002)[0]
        patch(env, model=edm)
    assert [m for m in messages if "sampling is ModelSamplingAdvanced, not SD1.5's discrete schedule" in m]


def test_step_window_counts_steps_exactly():
    """end_percent * steps that float arithmetic puts a hair above a whole number (0.28 * 50
    = 14.000000000000002) must not let one more step in."""
    from videograin_core.prompts.layout import Layout
    from videograin_core.attention.runtime import PatchOptions, STLayoutRuntime
    lay = Layout().add(torch.ones(1, 16, 16), "x").with_spans([(1, 2)], 77)
    schedule = torch.linspace(14.6, 0.0, 51)
    for end, want in ((0.28, 14), (0.14, 7), (0.3, 15), (1.0, 50), (0.0, 0)):
        rt = STLayoutRuntime(lay, PatchOptions(end_percent=end), None, lambda s: 1000 * s / 14.6, None)
        active = sum(rt.step_weight({"sigmas": schedule[i:i + 1], "sample_sigmas": schedule}) > 0 for i in range(50))
        assert active == want, (end, active)


def test_layers_are_chosen_by_token_grid(env):
    rt_mod = import_module(env["pack"] + ".videograin_core.attention.runtime")
    rt = rt_mod.STLayoutRuntime(env["layout"], rt_mod.PatchOptions(), None, None, None)
    grids = {64: None, 32: (32, 32), 16: (16, 16), 8: (8, 8), 4: None}
    for h, expect in grids.items():
        assert rt.layer_modulated({"activations_shape": [2, 320, h, h], "original_shape": [2, 4, 64, 64]}) == expect
    # odd latent sizes round up at each halving
    assert rt.layer_modulated({"activations_shape": [2, 320, 5, 7], "original_shape": [2, 4, 9, 13]}) == (5, 7)
    full = rt_mod.STLayoutRuntime(env["layout"], rt_mod.PatchOptions(modulate_full_resolution=True), None, None, None)
    assert full.layer_modulated({"activations_shape": [2, 320, 64, 64], "original_shape": [2, 4, 64, 64]}) == (64, 64)
    assert rt_mod.treg(981) == pytest.approx(0.98 ** 5)


def test_non_sd15_model_is_refused(env):
    import types
    fake = types.SimpleNamespace(model=types.SimpleNamespace(
        diffusion_model=torch.nn.Module(), model_config=types.SimpleNamespace(unet_config={"context_dim": 1024})))
    with pytest.raises(ValueError, match="needs a Stable Diffusion 1.5 family UNet.*context_dim 1024"):
        patch(env, model=fake)
    fake.model.model_config.unet_config["context_dim"] = 768
    with pytest.raises(ValueError, match="no transformer blocks"):
        patch(env, model=fake)


# ---------------------------------------------------------------- errors through the server
def _graph(ckpt, mask_size=64, mask_frames=1, latent_frames=2, encode=True, positive_concat=False):
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": mask_size, "height": mask_size}},
        "3": {"class_type": "VideoGrainLocalPrompt", "inputs": {"mask": ["2", 0], "local_prompt": "red car"}},
        "4": {"class_type": "VideoGrainLayoutConditioning", "inputs": {"clip": ["1", 1], "global_prompt": "a red car",
                                                                       "layout": ["3", 0]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "6": {"class_type": "VideoGrainSTLayoutPatch", "inputs": {
            "model": ["1", 0], "layout": ["4", 1] if encode else ["3", 0], "full_frame_attention": True,
            "self_strength": 0.3, "cross_strength": 1.0, "end_percent": 0.3, "self_branch": "uncond",
            "size_term": "reference", "modulate_full_resolution": False}},
        "7": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": latent_frames}},
        "8": {"class_type": "KSampler", "inputs": {"model": ["6", 0], "positive": ["4", 0], "negative": ["5", 0],
                                                   "latent_image": ["7", 0], "seed": 1, "steps": 2, "cfg": 5.0,
                                                   "sampler_name": "ddim", "scheduler": "ddim_uniform",
                                                   "denoise": 1.0}},
        "9": {"class_type": "PreviewAny", "inputs": {"source": ["8", 0]}},
    }
    if mask_frames > 1:
        g["10"] = {"class_type": "MaskToImage", "inputs": {"mask": ["2", 0]}}
        g["11"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["10", 0], "amount": mask_frames}}
        g["12"] = {"class_type": "ImageToMask", "inputs": {"image": ["11", 0], "channel": "red"}}
        g["3"]["inputs"]["mask"] = ["12", 0]
    if positive_concat:
        g["13"] = {"class_type": "ConditioningConcat", "inputs": {"conditioning_to": ["4", 0],
                                                                   "conditioning_from": ["5", 0]}}
        g["8"]["inputs"]["positive"] = ["13", 0]
    return g


@pytest.mark.server
def test_bad_inputs_fail_clearly_through_the_server(comfy_server, test_models):
    ckpt = test_models.small_name
    cases = [
        (dict(encode=False), "no token spans; pass it through VideoGrain Layout Conditioning"),
        (dict(mask_size=128), "region masks are 128x128 but the latent is 8x8"),
        (dict(mask_frames=3, latent_frames=2), "region masks have 3 frames but the video latent has 2 frames"),
        (dict(positive_concat=True), "positive conditioning has 154 tokens but the layout was encoded for 77"),
    ]
    for kw, msg in cases:
        err = comfy_server.run_expect_error(_graph(ckpt, **kw))
        assert msg in err, (kw, err)
        assert comfy_server.alive()
    bad_prompt = _graph(ckpt)
    bad_prompt["4"]["inputs"]["global_prompt"] = "a blue bird"
    err = comfy_server.run_expect_error(bad_prompt)
    assert "'red car' does not occur in the global prompt 'a blue bird'" in err, err
    # and a good prompt still runs afterwards, with 2 frames and a 2-frame mask
    comfy_server.run(_graph(ckpt, mask_frames=2, latent_frames=2), timeout=300)
