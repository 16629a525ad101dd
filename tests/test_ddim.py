"""DDIM Invert and Sample through the host's sampling machinery (in-process host).

Reconstruction is checked with the `small_smooth` test model (scripts/make_test_models.py:
`small` with the UNet's output conv scaled by 0.05, so eps is a small, smooth function of
x) on a latent of realistic scale (std ~5 in LATENT space, like real SD1.5 latents). The
random TAESD's latents are ~20x smaller, and at that scale the random UNet's GroupNorms
make eps too rough in x for a meaningful check. The pure math is also checked with an
analytic eps through the same host machinery.
"""
from __future__ import annotations

import os
from importlib import import_module

import pytest
import torch
from vg_testlib import load_script, pack_modules


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one thread is as fast, and far faster when the 2 cores are shared
    (idle OpenMP threads spin)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pack(comfy_host):
    return pack_modules(comfy_host, invert="nodes.ddim_invert", glue="nodes.host_glue", sample="nodes.sample",
                        layout="videograin_core.prompts.layout", cache="videograin_core.sampling.inversion_cache")


@pytest.fixture(scope="module")
def smooth(comfy_host):
    import comfy.sd
    maker = load_script("make_test_models")
    path = maker.write_model(os.path.join(comfy_host.path, "models"), "small_smooth")
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(path)
    empty = [[clip.encode_from_tokens(clip.tokenize("")), {}]]
    other = [[clip.encode_from_tokens(clip.tokenize("a red fox")), {}]]
    return type("M", (), {"model": model, "clip": clip, "vae": vae, "empty": empty, "other": other, "path": path})


@pytest.fixture()
def cache_dir(pack, tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setattr(pack.invert, "cache_folder", lambda: str(d))
    return d


def _latent(frames=2, hw=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(frames, 4, 3, 3, generator=g)
    return torch.nn.functional.interpolate(low, size=(hw, hw), mode="bilinear", align_corners=False) * 5


def invert(pack, m, latent, steps, cond=None, use_cache=False, **kw):
    out = pack.invert.VideoGrainDDIMInvert.execute(model=kw.pop("model", m.model), conditioning=cond or m.empty,
                                                    steps=steps, cfg=kw.pop("cfg", 1.0), use_cache=use_cache,
                                                    latent={"samples": latent}, **kw)
    return out.args[0]["samples"], out.args[1]


def sample(pack, m, inv, cfg=1.0, pos=None, neg=None, **kw):
    out = pack.sample.VideoGrainSample.execute(model=kw.pop("model", m.model), positive=pos or m.empty,
                                               negative=neg or m.empty, inversion=inv, cfg=cfg, **kw)
    return out.args[0]["samples"]


def rel_err(a, b):
    return ((a - b).abs().mean() / b.abs().mean()).item()


class CallCounter:
    """Counts UNet calls by wrapping the BaseModel's apply_model."""
    def __init__(self, model, monkeypatch):
        self.n = 0
        inner = model.model
        orig = inner.apply_model

        def counted(*a, **k):
            self.n += 1
            return orig(*a, **k)
        monkeypatch.setattr(inner, "apply_model", counted)


# ---------------------------------------------------------------- the math
def test_inversion_converges_with_analytic_eps(pack, smooth, monkeypatch):
    """eps(x) = smooth analytic function of the UNet input: reconstruction error ~ 1/steps."""
    dm = smooth.model.model.diffusion_model
    monkeypatch.setattr(dm, "forward", lambda x, timesteps=None, context=None, **k:
                        0.8 * torch.tanh(1.5 * x) + 0.2 * torch.sin(x.flip(-1)) + 1e-3 * timesteps.view(-1, 1, 1, 1))
    lat = _latent()
    errs = []
    for steps in (10, 20, 50):
        inv_lat, inv = invert(pack, smooth, lat, steps)
        errs.append(rel_err(sample(pack, smooth, inv), lat))
        # The trajectory starts at the source and ends at the inverted latent (internal space).
        scale = smooth.model.model.latent_format.scale_factor
        assert torch.allclose(inv.trajectory[0], lat * scale, atol=1e-5)
        assert torch.allclose(inv.trajectory[-1], inv_lat * scale, atol=1e-4)
        assert inv.steps == steps and inv.sigmas[0] == 0 and inv.sigmas.shape[0] == steps + 1
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < 0.6 * errs[0] and errs[2] < 0.6, errs


def test_invert_then_sample_reconstructs_with_the_test_unet(pack, smooth):
    lat = _latent()
    errs = {}
    for steps in (10, 50):
        _, inv = invert(pack, smooth, lat, steps)
        errs[steps] = rel_err(sample(pack, smooth, inv), lat)
    assert errs[50] < 0.03, errs
    assert errs[50] < 0.7 * errs[10], errs


def test_inversion_is_deterministic(pack, smooth):
    lat = _latent(seed=1)
    a_lat, a = invert(pack, smooth, lat, 4)
    b_lat, b = invert(pack, smooth, lat, 4)
    assert torch.equal(a_lat, b_lat) and torch.equal(a.trajectory, b.trajectory) and torch.equal(a.sigmas, b.sigmas)


def test_schedule_is_the_references_for_any_step_count(pack, smooth):
    """Timesteps 1 + i * (1000 // steps), `steps` of them (diffusers' leading spacing with
    offset 1, as the reference): the host's ddim_uniform for counts whose spacing fills the
    range, where it runs one step more for the others (30 -> 31). The inversion records the
    schedule and Sample walks it back."""
    import comfy.samplers
    ms = smooth.model.get_model_object("model_sampling")
    for steps in (3, 4, 30, 50, 999):
        sig = pack.glue.ddim_sigmas(smooth.model, steps)
        assert sig.shape == (steps + 1,) and sig[-1] == 0 and bool((sig[:-1] > sig[1:]).all())
        t = ms.timestep(sig[:-1]).round().long().flip(0)
        assert torch.equal(t, torch.arange(steps) * (1000 // steps) + 1), steps
        host = comfy.samplers.calculate_sigmas(ms, "ddim_uniform", steps).float()
        if 1000 - steps * (1000 // steps) < 2:
            assert torch.equal(sig, host), steps
        else:
            assert host.shape[0] == steps + 2, steps  # the host's schedule has one step more
    assert [round(float(ms.timestep(s))) for s in pack.glue.ddim_sigmas(smooth.model, 50)[:3]] == [981, 961, 941]
    with pytest.raises(ValueError, match="steps is 1000 but the model has 1000 timesteps: use at most 999"):
        invert(pack, smooth, _latent(), 1000)
    _, inv = invert(pack, smooth, _latent(), 7)
    assert torch.equal(inv.sigmas, pack.glue.ddim_sigmas(smooth.model, 7).flip(0)) and inv.steps == 7
    assert inv.trajectory.shape[0] == 8
    sample(pack, smooth, inv)


# ---------------------------------------------------------------- cache
def _cache_files(d):
    return sorted(p for p in os.listdir(d) if p.endswith(".safetensors")) if os.path.isdir(d) else []


def test_cache_hit_returns_identical_tensors_without_model_calls(pack, smooth, cache_dir, monkeypatch):
    lat = _latent(seed=2)
    counter = CallCounter(smooth.model, monkeypatch)
    a_lat, a = invert(pack, smooth, lat, 3, use_cache=True)
    assert counter.n > 0
    assert len(_cache_files(cache_dir)) == 1
    assert not [p for p in os.listdir(cache_dir) if p.endswith(".partial")]
    counter.n = 0
    b_lat, b = invert(pack, smooth, lat, 3, use_cache=True)
    assert counter.n == 0, "a cache hit must not call the model"
    assert torch.equal(a_lat, b_lat)
    for f in ("latent", "trajectory", "sigmas", "source"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f


def test_cache_key_follows_inputs(pack, smooth, cache_dir):
    lat = _latent(seed=3)
    invert(pack, smooth, lat, 2, use_cache=True)
    invert(pack, smooth, lat, 2, use_cache=True)                     # same: hit
    invert(pack, smooth, lat, 3, use_cache=True)                     # steps
    invert(pack, smooth, lat + 0.01, 2, use_cache=True)              # latent
    invert(pack, smooth, lat, 2, cond=smooth.other, use_cache=True)  # conditioning
    patched = smooth.model.clone()
    key, weight = next((k, w) for k, w in patched.model.state_dict().items() if k.endswith("out.2.weight"))
    patched.add_patches({key: (torch.zeros_like(weight),)}, 0.5)  # a zero LoRA-like diff: same numbers
    invert(pack, smooth, lat, 2, use_cache=True, model=patched)      # model patches
    invert(pack, smooth, lat, 2, use_cache=True, cfg=2.0, negative=smooth.other)  # guidance
    assert len(_cache_files(cache_dir)) == 6


def test_cache_key_follows_the_prediction_type_and_fp8_models_are_keyed(pack, smooth, comfy_host, cache_dir):
    """ModelSamplingDiscrete swaps the model's sampling object for another prediction type
    with the same sigmas: a new key (the eps entry must not serve v-prediction), while the
    same patch applied again hits. A UNet stored in float8 inverts and is keyed too."""
    import comfy.sd
    node = comfy_host.nodes.NODE_CLASS_MAPPINGS["ModelSamplingDiscrete"]()
    patch = getattr(node, node.FUNCTION)
    lat = _latent(seed=12)
    invert(pack, smooth, lat, 2, use_cache=True)
    for sampling in ("eps", "v_prediction", "eps"):
        invert(pack, smooth, lat, 2, use_cache=True, model=patch(smooth.model, sampling, False)[0])
    # plain, eps-patched, v-patched; the second eps patch hit the first's entry
    assert len(_cache_files(cache_dir)) == 3
    fp8, _, _, _ = comfy.sd.load_checkpoint_guess_config(smooth.path, output_vae=False, output_clip=False,
                                                          model_options={"dtype": torch.float8_e4m3fn})
    assert any(p.dtype == torch.float8_e4m3fn for p in fp8.model.parameters())
    a_lat, _ = invert(pack, smooth, lat, 2, use_cache=True, model=fp8)
    assert len(_cache_files(cache_dir)) == 4
    b_lat, _ = invert(pack, smooth, lat, 2, use_cache=True, model=fp8)
    assert torch.equal(a_lat, b_lat) and len(_cache_files(cache_dir)) == 4


def test_cache_bound_comes_from_the_environment(pack, smooth, cache_dir, monkeypatch):
    monkeypatch.setenv("VIDEOGRAIN_CACHE_MAX_GB", "1e-9")  # about one byte: only the newest entry stays
    invert(pack, smooth, _latent(seed=20), 2, use_cache=True)
    invert(pack, smooth, _latent(seed=21), 2, use_cache=True)
    assert len(_cache_files(cache_dir)) == 1
    monkeypatch.setenv("VIDEOGRAIN_CACHE_MAX_GB", "lots")
    assert pack.glue.cache_max_bytes() == pack.cache.DEFAULT_MAX_BYTES == 10 * 2**30
    monkeypatch.delenv("VIDEOGRAIN_CACHE_MAX_GB")
    assert pack.glue.cache_max_bytes() == 10 * 2**30
    import sys
    for unbounded in ("0", "inf", "-1", "1e400"):
        monkeypatch.setenv("VIDEOGRAIN_CACHE_MAX_GB", unbounded)
        assert pack.glue.cache_max_bytes() == sys.maxsize, unbounded
    monkeypatch.setenv("VIDEOGRAIN_CACHE_MAX_GB", "2.5")
    assert pack.glue.cache_max_bytes() == int(2.5 * 2**30)


def test_images_input_is_keyed_by_pixels_and_vae_and_a_hit_skips_the_encode(pack, smooth, cache_dir, monkeypatch):
    """With images + vae the key is the pixels (all of them) and the VAE: a second run of
    the same frames neither encodes nor calls the UNet; one changed pixel, or another
    VAE, is a miss."""
    g = torch.Generator().manual_seed(7)
    images = torch.rand(2, 64, 64, 3, generator=g)
    encodes = []
    real_encode = pack.invert.encode_frames
    monkeypatch.setattr(pack.invert, "encode_frames", lambda vae, im: encodes.append(1) or real_encode(vae, im))

    def run(im, vae=smooth.vae):
        out = pack.invert.VideoGrainDDIMInvert.execute(model=smooth.model, conditioning=smooth.empty, steps=2,
                                                        cfg=1.0, use_cache=True, images=im, vae=vae)
        return out.args[1]
    first = run(images)
    assert len(encodes) == 1 and len(_cache_files(cache_dir)) == 1
    counter = CallCounter(smooth.model, monkeypatch)
    again = run(images.clone())
    assert len(encodes) == 1 and counter.n == 0, "a hit must neither encode nor call the UNet"
    assert torch.equal(first.source, again.source) and torch.equal(first.latent, again.latent)
    # the source latent stored in the entry is the encode of these frames
    assert torch.equal(again.source, real_encode(smooth.vae, images))
    changed = images.clone()
    changed[1, 40, 17, 2] += 1e-3                   # one value of ~400k: still a new key
    run(changed)
    assert len(encodes) == 2 and len(_cache_files(cache_dir)) == 2
    import comfy.sd
    other_vae = comfy.sd.VAE(sd={k: v + 1e-3 for k, v in smooth.vae.get_sd().items()})
    run(images, vae=other_vae)
    assert len(encodes) == 3 and len(_cache_files(cache_dir)) == 3


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "garbage"])
def test_damaged_cache_entry_is_recomputed(pack, smooth, cache_dir, monkeypatch, damage):
    lat = _latent(seed=4)
    a_lat, a = invert(pack, smooth, lat, 3, use_cache=True)
    (name,) = _cache_files(cache_dir)
    path = cache_dir / name
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip_byte":
        b = bytearray(data)
        b[-5] ^= 0xFF  # inside the tensor data: only the stored checksum can tell
        path.write_bytes(bytes(b))
    else:
        path.write_bytes(b"not a safetensors file")
    counter = CallCounter(smooth.model, monkeypatch)
    b_lat, b = invert(pack, smooth, lat, 3, use_cache=True)
    assert counter.n > 0, "a damaged entry must be recomputed"
    assert torch.equal(a_lat, b_lat) and torch.equal(a.trajectory, b.trajectory)
    inv, status = pack.cache.InversionCache(str(cache_dir)).load(name[:-len(".safetensors")])
    assert status == "hit" and torch.equal(inv.latent, a_lat)


# ---------------------------------------------------------------- sampling
def test_inverted_latent_works_with_core_ksampler_advanced(pack, smooth, comfy_host):
    """Without a layout, Sample is the host's ddim sampler on the ddim_uniform schedule."""
    lat = _latent(seed=5)
    inv_lat, inv = invert(pack, smooth, lat, 4)
    ours = sample(pack, smooth, inv, cfg=3.0, pos=smooth.other, neg=smooth.empty)
    (core,) = comfy_host.nodes.KSamplerAdvanced().sample(
        smooth.model, "disable", 0, 4, 3.0, "ddim", "ddim_uniform", smooth.other, smooth.empty,
        {"samples": inv_lat}, 0, 10000, "disable")
    assert torch.allclose(ours, core["samples"], atol=1e-4), (ours - core["samples"]).abs().max()


def _layout(pack, mask):
    return pack.layout.Layout().add(mask, "a red fox")


def test_blend_keeps_the_source_outside_the_regions(pack, smooth):
    lat = _latent(seed=6)
    _, inv = invert(pack, smooth, lat, 4)
    left = torch.zeros(2, 64, 64, dtype=torch.bool)
    left[:, :, :32] = True
    plain = sample(pack, smooth, inv, cfg=3.0, pos=smooth.other)
    for blend in ("inversion trajectory", "re-noised source"):
        out = sample(pack, smooth, inv, cfg=3.0, pos=smooth.other, layout=_layout(pack, left), blend=blend, seed=7)
        # Outside the union the last step blends with the latent at sigma 0: the source.
        assert torch.allclose(out[..., 4:], lat[..., 4:], atol=1e-4), blend
        assert not torch.allclose(out[..., :4], lat[..., :4], atol=1e-2), blend
        assert not torch.allclose(out[..., :4], plain[..., :4], atol=1e-6), "blending also steers the edited side"
    full = torch.ones(1, 64, 64, dtype=torch.bool)
    assert torch.equal(sample(pack, smooth, inv, cfg=3.0, pos=smooth.other, layout=_layout(pack, full)), plain)
    assert torch.equal(sample(pack, smooth, inv, cfg=3.0, pos=smooth.other, layout=_layout(pack, left), blend="off"), plain)
    r1 = sample(pack, smooth, inv, cfg=3.0, pos=smooth.other, layout=_layout(pack, left), blend="re-noised source", seed=1)
    r2 = sample(pack, smooth, inv, cfg=3.0, pos=smooth.other, layout=_layout(pack, left), blend="re-noised source", seed=1)
    assert torch.equal(r1, r2)


def test_layout_of_wrong_shape_is_refused(pack, smooth):
    _, inv = invert(pack, smooth, _latent(), 2)
    wide = torch.ones(2, 64, 128, dtype=torch.bool)
    with pytest.raises(ValueError, match="layout masks are 128x64"):
        sample(pack, smooth, inv, layout=_layout(pack, wide))
    three = torch.ones(3, 64, 64, dtype=torch.bool)
    with pytest.raises(ValueError, match="3 mask frames"):
        sample(pack, smooth, inv, layout=_layout(pack, three))


def test_inversion_disables_modulation_but_sampling_does_not(pack, smooth):
    import comfy.ldm.modules.attention as attention
    seen = []
    patched = smooth.model.clone()

    def record(q, k, v, extra_options):
        seen.append(bool(extra_options.get("videograin_disable_modulation")))
        return attention.optimized_attention(q, k, v, extra_options["n_heads"])
    patched.set_model_attn1_replace(record, "middle", 0, 0)
    _, inv = invert(pack, smooth, _latent(), 2, model=patched)
    assert seen and all(seen)
    assert "videograin_disable_modulation" not in patched.model_options.get("transformer_options", {})
    seen.clear()
    sample(pack, smooth, inv, model=patched)
    assert seen and not any(seen)


def test_interrupt_stops_inversion_and_writes_no_cache(pack, smooth, cache_dir):
    import comfy.model_management as mm
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            invert(pack, smooth, _latent(seed=8), 3, use_cache=True)
    finally:
        mm.interrupt_current_processing(False)
    assert _cache_files(cache_dir) == []


def test_interrupt_mid_run_stops_at_the_next_step(pack, smooth, monkeypatch):
    import comfy.model_management as mm
    _, inv = invert(pack, smooth, _latent(), 4)
    calls = []
    inner = smooth.model.model
    orig = inner.apply_model

    def interrupting(*a, **k):  # the user presses cancel during the second step
        calls.append(1)
        if len(calls) == 2:
            mm.interrupt_current_processing(True)
        return orig(*a, **k)
    monkeypatch.setattr(inner, "apply_model", interrupting)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            sample(pack, smooth, inv)
    finally:
        mm.interrupt_current_processing(False)
    assert len(calls) == 2


# ---------------------------------------------------------------- inputs
def test_images_and_vae_encode_like_the_latent(pack, smooth):
    g = torch.Generator().manual_seed(9)
    images = torch.rand(3, 64, 64, 3, generator=g)
    lat = smooth.vae.encode(images).float()
    out = pack.invert.VideoGrainDDIMInvert.execute(model=smooth.model, conditioning=smooth.empty, steps=2, cfg=1.0,
                                                   use_cache=False, images=images, vae=smooth.vae)
    assert torch.allclose(out.args[1].source, lat, atol=1e-5)
    assert torch.allclose(out.args[0]["samples"], invert(pack, smooth, lat, 2)[0], atol=1e-4)


def test_bad_inputs_are_refused_before_sampling(pack, smooth):
    node = pack.invert.VideoGrainDDIMInvert
    with pytest.raises(ValueError, match="no negative conditioning"):
        node.execute(model=smooth.model, conditioning=smooth.empty, steps=2, cfg=2.0, latent={"samples": _latent()})
    with pytest.raises(ValueError, match="nothing to invert"):
        node.execute(model=smooth.model, conditioning=smooth.empty, steps=2, cfg=1.0)
    with pytest.raises(ValueError, match="no vae"):
        node.execute(model=smooth.model, conditioning=smooth.empty, steps=2, cfg=1.0, images=torch.rand(1, 64, 64, 3))


def test_controlnet_on_the_conditioning_is_used_and_keyed(pack, smooth, comfy_host, test_models, cache_dir):
    import comfy.controlnet
    cnet = comfy.controlnet.load_controlnet(test_models.small_cnet)
    hint = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(10))
    apply = comfy_host.nodes.ControlNetApplyAdvanced()
    lat = _latent()
    results = []
    for strength in (0.5, 1.0):
        pos, neg = apply.apply_controlnet(smooth.empty, smooth.empty, cnet, hint, strength, 0.0, 1.0)
        results.append(invert(pack, smooth, lat, 2, cond=pos, use_cache=True)[0])
    plain = invert(pack, smooth, lat, 2, use_cache=True)[0]
    assert len(_cache_files(cache_dir)) == 3
    assert not torch.equal(results[0], results[1]) and not torch.equal(results[0], plain)


def test_control_lora_weights_are_in_the_key(pack, comfy_host):
    """A Control-LoRA builds its network only when sampling starts: until then its weights
    are the only thing that tells two of them apart."""
    import comfy.controlnet
    hint = torch.zeros(1, 3, 64, 64)

    def key(scale):
        c = comfy.controlnet.ControlLora({"lora_controlnet": torch.ones(8) * scale})
        c.set_cond_hint(hint, 1.0)
        return pack.cache.make_key({"control": c}, hook=pack.glue.host_fingerprint)
    assert key(1.0) == key(1.0) != key(2.0)


def test_cache_key_is_stable_for_a_patched_model(pack, smooth, comfy_host, cache_dir, monkeypatch):
    """The key of an ST-Layout patched model must not change once the patch has run (its
    per-grid caches fill while sampling), nor for the same checkpoint loaded and patched
    again (as after a server restart)."""
    import comfy.sd
    name = comfy_host.pack.__name__
    try:
        cond_node = import_module(name + ".nodes.layout_conditioning").VideoGrainLayoutConditioning
        patch_node = import_module(name + ".nodes.st_layout_patch").VideoGrainSTLayoutPatch
    except (ImportError, AttributeError):
        pytest.skip("the ST-Layout Patch nodes are not there yet")

    def patched_model(model, clip, prompt="a red fox in the snow", split=32, strength=0.3, full_frame=True):
        mask = torch.zeros(2, 64, 64, dtype=torch.bool)
        mask[:, :, :split] = True
        pos, layout = cond_node.execute(clip=clip, global_prompt=prompt,
                                        layout=_layout(pack, mask)).args
        m = patch_node.execute(model=model, layout=layout, full_frame_attention=full_frame, self_strength=strength,
                               cross_strength=1.0, end_percent=0.3, self_branch="uncond", size_term="reference",
                               modulate_full_resolution=False).args[0]
        return m, pos, layout

    lat = _latent(seed=11)
    m1, pos, layout = patched_model(smooth.model, smooth.clip)
    _, inv = invert(pack, smooth, lat, 2, model=m1, use_cache=True)
    sample(pack, smooth, inv, cfg=3.0, pos=pos, model=m1, layout=layout)
    model2, clip2, _, _ = comfy.sd.load_checkpoint_guess_config(smooth.path)
    m2, _, _ = patched_model(model2, clip2)
    for m in (m1, m2):
        counter = CallCounter(m, monkeypatch)
        invert(pack, smooth, lat, 2, model=m, use_cache=True)
        assert counter.n == 0, "the same inversion must come from the cache"
    assert len(_cache_files(cache_dir)) == 1
    # A new edit of the same clip (other regions, prompts, strengths) reuses the inversion:
    # the inversion never modulates, so only full-frame attention may change its key.
    m3, _, _ = patched_model(smooth.model, smooth.clip, prompt="a red fox chasing a blue bird in the rain", split=16, strength=0.7)
    counter = CallCounter(m3, monkeypatch)
    _, inv3 = invert(pack, smooth, lat, 2, model=m3, use_cache=True)
    assert counter.n == 0, "a new layout must not invalidate the cached inversion"
    assert torch.equal(inv3.latent, inv.latent)
    m4, _, _ = patched_model(smooth.model, smooth.clip, full_frame=False)
    counter = CallCounter(m4, monkeypatch)
    invert(pack, smooth, lat, 2, model=m4, use_cache=True)
    assert counter.n > 0, "per-frame attention gives another inversion: it must not hit the cache"
    assert len(_cache_files(cache_dir)) == 2


def test_every_sampler_function_takes_keyword_arguments_a_newer_host_may_add():
    """KSAMPLER functions get the host's keyword arguments; one they do not know (a future
    host's) is ignored, and the result is the same as without it."""
    from videograin_core.sampling import ddim

    def model(x, sigma, **kw):  # denoised = x / (1 + sigma^2): a smooth toy x0
        return x / (1 + sigma.view(-1, 1, 1, 1) ** 2)

    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    up = torch.tensor([0.0, 0.5, 1.0, 2.0])
    for fn, sig in ((ddim.sample_ddim_inversion, up), (ddim.sample_ddim_inversion_official, up),
                    (ddim.sample_ddim_blend, up.flip(0))):
        plain = fn(model, x.clone(), sig, extra_args={}, disable=True)
        extra = fn(model, x.clone(), sig, extra_args={}, disable=True, noise_sampler=None, some_future_option=1)
        assert torch.equal(plain, extra), fn.__name__
