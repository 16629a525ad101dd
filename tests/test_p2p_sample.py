"""VideoGrain P2P Sample through the real host (small random test model, in process): the
properties of VIDEO_P2P.md sections 5, 6 and 8 on the stacked [source; target] run, and
its refusals before sampling."""
from __future__ import annotations

import dataclasses
from importlib import import_module

import pytest
import torch
from vg_testlib import pack_modules

FRAMES, LATENT, STEPS = 2, 16, 3
PEOPLE = "two people walking on a street"
ROBOTS = "two robots walking on a street"
SNOWY = "two people walking on a snowy street"


def _args(out):
    return out.args if hasattr(out, "args") else out.result


@pytest.fixture(scope="module")
def env(comfy_host, test_models):
    import comfy.sd
    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(test_models.small, output_vae=False,
                                                              output_clipvision=False)
    cls = comfy_host.nodes.NODE_CLASS_MAPPINGS
    pack = pack_modules(comfy_host, stage="videograin_core.p2p.stage", runtime="videograin_core.attention.runtime",
                        blend="videograin_core.p2p.blend", control="videograin_core.p2p.control",
                        layout="videograin_core.prompts.layout", fa="videograin_core.attention.frame_attention")
    negative = comfy_host.nodes.CLIPTextEncode().encode(clip, "")[0]
    g = torch.Generator().manual_seed(5)
    lat = torch.nn.functional.interpolate(torch.randn(FRAMES, 4, 4, 4, generator=g), size=(LATENT, LATENT),
                                          mode="bilinear") * 2
    source_cond = comfy_host.nodes.CLIPTextEncode().encode(clip, PEOPLE)[0]
    _, inv = _args(cls["VideoGrainDDIMInvert"].execute(model=model, conditioning=source_cond, steps=STEPS, cfg=1.0,
                                                       use_cache=False, latent={"samples": lat}, scheme="next-step"))
    return dict(model=model, clip=clip, cls=cls, pack=pack, negative=negative, inv=inv, host=comfy_host)


def control(env, target=ROBOTS, source=PEOPLE, **kw):
    args = dict(clip=env["clip"], source_prompt=source, target_prompt=target, mode="word swap", cross_replace=0.2,
                self_replace=0.5, reweight="", blend_source_word="", blend_target_word="", blend_threshold=0.3,
                parity_bug=False)
    args.update(kw)
    return _args(env["cls"]["VideoGrainP2PControl"].execute(**args))


def sample(env, ctl, model=None, cfg=7.5, source_mode="direct", frame_attention="all frames", inv=None, **over):
    src, tgt, p2p = ctl
    args = dict(model=model or env["model"], source=src, target=tgt, p2p=p2p, negative=env["negative"],
                inversion=inv or env["inv"], cfg=cfg, source_mode=source_mode, frame_attention=frame_attention)
    args.update(over)
    target, source = _args(env["cls"]["VideoGrainP2PSample"].execute(**args))
    return target["samples"], source["samples"]


class Capture:
    """An outermost attention stage recording every call's q, k, v, output and step."""

    def __init__(self, stage_mod):
        self.calls = []
        self.stage_mod = stage_mod

    def __deepcopy__(self, memo):
        return self

    def before(self, call):
        return None

    def around(self, call, next):
        return next(call)

    def after(self, call, out):
        self.calls.append(dict(kind=call.kind, q=call.q.clone(), k=call.k.clone(), v=call.v.clone(), out=out.clone(),
                               batch=call.batch, n_heads=int(call.extra_options["n_heads"]),
                               when=self.stage_mod.schedule_step(call.extra_options)))
        return out


def with_capture(env):
    cap = Capture(env["pack"].stage)
    m = env["model"].clone()
    env["pack"].runtime.with_stage(m.model_options.setdefault("transformer_options", {}), cap)
    return m, cap


# ---------------------------------------------------------------- properties
@pytest.mark.parametrize("source_mode,cfg", [("fast", 1.0), ("direct", 7.5), ("direct", 1.0)])
@pytest.mark.parametrize("frame_attention", ["all frames", "first frame"])
def test_unchanged_prompt_gives_the_source(env, source_mode, cfg, frame_attention):
    ctl = control(env, target=PEOPLE, blend_source_word="people", blend_target_word="people")
    target, source = sample(env, ctl, cfg=cfg, source_mode=source_mode, frame_attention=frame_attention)
    # float32 rounding (the target's controlled rows are attended explicitly, the source's by the
    # kernel), amplified by the guidance scale
    assert torch.allclose(target, source, atol=2e-4 * max(1.0, cfg), rtol=0), (target - source).abs().max()
    # an edited prompt does change the target (the check above can fail)
    edited, source2 = sample(env, control(env), cfg=cfg, source_mode=source_mode, frame_attention=frame_attention)
    assert (edited - source2).abs().max() > 0.1


def test_direct_reconstructs_the_source_exactly_fast_does_not(env):
    inv = env["inv"]
    _, source = sample(env, control(env), source_mode="direct")
    assert torch.allclose(source, inv.source, atol=1e-5, rtol=1e-5), (source - inv.source).abs().max()
    _, fast = sample(env, control(env), source_mode="fast", cfg=7.5)
    assert (fast - inv.source).abs().max() > 1e-3


def _expected_target(stage_mod, ctl, c):
    """From a captured cond attn2 call: the controlled target output, computed here."""
    b, heads = c["batch"], c["n_heads"]
    cond = [i for i, br in enumerate(b.branches) if br == 0]
    (i,) = cond
    F = b.frames
    src = slice(i * 2 * F, i * 2 * F + F)
    tgt = slice(i * 2 * F + F, (i + 1) * 2 * F)
    q, k, v = c["q"].double(), c["k"].double(), c["v"].double()

    def probs(qq, kk):
        n, lq, ch = qq.shape
        d = ch // heads
        qh = qq.reshape(n, lq, heads, d).transpose(1, 2)
        kh = kk.reshape(n, -1, heads, d).transpose(1, 2)
        return torch.softmax(qh @ kh.transpose(-1, -2) / d ** 0.5, -1)

    def apply(p, vv):
        n, lk, ch = vv.shape
        o = p @ vv.reshape(n, lk, heads, ch // heads).transpose(1, 2)
        return o.transpose(1, 2).reshape(n, p.shape[2], ch)
    p_src, p_tgt = probs(q[src], k[src]), probs(q[tgt], k[tgt])
    L = k.shape[1]
    if ctl.mode == "swap":
        M = ctl.mapper_tensor(dtype=torch.float64)
        new = p_src @ M
        want = new
    else:
        idx = torch.tensor(ctl.mapper)
        a = torch.tensor(ctl.alphas, dtype=torch.float64)
        want = p_src[..., idx.clamp(min=0)] * a + p_tgt * (1 - a)
    if ctl.equalizer:
        want = want * torch.tensor(ctl.equalizer, dtype=torch.float64)
    assert L == ctl.token_count
    return apply(want, v[tgt]), apply(p_tgt, v[tgt]), c["out"][tgt].double()


@pytest.mark.parametrize("mode,target,reweight", [("word swap", ROBOTS, ""), ("refine", SNOWY, "snowy: 2")])
def test_target_cross_maps_are_the_mapped_source_maps_inside_the_window(env, mode, target, reweight):
    m, cap = with_capture(env)
    ctl = control(env, target=target, mode=mode, reweight=reweight, cross_replace=0.5)
    sample(env, ctl, model=m)
    p2p = ctl[2]
    cross = [c for c in cap.calls if c["kind"] == "cross" and c["batch"] is not None and 0 in c["batch"].branches]
    assert cross
    inside = outside = 0
    for c in cross:
        step, steps = c["when"]
        want, own, got = _expected_target(env["pack"].stage, p2p, c)
        if p2p.cross_alpha(step, steps) is not None:
            inside += 1
            assert torch.allclose(got, want, atol=2e-4, rtol=1e-3), (got - want).abs().max()
            assert not torch.allclose(got, own, atol=1e-3, rtol=0)
        else:
            outside += 1
            assert torch.allclose(got, own, atol=2e-4, rtol=1e-3)
    assert inside and outside


def test_reweight_factor_one_changes_nothing(env):
    # cross_replace 0.5 of 3 steps: rows int(0.5 * 4) = 2, steps 0 and 1 (where reweighting acts)
    base = sample(env, control(env, target=SNOWY, mode="refine", cross_replace=0.5))
    one = sample(env, control(env, target=SNOWY, mode="refine", reweight="snowy: 1", cross_replace=0.5))
    two = sample(env, control(env, target=SNOWY, mode="refine", reweight="snowy: 3", cross_replace=0.5))
    assert torch.equal(base[0], one[0]) and torch.equal(base[1], one[1])
    assert not torch.allclose(base[0], two[0], atol=1e-4)


def test_outside_the_blend_mask_the_target_is_the_source(env, monkeypatch):
    masks = []
    original = env["pack"].blend.BlendStore.mask

    def recording(self, size):
        m = original(self, size)
        masks.append(m.clone())
        return m
    monkeypatch.setattr(env["pack"].blend.BlendStore, "mask", recording)
    ctl = control(env, blend_source_word="people", blend_target_word="robots", blend_threshold=0.99)
    # (the random test model's maps are flat: a high threshold leaves part of the 4x4 grid out)
    target, source = sample(env, ctl)
    assert len(masks) == STEPS - int(0.2 * STEPS)          # built after each model call from the start step
    last = masks[-1]
    assert last.shape == (FRAMES, LATENT, LATENT) and last.any() and not last.all()
    outside = ~last[:, None].expand_as(target)
    assert torch.equal(target[outside], source[outside])
    assert (target[~outside] - source[~outside]).abs().max() > 1e-3
    # without blend words: no mask, the target differs everywhere
    free, src2 = sample(env, control(env))
    assert torch.equal(src2, source) and ((free - src2).abs() > 1e-6).float().mean() > 0.9


def _st_layout_model(env):
    lay = env["pack"].layout.Layout()
    left = torch.zeros(FRAMES, LATENT * 8, LATENT * 8)
    left[:, :, : LATENT * 4] = 1
    lay = lay.add(left, "people").add(1 - left, "street")
    _, layout = _args(env["cls"]["VideoGrainLayoutConditioning"].execute(clip=env["clip"], global_prompt=PEOPLE,
                                                                          layout=lay))
    return _args(env["cls"]["VideoGrainSTLayoutPatch"].execute(
        model=env["model"], layout=layout, full_frame_attention=True, self_strength=0.3, cross_strength=1.0,
        end_percent=1.0, self_branch="both", size_term="reference", modulate_full_resolution=False))[0]


@pytest.mark.parametrize("which", ["plain", "st-layout"])
@pytest.mark.parametrize("frame_attention", ["all frames", "first + previous"])
def test_the_branches_never_mix(env, which, frame_attention):
    """Control off, fast mode: the target's result does not depend on the source branch
    (another source prompt), though its frames attend over all frames / pooled norms."""
    model = env["model"] if which == "plain" else _st_layout_model(env)
    off = dict(cross_replace=0.0, self_replace=0.0)
    a_t, a_s = sample(env, control(env, **off), model=model, source_mode="fast", frame_attention=frame_attention)
    b_t, b_s = sample(env, control(env, source="two cats sitting on a roof", **off), model=model, source_mode="fast",
                      frame_attention=frame_attention, inv=env["inv"])
    assert (a_s - b_s).abs().max() > 1e-2
    assert torch.allclose(a_t, b_t, atol=1e-6, rtol=0), (a_t - b_t).abs().max()


def test_frame_attention_keys(env):
    fa = env["pack"].fa
    x = torch.arange(2 * 3, dtype=torch.float32).reshape(6, 1, 1)      # 2 sequences x 3 frames, one token
    first = fa.frame_keys(x, 2, 3, "first frame").flatten().tolist()
    assert first == [0, 0, 0, 3, 3, 3]
    fp = fa.frame_keys(x, 2, 3, "first + previous").reshape(6, 2).tolist()
    assert fp == [[0, 0], [0, 0], [0, 1], [3, 3], [3, 3], [3, 4]]


# ---------------------------------------------------------------- refusals before sampling
def _no_sampling(monkeypatch, env):
    glue = import_module(env["host"].pack.__name__ + ".nodes.p2p_sample")

    def fail(*a, **k):
        raise AssertionError("sampling started")
    monkeypatch.setattr(glue, "run_guider", fail)


def test_refusals_name_the_input(env, monkeypatch):
    _no_sampling(monkeypatch, env)
    good = control(env)
    other = control(env, source="two cats walking on a street", target="two dogs walking on a street")
    cases = [
        (dict(ctl=(other[0], other[1], good[2])), "source: this is not the conditioning the P2P control was made for"),
        (dict(ctl=(good[0], other[1], good[2])), "target: this is not the conditioning the P2P control was made for"),
        (dict(ctl=(good[1], good[0], good[2])), "source: this is not the conditioning the P2P control was made for "
                                                "(source and target are swapped)"),
        (dict(ctl=(good[0] + good[0], good[1], good[2])), "source: expected the P2P Control node's source"),
        (dict(p2p_tokens=True), "source: the conditioning has 77 tokens but the P2P control was made for 154"),
        (dict(context=True), "model: context windows"),
        (dict(frames=True), "inversion: it holds 1 frames but the model's ST-Layout layout has 2"),
        (dict(source_mode="null"), "source_mode must be one of direct, fast"),
    ]
    for change, message in cases:
        ctl = change.get("ctl", good)
        model = env["model"]
        inv = env["inv"]
        if change.get("p2p_tokens"):
            ctl = (ctl[0], ctl[1], dataclasses.replace(ctl[2], token_count=154, alphas=ctl[2].alphas * 2))
        if change.get("context"):
            model = model.clone()
            model.model_options["context_handler"] = object()
        if change.get("frames"):
            model = _st_layout_model(env)
            inv = dataclasses.replace(inv, latent=inv.latent[:1], trajectory=inv.trajectory[:, :1],
                                      source=inv.source[:1])
        with pytest.raises(ValueError) as e:
            sample(env, ctl, model=model, inv=inv, source_mode=change.get("source_mode", "direct"))
        assert str(e.value).startswith(message), str(e.value)


# ---------------------------------------------------------------- null-text mode (VIDEO_P2P.md section 4)
def _toy_reference(nt, depends: bool, nudge_steps, inner=6, steps=4, guid=7.5):
    g = torch.Generator().manual_seed(0)
    F = 2
    sig = [3.0, 1.5, 0.6, 0.2, 0.0]
    W = torch.randn(4, 768, generator=g, dtype=torch.float64) * 0.05
    base = torch.randn(F, 4, 2, 2, generator=g, dtype=torch.float64)

    def eps_c(x, i):
        return 0.3 * x + 0.1 * (i + 1)

    def eps_u(x, i, null):    # depends on the embedding through a per-channel shift
        shift = (null.to(x.dtype)[0] @ W.to(x.dtype).T).mean(0) if depends else x.new_zeros(4) + null.sum() * 0
        return 0.25 * x + torch.tanh(shift)[None, :, None, None] * (1 + 0.1 * i)

    null0 = torch.randn(1, 77, 768, generator=g, dtype=torch.float64) * 0.1
    true = null0 + 0.5 * torch.randn(1, 77, 768, generator=g, dtype=torch.float64)
    # an inversion: guided steps with another embedding (depends) or the initial one, nudged at nudge_steps
    desc = [base]
    for i in range(steps):
        x = desc[-1]
        e = eps_u(x, i, true if depends else null0)
        nxt = x + (sig[i + 1] - sig[i]) * (e + guid * (eps_c(x, i) - e))
        if i in nudge_steps:
            nxt = nxt + 0.05 * torch.randn(nxt.shape, generator=g, dtype=torch.float64)
        desc.append(nxt)
    traj = torch.stack(desc[::-1])

    # the reference, float64, Adam by hand
    ref_embs, ref_counts, x, null = [], [], desc[0].clone(), null0.clone()
    for i in range(steps):
        lr, thr, s, s1 = 1e-2 * (1 - i / 100), 1e-5 + 2e-5 * i, sig[i], sig[i + 1]
        m, v = torch.zeros_like(null), torch.zeros_like(null)
        ec = eps_c(x, i)
        for j in range(inner):
            p = null.clone().requires_grad_(True)
            e = eps_u(x, i, p)
            xn = x + (s1 - s) * (e + guid * (ec - e))
            loss = ((xn / (1 + s1 ** 2) ** 0.5 - desc[i + 1] / (1 + s1 ** 2) ** 0.5) ** 2).mean()
            (grad,) = torch.autograd.grad(loss, p)
            m = 0.9 * m + 0.1 * grad
            v = 0.999 * v + 0.001 * grad * grad
            mh, vh = m / (1 - 0.9 ** (j + 1)), v / (1 - 0.999 ** (j + 1))
            null = null - lr * mh / (vh.sqrt() + 1e-8)
            if loss.item() < thr:
                break
        ref_counts.append(j + 1)
        ref_embs.append(null.clone())
        e = eps_u(x, i, null)
        x = x + (sig[i + 1] - sig[i]) * (e + guid * (ec - e))

    calls = []
    with torch.inference_mode():   # the inputs as the host hands them over: inference tensors
        traj_inf, sig_inf, null_inf = traj.float(), torch.tensor(sig), null0.float()
        res = nt.optimize_null_text(eps_c, eps_u, traj_inf, sig_inf, null_inf, guidance=guid, inner_steps=inner,
                                    on_inner=lambda i, j, loss: calls.append((i, j)))
    return res, ref_embs, ref_counts, x, calls, null0


def test_null_text_optimisation_matches_a_plain_reference(env):
    """The core on toy eps functions against an independent float64 Adam written here:
    lr 1e-2 * (1 - i/100), warm start, early stop below 1e-5 + 2e-5 * i, the loss on the
    diffusers latent x / sqrt(1 + sigma'^2), the source advanced with the stored embedding."""
    nt = import_module(env["host"].pack.__name__ + ".videograin_core.p2p.null_text")
    inner, steps = 6, 4
    res, ref_embs, ref_counts, x, calls, _ = _toy_reference(nt, True, (), inner=inner, steps=steps)
    assert res.inner_steps_run == ref_counts
    assert res.embeddings.shape == (steps, 1, 77, 768) and res.embeddings.dtype == torch.float32
    for i in range(steps):
        assert torch.allclose(res.embeddings[i].double(), ref_embs[i], atol=1e-4, rtol=0), \
            (i, (res.embeddings[i].double() - ref_embs[i]).abs().max())
    assert (ref_embs[-1] - ref_embs[0]).abs().max() > 1e-3            # it did move (warm start carried on)
    assert torch.allclose(res.latent.double(), x, atol=1e-4, rtol=1e-4)
    assert [c for c in calls if c[1] is not None] == [(i, j) for i in range(steps) for j in range(ref_counts[i])]
    # early stop: an exact inversion stops after one inner step, a nudged step runs them all
    res, ref_embs, ref_counts, x, calls, null0 = _toy_reference(nt, False, (steps - 1,), inner=inner, steps=steps)
    assert ref_counts == [1] * (steps - 1) + [inner] and res.inner_steps_run == ref_counts
    assert torch.equal(res.embeddings, null0.float()[None].expand(steps, -1, -1, -1))  # zero gradient: no move
    assert [c[0] for c in calls if c[1] is None] == list(range(steps - 1))  # progress for the steps left out
    assert nt.step_lr(0) == 1e-2 and abs(nt.step_lr(49) - 0.0051) < 1e-12 and nt.stop_loss(3) == 1e-5 + 6e-5
    with pytest.raises(ValueError, match="inner_steps"):
        nt.optimize_null_text(lambda x, i: x, lambda x, i, n: x, torch.zeros(2, 1, 1), torch.tensor([1.0, 0.0]),
                              null0, inner_steps=0)


NT_LATENT = 8


NT_STEPS = 25  # the reconstruction check: 3 steps are too coarse for 10 inner steps to fix (ratio ~0.48)


def _nt_inversion(env, steps):
    """The small_smooth test model (smooth eps, made for reconstruction checks) loaded under
    torch.inference_mode() as the host's loader node loads it, so its weights are inference
    tensors, and an inversion of a smaller latent with `steps` steps."""
    import comfy.sd
    from vg_testlib import load_script
    import os
    path = load_script("make_test_models").write_model(os.path.join(env["host"].path, "models"), "small_smooth")
    g = torch.Generator().manual_seed(7)
    lat = torch.nn.functional.interpolate(torch.randn(FRAMES, 4, 4, 4, generator=g), size=(NT_LATENT, NT_LATENT),
                                          mode="bilinear") * 2
    with torch.inference_mode():
        model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(path, output_vae=False, output_clipvision=False)
        source_cond = env["host"].nodes.CLIPTextEncode().encode(clip, PEOPLE)[0]
        negative = env["host"].nodes.CLIPTextEncode().encode(clip, "")[0]
        _, inv = _args(env["cls"]["VideoGrainDDIMInvert"].execute(model=model, conditioning=source_cond,
                                                                  steps=steps, cfg=1.0, use_cache=False,
                                                                  latent={"samples": lat}, scheme="next-step"))
    assert next(model.model.diffusion_model.parameters()).is_inference()
    return dict(env, model=model, clip=clip, negative=negative, inv=inv)


@pytest.fixture(scope="module")
def nt_env(env):
    """The null-text runs (they backpropagate through the UNet), at the suite's 3 steps."""
    return _nt_inversion(env, STEPS)


def _glue(env, name):
    return import_module(env["host"].pack.__name__ + ".nodes." + name)


def _plain_embeddings(env, monkeypatch):
    """Null-text mode with every step's embedding the plain "" one: plain DDIM of the source
    at the same guidance through the same code path."""
    neg = env["negative"][0][0].float()
    monkeypatch.setattr(_glue(env, "p2p_null_text"), "null_embeddings",
                        lambda model, source, negative, inv, *a, **k: neg[None].repeat(inv.steps, 1, 1, 1))


def _source_errors(env, monkeypatch, capsys):
    """(RMS error of the null-text source, of the plain run's source, targets and sources) with
    equal prompts; the plain run is null-text mode with every step's embedding the "" one."""
    inv = env["inv"]
    ctl = control(env, target=PEOPLE)
    with torch.inference_mode():
        nt_target, nt_source = sample(env, ctl, source_mode="null-text", use_cache=False, inv=inv)
    err_nt = (nt_source - inv.source).pow(2).mean().sqrt().item()
    with monkeypatch.context() as m:
        _plain_embeddings(env, m)
        with torch.inference_mode():
            pl_target, pl_source = sample(env, ctl, source_mode="null-text", use_cache=False, inv=inv)
    err_plain = (pl_source - inv.source).pow(2).mean().sqrt().item()
    with capsys.disabled():
        print(f"\nnull-text at {inv.steps} steps: latent RMS error {err_nt:.4g}, plain DDIM at 7.5 {err_plain:.4g}, "
              f"ratio {err_nt / err_plain:.4g}")
    return err_nt, err_plain, (nt_target, nt_source, pl_target, pl_source)


def test_null_text_leaves_the_target_alone(nt_env, monkeypatch, capsys):
    err_nt, err_plain, (nt_target, _, pl_target, pl_source) = _source_errors(nt_env, monkeypatch, capsys)
    # the plain run: with equal prompts both branches are the same DDIM run (3 steps: over many
    # steps the random model at guidance 7.5 amplifies the float noise between the batch rows)
    assert torch.allclose(pl_target, pl_source, atol=1e-4, rtol=0), (pl_target - pl_source).abs().max()
    # decoupled guidance (section 5): the target keeps the "" uncond, so with equal prompts it is
    # the plain run's, whatever the source's embeddings are (not the source: see the README)
    assert torch.allclose(nt_target, pl_target, atol=1e-4, rtol=0), (nt_target - pl_target).abs().max()
    assert err_nt < 0.7 * err_plain, (err_nt, err_plain)  # 3 steps: ~0.48


def test_null_text_reconstructs_with_a_tenth_of_plain_ddims_error(env, monkeypatch, capsys):
    """At guidance 7.5 the optimised null embeddings bring the source back with at most a
    tenth of the latent error plain DDIM sampling has (measured: 0.074 at 25 steps with the
    random small_smooth model; 0.31 at 10 steps, 0.48 at 3)."""
    err_nt, err_plain, _ = _source_errors(_nt_inversion(env, NT_STEPS), monkeypatch, capsys)
    assert err_nt <= 0.1 * err_plain, (err_nt, err_plain)


def test_null_text_refusals_before_sampling(env, monkeypatch):
    _no_sampling(monkeypatch, env)
    monkeypatch.setattr(_glue(env, "p2p_null_text"), "run_guider",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("sampling started")))
    for over, message in ((dict(inner_steps=0), "inner_steps must be a whole number of at least 1"),
                          (dict(inner_steps=-3), "inner_steps must be"),
                          (dict(inner_steps=2.5), "inner_steps must be"),
                          (dict(cfg=1.0), "cfg is 1 but null-text mode")):
        with pytest.raises(ValueError) as e:
            sample(env, control(env), source_mode="null-text", **over)
        assert str(e.value).startswith(message), str(e.value)
    # the other modes ignore the option
    with pytest.raises(AssertionError, match="sampling started"):
        sample(env, control(env), source_mode="fast", inner_steps=0)


def test_null_text_cache_hit_skips_the_optimisation(nt_env, monkeypatch, tmp_path):
    env, small_inv = nt_env, nt_env["inv"]
    glue = _glue(env, "p2p_null_text")
    monkeypatch.setattr(glue, "cache_folder", lambda: str(tmp_path))
    core = import_module(env["host"].pack.__name__ + ".videograin_core.p2p.null_text")
    seen = []
    original = core.optimize_null_text

    def counting(*a, **k):
        r = original(*a, **k)
        seen.append(r.embeddings.clone())
        return r
    monkeypatch.setattr(core, "optimize_null_text", counting)
    with torch.inference_mode():
        first = sample(env, control(env), source_mode="null-text", inner_steps=1)
    assert len(seen) == 1 and len(list(tmp_path.glob("*.safetensors"))) == 1
    monkeypatch.setattr(core, "optimize_null_text", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    with torch.inference_mode():
        second = sample(env, control(env), source_mode="null-text", inner_steps=1)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    key = glue.null_text_key
    m = env["model"]
    k1 = key(m, control(env)[0], env["negative"], small_inv, 7.5, 1)
    assert k1 != key(m, control(env)[0], env["negative"], small_inv, 7.5, 2)
    assert k1 != key(m, control(env)[0], env["negative"], small_inv, 5.0, 1)
    other_inv = dataclasses.replace(small_inv, trajectory=small_inv.trajectory + 1e-3)
    assert k1 != key(m, control(env)[0], env["negative"], other_inv, 7.5, 1)
    assert k1 != key(m, control(env, source=SNOWY, target=SNOWY)[0], env["negative"], small_inv, 7.5, 1)
    tensors, status = glue.InversionCache(str(tmp_path)).load_tensors(
        next(tmp_path.glob("*.safetensors")).stem, glue.CACHE_KIND)
    assert status == "hit" and tensors["embeddings"].shape == (STEPS, 1, 77, 768)
