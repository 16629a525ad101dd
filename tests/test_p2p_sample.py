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
