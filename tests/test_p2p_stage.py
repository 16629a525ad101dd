"""The P2P control object and its cross-attention stage, driven through an attention
runtime instance on synthetic q/k/v (no host). The values are given one-hot per text
token and head (d = 77), so each head's output row IS that row's probabilities over the
77 tokens: the tests read the probabilities the stage used straight from the output."""
from __future__ import annotations

import copy
import dataclasses
import json
import os

import pytest
import torch
from vg_testlib import comfyui_path, warnings_logged

from videograin_core.attention.batch_layout import PUBLISHED_KEY, BatchLayout
from videograin_core.attention.runtime import STAGES_KEY, PatchOptions, STLayoutRuntime
from videograin_core.p2p import stage as stage_mod
from videograin_core.p2p import tokens as T
from videograin_core.p2p.control import build_control
from videograin_core.p2p.stage import P2PCrossStage, schedule_step
from videograin_core.prompts.layout import Layout

L, HEADS, FRAMES, LQ = 77, 2, 2, 5
C = HEADS * L
STEPS = 10   # cross_replace 0.2: rows int(0.2 * 11) = 2, so steps 0 and 1 are controlled
MAN = "a man is driving a motorbike in the forest"
SPIDER = "a Spider-Man is driving a motorbike in the forest"
RABBIT = "a rabbit is jumping on the grass"
ORIGAMI = "a origami rabbit is jumping on the grass"


@pytest.fixture(scope="module")
def tok():
    from transformers import CLIPTokenizer
    t = CLIPTokenizer.from_pretrained(os.path.join(comfyui_path(), "comfy", "sd1_tokenizer"))
    return lambda text: t(text)["input_ids"]


def plain_attention(q, k, v, extra):
    """The kernel: ordinary attention in float64 (what the host would run)."""
    b, lq, c = q.shape
    h = extra["n_heads"]
    d = c // h
    qh = q.double().reshape(b, lq, h, d).transpose(1, 2)
    kh = k.double().reshape(b, -1, h, d).transpose(1, 2)
    vh = v.double().reshape(b, -1, h, d).transpose(1, 2)
    o = torch.softmax(qh @ kh.transpose(-1, -2) / d ** 0.5, -1) @ vh
    return o.transpose(1, 2).reshape(b, lq, c).to(q.dtype)


def runtime():
    lay = Layout().add(torch.ones(1, 16, 16), "x").with_spans([(1, 2)], L)
    # no ST-Layout modulation, per-frame attention: the kernel is plain attention
    opts = PatchOptions(full_frame_attention=False, self_strength=0.0, cross_strength=0.0)
    return STLayoutRuntime(lay, opts, plain_attention, lambda s: s, None)


def inputs(branches=(1, 0), groups=2, tokens=L, seed=0):
    rows = len(branches) * groups * FRAMES
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, LQ, C, generator=g)
    k = torch.randn(rows, tokens, C, generator=g) * 0.3
    v = torch.zeros(rows, tokens, C)
    for h in range(HEADS):
        v[:, torch.arange(tokens), h * L + torch.arange(tokens) % L] = 1.0   # one-hot: output = probabilities
    return q, k, v


def run(q, k, v, stage=None, step=0, steps=STEPS, branches=(1, 0), groups=2, kind="cross", schedule=True):
    sched = torch.linspace(14.6, 0.0, steps + 1)
    extra = {"n_heads": HEADS, "cond_or_uncond": list(branches), "sigmas": sched[step:step + 1],
             PUBLISHED_KEY: BatchLayout(tuple(branches), q.shape[0] // (len(branches) * groups), groups)}
    if schedule:
        extra["sample_sigmas"] = sched
    if stage is not None:
        extra[STAGES_KEY] = (stage,)
    rt = runtime()
    fn = rt.make_attn2(None) if kind == "cross" else rt.make_attn1(None)
    return fn(q, k, v, extra)


def probs_of(out):
    """[rows, LQ, HEADS*77] output of one-hot values -> [rows, HEADS, LQ, 77] probabilities."""
    return out.double().reshape(out.shape[0], LQ, HEADS, L).transpose(1, 2)


def ref_probs(q, k):
    """Independent float64 softmax(q k^T / sqrt(d)) per head."""
    b = q.shape[0]
    qh = q.double().reshape(b, LQ, HEADS, L).transpose(1, 2)
    kh = k.double().reshape(b, -1, HEADS, L).transpose(1, 2)
    return torch.softmax(qh @ kh.transpose(-1, -2) / L ** 0.5, -1)


def rows(chunk, group):
    base = chunk * 2 * FRAMES + group * FRAMES
    return slice(base, base + FRAMES)


# ---------------------------------------------------------------- the stage
@pytest.mark.parametrize("branches", [(1, 0), (0, 1), (0,)])
def test_swap_target_reads_the_mapped_source_inside_the_window(tok, branches):
    ctl = build_control(MAN, SPIDER, tok, mode="word swap", cross_replace=0.2)
    q, k, v = inputs(branches)
    plain = run(q, k, v, branches=branches)
    for step in (0, 1):
        out = run(q, k, v, P2PCrossStage(ctl), step=step, branches=branches)
        M = T.replacement_mapper(T.tokenize_prompt(MAN, tok, "s"), T.tokenize_prompt(SPIDER, tok, "t"))[0]
        for c, b in enumerate(branches):
            if b == 0:   # cond: the target's maps are the source's, mapped (every token: alphas all 1)
                want = ref_probs(q[rows(c, 0)], k[rows(c, 0)]) @ M
                assert torch.allclose(probs_of(out[rows(c, 1)]), want, atol=2e-6, rtol=0)
                assert not torch.allclose(probs_of(plain[rows(c, 1)]), want, atol=1e-3, rtol=0)
                assert torch.equal(out[rows(c, 0)], plain[rows(c, 0)])    # the source rows: the kernel's
            else:        # uncond chunks: untouched
                assert torch.equal(out[rows(c, 0)], plain[rows(c, 0)]) and torch.equal(out[rows(c, 1)], plain[rows(c, 1)])


def test_swap_with_the_parity_bug_reads_other_columns(tok):
    fixed = build_control(MAN, SPIDER, tok, mode="word swap")
    bug = build_control(MAN, SPIDER, tok, mode="word swap", parity_bug=True)
    q, k, v = inputs()
    a, b = probs_of(run(q, k, v, P2PCrossStage(fixed))[rows(1, 1)]), probs_of(run(q, k, v, P2PCrossStage(bug))[rows(1, 1)])
    src = ref_probs(q[rows(1, 0)], k[rows(1, 0)])
    assert torch.allclose(a[..., :5], b[..., :5], atol=1e-6)           # up to Spider-Man: the same
    assert torch.allclose(a[..., 5], src[..., 3], atol=2e-6)          # "is" reads the source's "is"
    assert torch.allclose(b[..., 5], src[..., 5], atol=2e-6)          # with the bug: the source's second "a"


def test_refine_target_takes_aligned_source_columns(tok):
    ctl = build_control(RABBIT, ORIGAMI, tok, mode="refine")
    q, k, v = inputs()
    out = run(q, k, v, P2PCrossStage(ctl))
    src, own = ref_probs(q[rows(1, 0)], k[rows(1, 0)]), ref_probs(q[rows(1, 1)], k[rows(1, 1)])
    got = probs_of(out[rows(1, 1)])
    mapper = ctl.mapper
    for n in range(L):
        want = own[..., n] if mapper[n] < 0 else src[..., mapper[n]]
        assert torch.allclose(got[..., n], want, atol=2e-6, rtol=0), n
    assert mapper[2] == -1 and mapper[3] == 2   # "origami" keeps its own map, "rabbit" reads "rabbit"


def test_reweight_factor_one_changes_nothing_and_two_doubles(tok):
    q, k, v = inputs()
    base = run(q, k, v, P2PCrossStage(build_control(RABBIT, ORIGAMI, tok, mode="refine")))
    one = run(q, k, v, P2PCrossStage(build_control(RABBIT, ORIGAMI, tok, mode="refine", reweight="origami: 1")))
    assert torch.equal(one, base)
    two = run(q, k, v, P2PCrossStage(build_control(RABBIT, ORIGAMI, tok, mode="refine", reweight="origami: 2")))
    pb, p2 = probs_of(base[rows(1, 1)]), probs_of(two[rows(1, 1)])
    assert torch.allclose(p2[..., 2], 2 * pb[..., 2], atol=1e-6, rtol=0)
    others = [n for n in range(L) if n != 2]
    assert torch.equal(p2[..., others], pb[..., others])
    # outside the cross window the factor does nothing either (the reference's behaviour)
    late = run(q, k, v, P2PCrossStage(build_control(RABBIT, ORIGAMI, tok, mode="refine", reweight="origami: 2")), step=5)
    assert torch.equal(late, run(q, k, v, step=5))


def test_outside_the_window_the_output_is_plain_attention(tok):
    ctl = build_control(MAN, SPIDER, tok, mode="word swap", cross_replace=0.2)
    q, k, v = inputs()
    for step in (2, 5, 9):
        out = run(q, k, v, P2PCrossStage(ctl), step=step)
        assert torch.equal(out, run(q, k, v, step=step))
        assert torch.allclose(probs_of(out), ref_probs(q, k), atol=1e-6, rtol=0)
    # cross_replace 0.5 of 10 steps: rows int(0.5 * 11) = 5, steps 0-4
    wide = build_control(MAN, SPIDER, tok, mode="word swap", cross_replace=0.5)
    changed = [s for s in range(STEPS) if not torch.equal(run(q, k, v, P2PCrossStage(wide), step=s), run(q, k, v, step=s))]
    assert changed == [0, 1, 2, 3, 4]


def test_per_word_window(tok):
    # Spider-Man keeps the source's "man" map for half the run, the other words for 0.2
    ctl = build_control(MAN, SPIDER, tok, mode="word swap", cross_replace=0.2, word_windows={"Spider-Man": 0.5})
    q, k, v = inputs()
    out = run(q, k, v, P2PCrossStage(ctl), step=3)
    src, own = ref_probs(q[rows(1, 0)], k[rows(1, 0)]), ref_probs(q[rows(1, 1)], k[rows(1, 1)])
    got = probs_of(out[rows(1, 1)])
    for n in (2, 3, 4):
        assert torch.allclose(got[..., n], src[..., 2] / 3, atol=2e-6, rtol=0)
    rest = [n for n in range(L) if n not in (2, 3, 4)]
    assert torch.allclose(got[..., rest], own[..., rest], atol=2e-6, rtol=0)


def test_left_alone_when_not_a_p2p_batch(tok):
    ctl = build_control(MAN, SPIDER, tok, mode="word swap")
    st = P2PCrossStage(ctl)
    q, k, v = inputs(groups=1)             # one sequence per chunk: not [source; target]
    assert torch.equal(run(q, k, v, st, groups=1), run(q, k, v, groups=1))
    q, k, v = inputs(branches=(1,))        # an uncond-only call
    assert torch.equal(run(q, k, v, st, branches=(1,)), run(q, k, v, branches=(1,)))
    q, k, v = inputs()
    assert torch.equal(run(q, k, v, st, schedule=False), run(q, k, v, schedule=False))   # no schedule: no step
    # self-attention calls pass through (this stage is attn2 only)
    qs = torch.randn(8, LQ, C)
    assert torch.equal(run(qs, qs, qs, st, kind="self"), run(qs, qs, qs, kind="self"))
    # a conditioning of another length: warned once, left alone
    q, k, v = inputs(tokens=2 * L)
    with warnings_logged("videograin_core.p2p.stage") as messages:
        out = run(q, k, v, st)
        run(q, k, v, st)
    assert torch.equal(out, run(q, k, v))
    assert len([m for m in messages if "154 text tokens" in m]) == 1


def test_frame_blocks_give_the_same_result(tok, monkeypatch):
    ctl = build_control(RABBIT, ORIGAMI, tok, mode="refine", reweight="origami: 3")
    q, k, v = inputs()
    whole = run(q, k, v, P2PCrossStage(ctl))
    monkeypatch.setattr(stage_mod, "PROBS_BUDGET", 1)   # one frame at a time
    assert torch.allclose(run(q, k, v, P2PCrossStage(ctl)), whole, atol=1e-7, rtol=0)


def test_fp16_inputs_are_controlled_in_float32(tok):
    ctl = build_control(MAN, SPIDER, tok, mode="word swap")
    q, k, v = inputs()
    out = run(q.half(), k.half(), v.half(), P2PCrossStage(ctl))
    assert out.dtype == torch.float16
    M = ctl.mapper_tensor(dtype=torch.float64)
    want = ref_probs(q.half()[rows(1, 0)], k.half()[rows(1, 0)]) @ M
    assert torch.allclose(probs_of(out[rows(1, 1)]), want, atol=2e-3, rtol=0)


def test_schedule_step():
    sched = torch.linspace(14.6, 0.0, 51)
    assert [schedule_step({"sigmas": sched[i:i + 1], "sample_sigmas": sched}) for i in (0, 7, 49)] == \
        [(0, 50), (7, 50), (49, 50)]
    assert schedule_step({"sigmas": sched[:1]}) is None


# ---------------------------------------------------------------- the control object
def test_control_object_is_frozen_plain_and_shared(tok):
    c = build_control(MAN, SPIDER, tok, mode="word swap", reweight="Spider-Man: 4", blend_source_word="man",
                      blend_target_word="Spider-Man")
    assert copy.deepcopy(c) is c and copy.deepcopy({"x": c})["x"] is c
    assert not hasattr(c, "to")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.mode = "refine"
    fp = c.videograin_fingerprint()
    json.dumps(fp)                                     # plain values only
    assert fp["mode"] == "swap" and fp["target_prompt"] == SPIDER and fp["equalizer"][2] == 4.0
    c.mapper_tensor()                                  # cached tensors do not change the fingerprint or equality
    same = build_control(MAN, SPIDER, tok, mode="word swap", reweight="Spider-Man: 4", blend_source_word="man",
                         blend_target_word="Spider-Man")
    assert same == c and same.videograin_fingerprint() == fp and hash(same) == hash(c)
    for change in (dict(reweight="Spider-Man: 2"), dict(parity_bug=True), dict(cross_replace=0.3),
                   dict(blend_threshold=0.4), dict(self_replace=0.6)):
        other = build_control(MAN, SPIDER, tok, **{**dict(mode="word swap", reweight="Spider-Man: 4",
                                                          blend_source_word="man", blend_target_word="Spider-Man"),
                                                   **change})
        assert other.videograin_fingerprint() != fp, change
    assert P2PCrossStage(c).videograin_fingerprint()["mode"] == "swap"
    assert c.has_blend and c.blend_active(10, 50) and not c.blend_active(9, 50)
    assert c.self_active(24, 50) and not c.self_active(25, 50)
    with pytest.raises(ValueError, match="^p2p: expected a VIDEOGRAIN_P2P"):
        P2PCrossStage("not a control")


def test_build_control_refusals(tok):
    ok = dict(source_prompt=MAN, target_prompt=SPIDER, tokenize=tok, mode="word swap")
    cases = [
        (dict(target_prompt="a Spider-Man drives"), r"^target_prompt: word swap needs the same number of words"),
        (dict(reweight="man: 2"), r"^reweight: 'man' is not a word of the target_prompt"),
        (dict(reweight="Spider-Man 2"), r"^reweight: 'Spider-Man 2' is not 'word: factor'"),
        (dict(blend_source_word="Spider-Man"), r"^blend_source_word: 'Spider-Man' is not a word of the source_prompt"),
        (dict(blend_target_word="man"), r"^blend_target_word: 'man' is not a word of the target_prompt"),
        (dict(source_prompt="a (man:1.2) is driving a motorbike in the forest"), r"^source_prompt: weight syntax"),
        (dict(target_prompt="a embedding:x is driving a motorbike in the forest"), r"^target_prompt: textual-inv"),
        (dict(source_prompt=" ".join(["a"] * 76)), r"^source_prompt has 78 tokens"),
        (dict(cross_replace=1.5), r"^cross_replace"),
        (dict(self_replace=-0.1), r"^self_replace"),
        (dict(blend_threshold=2.0), r"^blend_threshold"),
        (dict(mode="swap words"), r"^mode"),
    ]
    for change, msg in cases:
        with pytest.raises(ValueError, match=msg):
            build_control(**{**ok, **change})
    c = build_control(**ok, reweight="Spider-Man: 4", blend_source_word="man", blend_target_word="Spider-Man")
    assert c.mode == "swap" and c.equalizer[2:5] == (4.0, 4.0, 4.0) and c.equalizer.count(1.0) == L - 3
    assert c.blend_source == (2,) and c.blend_target == (2, 3, 4)
    assert (c.source_tokens, c.target_tokens, c.token_count) == (11, 13, 77)
    # refine never refuses the alignment itself, whatever the word counts
    r = build_control(RABBIT, ORIGAMI, tok, mode="refine", blend_source_word="rabbit", blend_target_word="rabbit")
    assert r.mode == "refine" and r.blend_target == (3,) and r.alphas[2] == 0.0
