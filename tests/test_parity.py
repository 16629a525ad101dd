"""Numerical parity with the official VideoGrain (METHOD.md sections 5 and 6b), through the
real host on the small test models:

- frame-pooled GroupNorm: what every pooled norm computes equals a plain float64 GroupNorm
  over (C/G, F, h, w) per sequence; one frame equals the unpatched model bit for bit;
  batched and separate cond/uncond calls and cfg 1 agree;
- the two inversion schemes equal plain re-implementations written with alpha_bar
  (diffusers' conventions) on a toy eps function;
- with every new option off the outputs equal those of main before these options
  (tests/data/outputs_before_parity_options.safetensors, written by main at ea8d1d2 with
  the scenario of `_before_scenario`).
"""
from __future__ import annotations

import os
from importlib import import_module

import pytest
import torch
from test_ddim import smooth  # noqa: F401  (the fixture: small model with a smooth eps)
from vg_testlib import REPO

FRAMES, LATENT = 3, 8


def _args(out):
    return out.args if hasattr(out, "args") else out.result


@pytest.fixture(scope="module")
def env(comfy_host, test_models):
    import comfy.sd
    nodes = comfy_host.nodes
    pack = comfy_host.pack.__name__
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(test_models.small, output_clipvision=False)
    Layout = import_module(pack + ".videograin_core.prompts.layout").Layout
    left = torch.zeros(FRAMES, LATENT * 8, LATENT * 8)
    left[:, :, :32] = 1
    left[1, :, :16] = 0
    lay = Layout().add(left, "red car").add(1 - left, "woman")
    cls = nodes.NODE_CLASS_MAPPINGS
    positive, layout = _args(cls["VideoGrainLayoutConditioning"].execute(clip=clip, global_prompt="a red car and a woman",
                                                                         layout=lay))
    _, layout1 = _args(cls["VideoGrainLayoutConditioning"].execute(
        clip=clip, global_prompt="a red car and a woman", layout=Layout().add(left[:1], "red car").add(1 - left[:1], "woman")))
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    g = torch.Generator().manual_seed(3)
    lat = torch.nn.functional.interpolate(torch.randn(FRAMES, 4, 3, 3, generator=g), size=(LATENT, LATENT),
                                          mode="bilinear") * 3
    return dict(model=model, clip=clip, positive=positive, negative=negative, layout=layout, layout1=layout1,
                latent=lat, cls=cls,
                nodes=nodes, pack=pack, patch_mod=import_module(pack + ".nodes.st_layout_patch"))


def patch(env, model=None, **kw):
    args = dict(model=model or env["model"], layout=env["layout"], full_frame_attention=True, self_strength=0.3,
                cross_strength=1.0, end_percent=0.5, self_branch="both", size_term="reference",
                modulate_full_resolution=False)
    args.update(kw)
    return _args(env["cls"]["VideoGrainSTLayoutPatch"].execute(**args))[0]


def ksample(env, model, latent, cfg=5.0, steps=2):
    return env["nodes"].KSampler().sample(model, 7, steps, cfg, "ddim", "ddim_uniform", env["positive"], env["negative"],
                                          {"samples": latent}, denoise=1.0)[0]["samples"]


def pooled_only(env, **kw):
    """The pooled norms alone: no full-frame attention, no modulation."""
    return patch(env, full_frame_attention=False, self_strength=0.0, cross_strength=0.0, **kw)


# ---------------------------------------------------------------- frame-pooled GroupNorm
def plain_group_norm(x, groups, weight, bias, eps, frames):
    """float64 GroupNorm whose statistics run over (C/G, F, h, w) of each run of F rows."""
    b, c, h, w = x.shape
    n = b // frames
    y = x.double().reshape(n, frames, groups, c // groups, h, w)
    mean = y.mean(dim=(1, 3, 4, 5), keepdim=True)
    var = y.var(dim=(1, 3, 4, 5), unbiased=False, keepdim=True)
    y = ((y - mean) / torch.sqrt(var + eps)).reshape(b, c, h, w)
    return y * weight.detach().double().view(1, c, 1, 1) + bias.detach().double().view(1, c, 1, 1)


class NormRecorder:
    """Forward hooks on GroupNorm modules: each call's input and output (hooks run around
    whatever forward the module has, object patches included)."""

    def __init__(self, diffusion_model, names):
        self.calls = []
        self.handles = []
        for name in names:
            module = diffusion_model.get_submodule(name)
            self.handles.append(module.register_forward_hook(
                lambda mod, inp, out, name=name: self.calls.append((name, mod, inp[0].detach(), out.detach()))))

    def close(self):
        for h in self.handles:
            h.remove()


def test_pooled_norms_are_the_resnet_and_output_norms(env):
    dm = env["model"].model.diffusion_model
    names = env["patch_mod"].pooled_norm_names(dm)
    resblocks = [n for n, m in dm.named_modules() if type(m).__name__ == "ResBlock"]
    assert len(resblocks) > 0 and len(names) == 2 * len(resblocks) + 1
    assert "out.0" in names
    assert not any("transformer" in n or n.endswith(".norm") for n in names)  # the transformers' own norm: per frame
    m = pooled_only(env)
    assert all(f"diffusion_model.{n}.forward" in m.object_patches for n in names)
    assert not any(k.endswith(".forward") for k in pooled_only(env, frame_pooled_group_norm=False).object_patches)
    assert not env["model"].object_patches  # the input MODEL is unchanged


@pytest.mark.parametrize("cfg", [5.0, 1.0])
def test_every_pooled_norm_equals_a_plain_float64_group_norm_over_the_frames(env, cfg):
    dm = env["model"].model.diffusion_model
    names = env["patch_mod"].pooled_norm_names(dm)
    transformer_norms = [n for n, m in dm.named_modules() if isinstance(m, torch.nn.GroupNorm) and n.endswith(".1.norm")]
    rec = NormRecorder(dm, names + transformer_norms)
    try:
        ksample(env, pooled_only(env), env["latent"], cfg=cfg, steps=1)
    finally:
        rec.close()
    chunks = 2 if cfg != 1.0 else 1  # cfg 1: the host runs the cond branch alone
    seen = {n for n, *_ in rec.calls}
    assert set(names) <= seen
    for name, mod, x, y in rec.calls:
        assert x.shape[0] == chunks * FRAMES
        frames = FRAMES if name in names else 1
        ref = plain_group_norm(x, mod.num_groups, mod.weight, mod.bias, mod.eps, frames)
        err = float((y.double() - ref).abs().max() / ref.abs().max())
        assert err < 1e-5, (name, err)
        if name in names:  # and it is not the per-frame norm
            per_frame = plain_group_norm(x, mod.num_groups, mod.weight, mod.bias, mod.eps, 1)
            assert float((y.double() - per_frame).abs().max() / ref.abs().max()) > 1e-3, name


def test_one_frame_with_pooled_norms_equals_the_unpatched_model_bit_for_bit(env):
    one = env["latent"][:1]
    assert torch.equal(ksample(env, pooled_only(env, layout=env["layout1"]), one), ksample(env, env["model"], one))


def test_pooled_norms_change_a_clip_and_stay_inert_outside_the_packs_calls(env, comfy_host):
    pooled = ksample(env, pooled_only(env), env["latent"])
    assert not torch.equal(pooled, ksample(env, env["model"], env["latent"]))
    # after the run the norms read no layout: a direct call of a pooled norm is per frame
    m = pooled_only(env)
    name = env["patch_mod"].pooled_norm_names(m.model.diffusion_model)[0]
    norm = m.object_patches[f"diffusion_model.{name}.forward"]
    assert norm.slot.current is None
    x = torch.randn(FRAMES, norm.norm_forward.__self__.num_channels, 4, 4)
    assert torch.equal(norm(x), norm.norm_forward(x))


def split_calls(apply_model, args):
    """A unet function wrapper that runs every cond/uncond chunk as a UNet call of its own,
    as the host does under memory pressure."""
    x, t, c, cu = args["input"], args["timestep"], args["c"], args["cond_or_uncond"]
    f = x.shape[0] // len(cu)
    outs = []
    for i, branch in enumerate(cu):
        rows = slice(i * f, (i + 1) * f)
        part = {k: (v[rows] if isinstance(v, torch.Tensor) and v.shape[0] == x.shape[0] else v) for k, v in c.items()}
        options = dict(c["transformer_options"])
        options["cond_or_uncond"] = [branch]
        options["uuids"] = [options["uuids"][i]] if "uuids" in options else None
        part["transformer_options"] = options
        outs.append(apply_model(x[rows], t[rows], **part))
    return torch.cat(outs)


def test_batched_and_separate_cond_uncond_calls_agree(env):
    m = patch(env)  # everything on: full-frame attention, modulation, pooled norms
    batched = ksample(env, m, env["latent"])
    separate_model = m.clone()
    separate_model.set_model_unet_function_wrapper(split_calls)
    separate = ksample(env, separate_model, env["latent"])
    assert float((batched - separate).abs().max()) <= 1e-5 * float(batched.abs().max())


# ---------------------------------------------------------------- inversion schemes
def toy_eps(z, t):
    """eps as a smooth function of the UNet input (the diffusers latent) and the timestep."""
    return 0.8 * torch.tanh(1.5 * z) + 0.2 * torch.sin(z.flip(-1)) + 1e-3 * t


def sd15_alphas_cumprod():
    """SD1.5's noise schedule as diffusers writes it: "scaled_linear" betas from 0.00085 to
    0.012 over 1000 timesteps, alpha_bar = cumprod(1 - beta)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


def ddim_step(z, eps, ab, ab_next):
    """diffusers' DDIM (eta 0) from alpha_bar ab to ab_next with the predicted eps."""
    x0 = (z - (1 - ab) ** 0.5 * eps) / ab ** 0.5
    return ab_next ** 0.5 * x0 + (1 - ab_next) ** 0.5 * eps


def plain_inversion(x0, alphas_cumprod, steps, scheme):
    """Both schemes in float64 with alpha_bar; returns the inverted diffusers latent."""
    ts = [1 + i * (1000 // steps) for i in range(steps)]
    ab = alphas_cumprod.double()
    z = x0.double()
    if scheme == "official":   # z at t=1 is x0; evaluate at the latent's own level
        for t, t_next in zip(ts[:-1], ts[1:]):
            z = ddim_step(z, toy_eps(z, t), ab[t], ab[t_next])
        return z, ab[ts[-1]]
    prev = torch.tensor(1.0, dtype=torch.float64)  # next-step: from the clean latent (alpha_bar 1)
    for t in ts:
        z = ddim_step(z, toy_eps(z, t), prev, ab[t])
        prev = ab[t]
    return z, ab[ts[-1]]


@pytest.mark.parametrize("scheme,steps", [("official", 10), ("next-step", 10), ("official", 3)])
def test_inversion_schemes_equal_plain_alpha_bar_implementations(comfy_host, smooth, monkeypatch, scheme, steps):
    model, empty = smooth.model, smooth.empty
    calls = []
    dm = model.model.diffusion_model
    monkeypatch.setattr(dm, "forward", lambda x, timesteps=None, context=None, **k:
                        calls.append(1) or toy_eps(x, timesteps.view(-1, 1, 1, 1)))
    node = comfy_host.nodes.NODE_CLASS_MAPPINGS["VideoGrainDDIMInvert"]
    lat = torch.nn.functional.interpolate(torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(5)),
                                          size=(8, 8), mode="bilinear") * 5
    out = _args(node.execute(model=model, conditioning=empty, steps=steps, cfg=1.0, use_cache=False,
                             latent={"samples": lat}, scheme=scheme))
    inv = out[1]
    assert inv.scheme == scheme
    assert len(calls) == (steps - 1 if scheme == "official" else steps)
    scale = model.model.latent_format.scale_factor
    z, ab_top = plain_inversion(lat * scale, sd15_alphas_cumprod(), steps, scheme)
    # the pack's latents are in sigma space: x = z / sqrt(alpha_bar)
    ours = out[0]["samples"].double() * scale * ab_top ** 0.5
    err = float((ours - z).abs().max() / z.abs().max())
    assert err < 1e-6, err
    assert torch.allclose(inv.trajectory[0], lat * scale)  # the source itself at sigma 0


def test_the_cache_key_covers_the_scheme(comfy_host, smooth, tmp_path, monkeypatch):
    model, empty = smooth.model, smooth.empty
    invert_mod = import_module(comfy_host.pack.__name__ + ".nodes.ddim_invert")
    monkeypatch.setattr(invert_mod, "cache_folder", lambda: str(tmp_path))
    lat = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    run = lambda scheme: _args(invert_mod.VideoGrainDDIMInvert.execute(
        model=model, conditioning=empty, steps=3, cfg=1.0, use_cache=True, latent={"samples": lat}, scheme=scheme))[1]
    official, nextstep = run("official"), run("next-step")
    assert len(os.listdir(tmp_path)) == 2
    assert not torch.equal(official.latent, nextstep.latent)
    again = run("next-step")  # a hit returns the entry of its own scheme
    assert again.scheme == "next-step" and torch.equal(again.latent, nextstep.latent)
    with pytest.raises(ValueError, match="scheme"):
        run("backwards")


# ---------------------------------------------------------------- options off = main before them
def test_every_new_option_off_reproduces_main_before_them(env):
    """ea8d1d2's outputs of this scenario, kept in tests/data: KSampler through the patch,
    then DDIM Invert + Sample. New options off: per-frame norms, next-step inversion."""
    from safetensors.torch import load_file
    before = load_file(os.path.join(REPO, "tests", "data", "outputs_before_parity_options.safetensors"))
    cls = env["cls"]
    pm = patch(env, frame_pooled_group_norm=False)
    assert torch.equal(ksample(env, pm, env["latent"], steps=4), before["ksampler"])
    inv = _args(cls["VideoGrainDDIMInvert"].execute(model=pm, conditioning=env["negative"], steps=4, cfg=1.0,
                                                    use_cache=False, latent={"samples": env["latent"]},
                                                    scheme="next-step"))[1]
    assert torch.equal(inv.latent, before["inverted"]) and torch.equal(inv.trajectory, before["trajectory"])
    edited = _args(cls["VideoGrainSample"].execute(model=pm, positive=env["positive"], negative=env["negative"],
                                                   inversion=inv, cfg=5.0, layout=env["layout"],
                                                   blend="inversion trajectory", seed=0))[0]["samples"]
    assert torch.equal(edited, before["edited"])
