"""Plug-and-play feature injection (METHOD.md section 9) through the real host (in-process)
on the small random test models:

- the layer set is SD1.5's (output blocks 3.0, 4.0, 6.0 and self-attention 4-9, checked on
  a real SD1.5-structured UNet built without weights), and its store is 20 MiB per frame
  and injected step at 512x512;
- recording leaves the inversion bit for bit unchanged (also when the uncond branch has to
  run at cfg 1, where the host's own combine would not be exact);
- injection is pure plumbing: a record injected into the call it was recorded from changes
  nothing, bit for bit;
- inject_step 0 is injection off, and both reproduce main's outputs;
- with records from another input exactly the injected quantities change (forward hooks);
- the default alignment is the reference's (sampling t = 981 gets the record of t = 961);
- the inversion cache returns the features without a UNet call;
- bad inputs are refused before sampling, naming the input.
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from vg_testlib import REPO, load_script, pack_modules

FRAMES, LATENT = 2, 8


DEFAULT_THREADS = torch.get_num_threads()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one thread is as fast (tests comparing with stored outputs restore the
    default: the CPU kernels' float sums depend on the thread count)."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(DEFAULT_THREADS)


@pytest.fixture()
def default_threads():
    torch.set_num_threads(DEFAULT_THREADS)
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pack(comfy_host):
    return pack_modules(comfy_host, invert="nodes.ddim_invert", sample="nodes.sample", glue="nodes.pnp_glue",
                        host_glue="nodes.host_glue",
                        plan="videograin_core.pnp.plan", bank="videograin_core.pnp.bank",
                        hooks="videograin_core.pnp.hooks", layout="videograin_core.prompts.layout",
                        cache="videograin_core.sampling.inversion_cache")


@pytest.fixture(scope="module")
def env(comfy_host, test_models):
    import comfy.sd
    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(test_models.small, output_vae=False)
    enc = lambda text: comfy_host.nodes.CLIPTextEncode().encode(clip, text)[0]
    return dict(model=model, clip=clip, empty=enc(""), fox=enc("a red fox"), cat=enc("a cat"),
                a=_latent(0), b=_latent(1), nodes=comfy_host.nodes)


@pytest.fixture()
def exact_store(pack, monkeypatch):
    """Records kept in float32, the test models' compute precision (the pack stores float16,
    which is exact for the float16 UNets of GPU runs)."""
    monkeypatch.setattr(pack.bank, "STORE_DTYPE", torch.float32)


def _latent(seed, frames=FRAMES, hw=LATENT):
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(frames, 4, 3, 3, generator=g)
    return torch.nn.functional.interpolate(low, size=(hw, hw), mode="bilinear", align_corners=False) * 3


def invert(pack, env, latent=None, steps=4, **kw):
    args = dict(model=env["model"], conditioning=env["empty"], steps=steps, cfg=1.0, use_cache=False,
                latent={"samples": env["a"] if latent is None else latent})
    args.update(kw)
    return pack.invert.VideoGrainDDIMInvert.execute(**args).args[1]


def sample(pack, env, inv, **kw):
    args = dict(model=env["model"], positive=env["fox"], negative=env["empty"], inversion=inv, cfg=5.0)
    args.update(kw)
    return pack.sample.VideoGrainSample.execute(**args).args[0]["samples"]


class UNetCalls:
    """Counts UNet calls (the BaseModel's apply_model) and their timesteps."""

    def __init__(self, model, monkeypatch):
        self.timesteps = []
        inner = model.model
        orig = inner.apply_model

        def counted(x, t, *a, **k):
            self.timesteps.append(round(float(inner.model_sampling.timestep(t[:1]))))
            return orig(x, t, *a, **k)
        monkeypatch.setattr(inner, "apply_model", counted)


# ---------------------------------------------------------------- the layers and the store
def test_the_layers_are_the_references_sd15_ones(pack, env, comfy_host):
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    maker = load_script("make_test_models")
    sd15 = UNetModel(**maker.SD15_UNET, device="meta", operations=comfy.ops.disable_weight_init)
    targets = pack.plan.targets_for(sd15)
    assert targets == pack.plan.sd15_targets()
    assert [t.module for t in targets if t.kind == "residual"] == ["output_blocks.3.0", "output_blocks.4.0",
                                                                   "output_blocks.6.0"]
    assert [t.attn_key for t in targets if t.kind == "attn1"] == [("output", i, 0) for i in range(4, 10)]
    # the skip connection of all three is a conv (the decoder concatenates the encoder's skip)
    assert all(type(sd15.get_submodule(t.module).skip_connection).__name__ == "Conv2d"
               for t in targets if t.kind == "residual")
    # store: 512x512 (64x64 latent), float16, both branches: 20 MiB per frame and injected step
    per_frame = pack.plan.values_per_frame(targets, (64, 64)) * 2 * 2
    assert per_frame == 20 * 2**20
    # the small test model has the blocks at the same positions it has: 3 residuals, 4 attentions
    small = pack.plan.targets_for(env["model"].model.diffusion_model)
    assert [t.name for t in small] == ["residual:output_blocks.2.0", "residual:output_blocks.3.0",
                                       "residual:output_blocks.4.0", "attn1:output.3.0", "attn1:output.4.0",
                                       "attn1:output.5.0", "attn1:output.6.0"]


def test_records_are_half_precision_and_only_the_injected_steps(pack, env):
    inv = invert(pack, env, pnp_steps=2, conditioning=env["fox"], negative=env["empty"])
    bank = inv.features
    assert bank.steps == 2 and not bank.shared and bank.branches == (0, 1)
    assert not bank.missing() and len(bank.records) == 2 * len(bank.targets) * 2
    assert {t.dtype for t in bank.records.values()} == {torch.float16}
    assert bank.nbytes == bank.bytes_per_frame_step() * FRAMES * 2
    shared = invert(pack, env, pnp_steps=2).features  # no negative: the source prompt serves both branches
    assert shared.shared and shared.nbytes * 2 == bank.nbytes
    # each record has the layer's shape for FRAMES frames
    r = bank.get(0, "residual:output_blocks.2.0", 1)
    assert r.shape == (FRAMES, 320, 2, 2)
    assert bank.get(1, "attn1:output.6.0", 0).shape == (FRAMES, LATENT * LATENT, 320)


def test_a_record_outside_float16s_range_is_kept_in_float32(pack):
    bank = pack.bank.FeatureBank(steps=1, alignment="reference", scheme="official", sigmas=torch.linspace(0, 1, 3),
                                 frames=1, latent_hw=(8, 8), targets=(), shared=True, source_index={0: 1})
    small, large = torch.tensor([[1.5, -2.0]]), torch.tensor([[1.5, 7e4]])
    bank.put(0, "a", 0, small)
    bank.put(0, "b", 0, large)
    assert bank.get(0, "a", 1).dtype == torch.float16 and torch.equal(bank.get(0, "a", 1).float(), small)
    assert bank.get(0, "b", 0).dtype == torch.float32 and torch.equal(bank.get(0, "b", 0), large)
    assert bank.get(0, "a", 2) is None  # branches beyond cond/uncond (other guiders) get no record


# ---------------------------------------------------------------- recording changes nothing
def test_the_hosts_cfg1_combine_is_not_exact(comfy_host):
    """Why the recording runs the uncond branch apart: at cfg 1 with the uncond branch run,
    the host combines uncond + (cond - uncond) * 1, which is not cond bit for bit."""
    import comfy.samplers
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(4096, generator=g) * 3, torch.randn(4096, generator=g) * 30
    out = comfy.samplers.cfg_function(None, cond, uncond, 1.0, cond, None, model_options={})
    assert not torch.equal(out, cond)
    assert torch.allclose(out, cond, atol=1e-4)


@pytest.mark.parametrize("scheme,alignment", [("official", "reference"), ("official", "aligned"),
                                               ("next-step", "reference")])
def test_recording_leaves_the_inversion_bit_for_bit(pack, env, scheme, alignment):
    for negative in (None, env["empty"]):  # shared branches; the uncond branch run apart at cfg 1
        kw = dict(conditioning=env["fox"], negative=negative, scheme=scheme)
        off = invert(pack, env, **kw)
        on = invert(pack, env, pnp_steps=3, pnp_alignment=alignment, **kw)
        assert on.features is not None and off.features is None
        assert torch.equal(on.latent, off.latent) and torch.equal(on.trajectory, off.trajectory)


def test_running_the_uncond_branch_with_the_hosts_cfg1_path_would_change_the_inversion(pack, env):
    """The counterfactual: the uncond branch batched with the cond one and combined by the
    host (disable_cfg1_optimization alone) moves the inverted latent."""
    model = env["model"].clone()
    model.model_options["disable_cfg1_optimization"] = True
    off = invert(pack, env, conditioning=env["fox"])
    both = invert(pack, env, conditioning=env["fox"], model=model)  # negative = the source prompt
    assert not torch.equal(off.latent, both.latent)
    assert torch.allclose(off.latent, both.latent, atol=1e-3)


# ---------------------------------------------------------------- injection
def _with_st_layout(pack, env, comfy_host, model):
    """The model behind the ST-Layout Patch (full-frame attention, pooled norms, no modulation)
    and the positive its layout needs."""
    Layout = pack.layout.Layout
    mask = torch.zeros(FRAMES, LATENT * 8, LATENT * 8)
    mask[:, :, :32] = 1
    cls = comfy_host.nodes.NODE_CLASS_MAPPINGS
    positive, layout = cls["VideoGrainLayoutConditioning"].execute(
        clip=env["clip"], global_prompt="a red fox", layout=Layout().add(mask, "red fox")).args
    patched = cls["VideoGrainSTLayoutPatch"].execute(
        model=model, layout=layout, full_frame_attention=True, self_strength=0.3, cross_strength=1.0,
        end_percent=0.0, self_branch="both", size_term="reference", modulate_full_resolution=False).args[0]
    return patched, positive


def one_call(pack, env, model, latent, tag=None, cfg=5.0, positive=None):
    """The denoised prediction of ONE guided UNet evaluation through the host's sampler
    machinery (cond and uncond branches, cfg), at the top sigma of a 4-step schedule;
    `tag` (a PnPCall) marks it as a PnP call."""
    glue = pack.host_glue
    got = {}

    def fn(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        args = extra_args if tag is None else {**extra_args, "model_options": pack.glue.tagged(
            extra_args["model_options"], tag)}
        with torch.no_grad():
            got["denoised"] = model_k(x, sigmas[0] * x.new_ones([x.shape[0]]), **args)
        return x
    sigmas = glue.ddim_sigmas(model, 4)
    glue.run_sampler(model, fn, {}, sigmas, positive or env["fox"], env["empty"], cfg, latent)
    return got["denoised"]


@pytest.mark.parametrize("patched", [False, True], ids=["plain", "st_layout"])
def test_injection_is_pure_plumbing(pack, env, comfy_host, exact_store, patched):
    """Record one UNet call (both branches), then inject that record into the same call
    (same input, timestep, prompts): the output is the call's own, bit for bit. Through the
    host's sampler machinery, with the plain model and behind the ST-Layout Patch
    (full-frame attention, pooled norms)."""
    model, positive = env["model"], env["fox"]
    if patched:
        model, positive = _with_st_layout(pack, env, comfy_host, model)
    targets = pack.plan.targets_for(model.model.diffusion_model)
    bank = pack.bank.FeatureBank(steps=1, alignment="aligned", scheme="official",
                                 sigmas=torch.linspace(0, 1, 5), frames=FRAMES, latent_hw=(LATENT, LATENT),
                                 targets=targets, shared=False, source_index={0: 4})
    recorder, injector = model.clone(), model.clone()
    pack.glue.install(recorder, pack.hooks.PnPRun("record", bank), targets)
    pack.glue.install(injector, pack.hooks.PnPRun("inject", bank), targets)
    call = lambda m, tag=None, latent=env["a"]: one_call(pack, env, m, latent, tag, positive=positive)
    own = call(model)
    recorded = call(recorder, pack.hooks.PnPCall(0, (0, 1)))
    assert not bank.missing() and bank.records["0/attn1:output.6.0/1"].dtype == torch.float32
    assert torch.equal(recorded, own)                                   # recording changes nothing
    assert torch.equal(call(injector, pack.hooks.PnPCall(0)), own)      # the own record changes nothing
    assert torch.equal(call(injector), own)                             # untagged calls: inert
    # the record does reach the layers: injected into a call on another input it changes the output
    other = call(model, latent=env["b"])
    assert not torch.allclose(call(injector, pack.hooks.PnPCall(0), latent=env["b"]), other, atol=1e-3)


def test_half_precision_records_inject_what_they_hold(pack, env):
    """With the default float16 store the own record changes the call only by the records'
    rounding."""
    model = env["model"]
    targets = pack.plan.targets_for(model.model.diffusion_model)
    bank = pack.bank.FeatureBank(steps=1, alignment="aligned", scheme="official", sigmas=torch.linspace(0, 1, 5),
                                 frames=FRAMES, latent_hw=(LATENT, LATENT), targets=targets, shared=False,
                                 source_index={0: 4})
    recorder, injector = model.clone(), model.clone()
    pack.glue.install(recorder, pack.hooks.PnPRun("record", bank), targets)
    pack.glue.install(injector, pack.hooks.PnPRun("inject", bank), targets)
    own = one_call(pack, env, recorder, env["a"], pack.hooks.PnPCall(0, (0, 1)))
    assert {t.dtype for t in bank.records.values()} == {torch.float16}
    injected = one_call(pack, env, injector, env["a"], pack.hooks.PnPCall(0))
    assert not torch.equal(injected, own)
    assert float((injected - own).abs().max() / own.abs().max()) < 1e-2


def test_aligned_records_are_the_sources_own_features_when_sampling_the_source(pack, env):
    """Under the official scheme the aligned record of step 0 comes from the extra call on
    the inverted latent at the top timestep: sampling that latent with the source prompt
    (cfg 1) evaluates the same call, so injecting it changes the result only by float
    rounding (Sample starts from the inverted latent as a LATENT, the recorded latent up to
    the latent format's scaling, and the records are float16). The reference alignment
    injects the record of the timestep below: a visible change."""
    kw = dict(conditioning=env["fox"], negative=env["empty"], pnp_steps=1)
    aligned, reference = invert(pack, env, pnp_alignment="aligned", **kw), invert(pack, env, **kw)
    run = lambda inv, step: sample(pack, env, inv, cfg=1.0, inject_step=step)
    off = run(aligned, 0)
    err = lambda a: float((a - off).abs().max() / off.abs().max())
    assert err(run(aligned, 1)) < 1e-3 < 1e-2 < err(run(reference, 1)), (err(run(aligned, 1)), err(run(reference, 1)))


def test_inject_step_0_is_injection_off_and_both_are_mains_outputs(pack, env, comfy_host, default_threads):
    """With features on the inversion, inject_step 0 samples as an inversion without them,
    and (the scenario of test_parity) reproduces the outputs main wrote before PnP."""
    inv = invert(pack, env, pnp_steps=2)
    plain = dataclasses.replace(inv, features=None)
    assert torch.equal(sample(pack, env, inv, inject_step=0), sample(pack, env, plain))
    # test_parity's scenario (its `env` and `patch`), with PnP recorded and not injected
    from safetensors.torch import load_file
    before = load_file(os.path.join(REPO, "tests", "data", "outputs_before_parity_options.safetensors"))
    cls = comfy_host.nodes.NODE_CLASS_MAPPINGS
    Layout = pack.layout.Layout
    left = torch.zeros(3, 64, 64)
    left[:, :, :32] = 1
    left[1, :, :16] = 0
    positive, layout = cls["VideoGrainLayoutConditioning"].execute(
        clip=env["clip"], global_prompt="a red car and a woman",
        layout=Layout().add(left, "red car").add(1 - left, "woman")).args
    g = torch.Generator().manual_seed(3)
    lat = torch.nn.functional.interpolate(torch.randn(3, 4, 3, 3, generator=g), size=(8, 8), mode="bilinear") * 3
    pm = cls["VideoGrainSTLayoutPatch"].execute(
        model=env["model"], layout=layout, full_frame_attention=True, self_strength=0.3, cross_strength=1.0,
        end_percent=0.5, self_branch="both", size_term="reference", modulate_full_resolution=False,
        frame_pooled_group_norm=False).args[0]
    pinv = cls["VideoGrainDDIMInvert"].execute(model=pm, conditioning=env["empty"], steps=4, cfg=1.0,
                                               use_cache=False, latent={"samples": lat}, scheme="next-step",
                                               pnp_steps=3).args[1]
    assert pinv.features is not None
    assert torch.equal(pinv.latent, before["inverted"]) and torch.equal(pinv.trajectory, before["trajectory"])
    edited = cls["VideoGrainSample"].execute(model=pm, positive=positive, negative=env["empty"], inversion=pinv,
                                             cfg=5.0, layout=layout, blend="inversion trajectory", seed=0,
                                             inject_step=0).args[0]["samples"]
    assert torch.equal(edited, before["edited"])


class Taps:
    """Forward hooks on every ResBlock (input, output) and every self-attention's q/k/v
    projections (their inputs), first UNet call only."""

    def __init__(self, dm):
        self.res, self.qkv, self.handles = {}, {}, []
        for name, m in dm.named_modules():
            if type(m).__name__ == "ResBlock":
                self.handles.append(m.register_forward_hook(self._res(name)))
            if name.endswith("attn1"):
                for p in ("to_q", "to_k", "to_v"):
                    self.handles.append(getattr(m, p).register_forward_hook(self._qkv((name, p))))

    def _res(self, name):
        def hook(mod, inp, out):  # returns None: the output stays
            if name not in self.res:
                self.res[name] = (mod, tuple(i.detach().clone() for i in inp), out.detach().clone())
        return hook

    def _qkv(self, key):
        def hook(mod, inp, out):
            if key not in self.qkv:
                self.qkv[key] = inp[0].detach().clone()
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def test_only_the_injected_layers_change_with_another_inputs_records(pack, env):
    """Sampling inversion B with A's records: in the first step the injected layers take A's
    residuals and A's self-attention input for q and k (v stays B's own), every other
    layer computes its own function of its input, and nothing upstream of the first
    injected layer moves."""
    inv_a = invert(pack, env, env["a"], pnp_steps=1, negative=env["empty"], conditioning=env["fox"])
    inv_b = invert(pack, env, env["b"])
    mixed = dataclasses.replace(inv_b, features=inv_a.features)
    bank = inv_a.features
    dm = env["model"].model.diffusion_model
    targets = {t.name: t for t in bank.targets}
    res_targets = {t.module: t for t in targets.values() if t.kind == "residual"}
    attn_targets = {f"output_blocks.{t.block}.1.transformer_blocks.0.attn1": t
                    for t in targets.values() if t.kind == "attn1"}

    chunks = []

    def watch(apply_model, args):  # the branch of each chunk of the batch
        chunks.append(list(args["cond_or_uncond"]))
        return apply_model(args["input"], args["timestep"], **args["c"])
    model = env["model"].clone()
    model.set_model_unet_function_wrapper(watch)

    def first_call(inject):
        taps = Taps(dm)
        try:
            out = sample(pack, env, mixed, model=model, inject_step=1 if inject else 0)
        finally:
            taps.close()
        return taps, out

    off, off_out = first_call(False)
    on, on_out = first_call(True)
    assert not torch.allclose(on_out, off_out, atol=1e-3)
    first = min(t.block for t in targets.values())
    order = chunks[0]
    assert sorted(order) == [0, 1]  # cfg 5: both branches in one call
    rows = lambda b: slice(order.index(b) * FRAMES, (order.index(b) + 1) * FRAMES)
    for name, (mod, inp, out) in on.res.items():
        x = inp[0]
        if name in res_targets:
            h = out - mod.skip_connection(x)
            for b in (0, 1):
                src = bank.get(0, res_targets[name].name, b).float()
                assert torch.allclose(h[rows(b)], src, atol=1e-5, rtol=1e-4), name
                own = off.res[name][2] - mod.skip_connection(off.res[name][1][0])
                assert not torch.allclose(own[rows(b)], src, atol=1e-3), name
        else:
            assert torch.equal(out, type(mod).forward(mod, *inp)), name  # its own function of its input
        if name.startswith("input_blocks") or name.startswith("middle_block") or (
                name.startswith("output_blocks") and int(name.split(".")[1]) < first):
            assert torch.equal(out, off.res[name][2]), f"{name} is upstream of every injected layer"
    seen = 0
    for (name, proj), x in on.qkv.items():
        if proj != "to_q":
            continue
        k, v = on.qkv[(name, "to_k")], on.qkv[(name, "to_v")]
        if name in attn_targets:
            seen += 1
            for b in (0, 1):
                src = bank.get(0, attn_targets[name].name, b).float()
                assert torch.equal(x[rows(b)], src) and torch.equal(k[rows(b)], src), name
                assert not torch.allclose(v[rows(b)], src, atol=1e-3), name
        else:
            assert torch.equal(x, k) and torch.equal(x, v), name  # plain self-attention
    assert seen == len(attn_targets) == 4


# ---------------------------------------------------------------- which record feeds which step
class Stop(Exception):
    pass


def _capture_q_inputs(dm, name, timesteps_of, stop_after=None):
    """to_q inputs of one self-attention layer with the timestep of the UNet call."""
    seen = []
    layer = dm.get_submodule(name).to_q

    def hook(mod, inp, out):
        seen.append((timesteps_of(), inp[0].detach().clone()))
        if stop_after is not None and len(seen) >= stop_after:
            raise Stop
    return seen, layer.register_forward_hook(hook)


@pytest.mark.parametrize("scheme,alignment,expect", [
    ("official", "reference", {0: 961, 1: 941}),
    ("next-step", "reference", {0: 961, 1: 941}),
    ("official", "aligned", {0: 981, 1: 961}),
    ("next-step", "aligned", {0: 981, 1: 961}),
])
def test_which_inversion_call_feeds_which_step(pack, env, monkeypatch, scheme, alignment, expect):
    """50 steps: sampling step 0 runs at t = 981. The reference's alignment (the default) gives
    it the record of the inversion call at t = 961 (step 1: 941); aligned gives each step the
    call at its own timestep (under the official scheme through one extra call at 981). The
    records are those calls' features, and sampling injects them at its own timesteps."""
    dm = env["model"].model.diffusion_model
    calls = UNetCalls(env["model"], monkeypatch)
    layer = "output_blocks.4.1.transformer_blocks.0.attn1"
    seen, handle = _capture_q_inputs(dm, layer, lambda: calls.timesteps[-1])
    try:
        kw = {} if alignment == "reference" else {"pnp_alignment": alignment}
        inv = invert(pack, env, steps=50, scheme=scheme, pnp_steps=2, **kw)
    finally:
        handle.remove()
    bank = inv.features
    ms = env["model"].get_model_object("model_sampling")
    got = {step: round(float(ms.timestep(inv.sigmas[k]))) for step, k in bank.source_index.items()}
    assert got == expect
    extra = scheme == "official" and alignment == "aligned"
    assert len(calls.timesteps) == (49 if scheme == "official" else 50) + extra
    for step, t in expect.items():
        (x,) = [x for tt, x in seen if tt == t]
        assert torch.equal(bank.get(step, "attn1:output.4.0", 0), x.to(torch.float16))
    # sampling: the first two steps (981, 961) get records 0 and 1, the third none
    calls.timesteps.clear()
    seen, handle = _capture_q_inputs(dm, layer, lambda: calls.timesteps[-1], stop_after=3)
    try:
        with pytest.raises(Stop):
            sample(pack, env, inv, cfg=1.0, inject_step=2)
    finally:
        handle.remove()
    assert [t for t, _ in seen] == [981, 961, 941]
    for step in (0, 1):
        assert torch.equal(seen[step][1], bank.get(step, "attn1:output.4.0", 0).float())
    assert not torch.equal(seen[2][1], bank.get(1, "attn1:output.4.0", 0).float())  # step 2: its own


# ---------------------------------------------------------------- the cache
@pytest.fixture()
def cache_dir(pack, tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setattr(pack.invert, "cache_folder", lambda: str(d))
    return d


def _entries(d):
    return sorted(p for p in os.listdir(d) if p.endswith(".safetensors")) if os.path.isdir(d) else []


def test_a_cache_hit_returns_the_features(pack, env, cache_dir, monkeypatch):
    kw = dict(conditioning=env["fox"], negative=env["empty"], use_cache=True)
    first = invert(pack, env, pnp_steps=2, **kw)
    calls = UNetCalls(env["model"], monkeypatch)
    again = invert(pack, env, pnp_steps=2, **kw)
    assert calls.timesteps == [], "a hit must not call the UNet"
    assert again.features is not first.features
    assert sorted(again.features.records) == sorted(first.features.records)
    assert all(torch.equal(again.features.records[k], first.features.records[k]) for k in first.features.records)
    assert again.features.meta() == first.features.meta()
    assert torch.equal(sample(pack, env, again, inject_step=2), sample(pack, env, first, inject_step=2))
    # the key covers pnp_steps, the alignment, PnP on/off and the uncond prompt; off keeps its features-free entry
    invert(pack, env, pnp_steps=1, **kw)
    invert(pack, env, pnp_steps=2, pnp_alignment="aligned", **kw)
    invert(pack, env, pnp_steps=2, **{**kw, "negative": env["cat"]})
    off = invert(pack, env, **kw)
    assert off.features is None and len(_entries(cache_dir)) == 5
    assert invert(pack, env, **kw).features is None and len(_entries(cache_dir)) == 5


def test_a_damaged_feature_record_is_recomputed(pack, env, cache_dir, monkeypatch):
    first = invert(pack, env, pnp_steps=1, use_cache=True)
    (name,) = _entries(cache_dir)
    path = cache_dir / name
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # the last bytes are record data: only the checksum can tell
    path.write_bytes(bytes(data))
    calls = UNetCalls(env["model"], monkeypatch)
    again = invert(pack, env, pnp_steps=1, use_cache=True)
    assert calls.timesteps, "a damaged entry must be recomputed"
    assert all(torch.equal(again.features.records[k], first.features.records[k]) for k in first.features.records)


# ---------------------------------------------------------------- bad inputs (the server catalogue has them too)
def test_bad_inputs_are_refused_before_sampling(pack, env, monkeypatch):
    inv = invert(pack, env, pnp_steps=2)
    plain = invert(pack, env)
    other_frames = invert(pack, env, _latent(0, frames=3), pnp_steps=2)
    other_size = invert(pack, env, _latent(0, hw=16), pnp_steps=2)
    other_steps = invert(pack, env, steps=5, pnp_steps=2)
    calls = UNetCalls(env["model"], monkeypatch)
    cases = [
        (dict(inversion=inv, inject_step=3), r"inject_step is 3 but the inversion recorded PnP features for 2 steps"),
        (dict(inversion=plain, inject_step=1), r"inject_step is 1 but the inversion has no PnP features: set "
                                               r"pnp_steps to at least 1"),
        (dict(inversion=dataclasses.replace(inv, features=other_frames.features), inject_step=1),
         r"inversion: its PnP features were recorded for 3 frames of latent 8x8 but the inversion is 2 frames"),
        (dict(inversion=dataclasses.replace(inv, features=other_size.features), inject_step=1),
         r"inversion: its PnP features were recorded for 2 frames of latent 16x16 but the inversion is 2 frames "
         r"of 8x8"),
        (dict(inversion=dataclasses.replace(inv, features=other_steps.features), inject_step=1),
         r"inversion: its PnP features were recorded for another schedule \(5 steps"),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message):
            sample(pack, env, kw.pop("inversion"), **kw)
    with pytest.raises(ValueError, match=r"pnp_steps is 4 but 4 steps with the reference alignment have records "
                                         r"for at most 3 sampling steps"):
        invert(pack, env, pnp_steps=4)
    with pytest.raises(ValueError, match=r"pnp_alignment must be one of reference, aligned"):
        invert(pack, env, pnp_steps=1, pnp_alignment="sideways")
    assert calls.timesteps == [], "refused before any UNet call"
    assert invert(pack, env, pnp_steps=4, pnp_alignment="aligned").features.steps == 4  # aligned: all steps


def test_the_taps_are_inert_outside_the_packs_calls(pack, env):
    """The clone Sample injects with keeps its taps in place after sampling (the host unpatches
    lazily): another sampler using that model computes what the plain model does."""
    inv = invert(pack, env, pnp_steps=1)
    glue = pack.glue
    model = env["model"].clone()
    glue.install(model, pack.hooks.PnPRun("inject", inv.features), inv.features.targets)
    assert any(isinstance(v, pack.hooks.ResidualTap) for v in model.object_patches.values())
    ks = lambda m: env["nodes"].KSampler().sample(m, 3, 2, 5.0, "ddim", "ddim_uniform", env["fox"], env["empty"],
                                                  {"samples": env["a"]}, denoise=1.0)[0]["samples"]
    assert torch.equal(ks(model), ks(env["model"]))
