"""Attention capture (videograin_core.capture.recorder), host-free: the recorded maps are
the explicit softmax probabilities, only the positive branch and only the asked tokens
are kept, takes are named by the run's output, and the recorder follows the host rules
for objects in model options."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from videograin_core.attention.batch_layout import BatchLayout
from videograin_core.attention.runtime import AttentionCall, StageRuntime, stages_of, with_stage
from videograin_core.capture.recorder import (AttentionRecorder, CaptureSpec, CaptureStage, cross_probabilities,
                                              latent_digest, parse_levels, records_unet)

HEADS, D = 2, 4
FRAMES = 3
LATENT = (8, 8)          # original_shape h, w


def explicit_maps(q, k, heads, groups):
    """softmax over all keys, per head, by loops; mean over heads; sum over each group."""
    b, lq, c = q.shape
    d = c // heads
    out = torch.zeros(b, lq, len(groups), dtype=torch.float64)
    for i in range(b):
        for h in range(heads):
            qh = q[i, :, h * d:(h + 1) * d].double()
            kh = k[i, :, h * d:(h + 1) * d].double()
            p = torch.softmax(qh @ kh.T / math.sqrt(d), dim=-1)
            for w, pos in enumerate(groups):
                out[i, :, w] += p[:, list(pos)].sum(-1) / heads
    return out


def call(kind, level, branches=(0, 1), frames=FRAMES, lk=77, seed=0, block=("output", 4), c=HEADS * D):
    g = torch.Generator().manual_seed(seed)
    h, w = LATENT[0] >> level, LATENT[1] >> level
    rows = len(branches) * frames
    q = torch.randn(rows, h * w, c, generator=g)
    k = torch.randn(rows, lk if kind == "cross" else h * w, c, generator=g)
    extra = {"n_heads": HEADS, "activations_shape": [rows, c, h, w], "original_shape": [rows, 4, *LATENT],
             "block": block, "block_index": 0, "cond_or_uncond": list(branches)}
    return AttentionCall(kind, q, k, k.clone(), extra, BatchLayout(tuple(branches), frames))


WORDS = (("car", (2, 3)), ("woman", (6,)))


def spec(**kw):
    args = dict(words=WORDS, token_count=77, cross_levels={1}, self_level=1)
    args.update(kw)
    return CaptureSpec(**args)


def test_cross_probabilities_are_the_explicit_softmax():
    c = call("cross", 1)
    sel = torch.zeros(77, 2)
    sel[[2, 3], 0] = 1
    sel[6, 1] = 1
    got = cross_probabilities(c.q, c.k, HEADS, sel, chunk_bytes=1)   # one row at a time
    want = explicit_maps(c.q, c.k, HEADS, [(2, 3), (6,)])
    assert torch.allclose(got.double(), want, atol=1e-6)
    # all 77 keys sum to one: the probabilities are over all keys, not only the chosen ones
    full = cross_probabilities(c.q, c.k, HEADS, torch.eye(77))
    assert torch.allclose(full.sum(-1), torch.ones_like(full.sum(-1)), atol=1e-5)


def run_take(rec, calls, output):
    rec.begin()
    for c in calls:
        out = torch.randn(c.q.shape)
        rec.observe(c, out)
    rec.end(output)
    return rec.take_for(output)


def test_maps_average_the_positive_rows_over_calls_and_keep_only_the_asked_tokens():
    rec = AttentionRecorder(spec(self_level=None))
    a, b = call("cross", 1, seed=1), call("cross", 1, seed=2)
    take = run_take(rec, [a, b], torch.ones(2))
    maps = take.cross_maps()
    assert list(maps) == ["car", "woman"]
    cond = slice(0, FRAMES)  # branches (0, 1): the cond chunk first
    want = (explicit_maps(a.q[cond], a.k[cond], HEADS, [(2, 3), (6,)]) +
            explicit_maps(b.q[cond], b.k[cond], HEADS, [(2, 3), (6,)])) / 2
    assert maps["car"].shape == (FRAMES, 4, 4)
    assert torch.allclose(maps["car"].reshape(FRAMES, -1).double(), want[..., 0], atol=1e-6)
    assert torch.allclose(maps["woman"].reshape(FRAMES, -1).double(), want[..., 1], atol=1e-6)
    # what is kept: one [F, h*w, words] sum per grid, nothing per head or per key
    (s,) = take.cross.values()
    assert s.total.shape == (FRAMES, 16, 2) and s.total.device.type == "cpu"
    assert take.features == {}
    assert rec.get_ram_usage() == FRAMES * 16 * 2 * 4


def test_the_uncond_rows_and_other_grids_do_not_count():
    rec = AttentionRecorder(spec(self_level=None))
    a = call("cross", 1, branches=(1, 0), seed=3)          # uncond chunk first this time
    b = copy.copy(a)
    b.q = a.q.clone()
    b.q[:FRAMES] = torch.randn(FRAMES, *a.q.shape[1:])       # change the uncond rows only
    m1 = run_take(rec, [a], torch.zeros(1)).cross_maps()["car"]
    m2 = run_take(rec, [b, call("cross", 2, seed=4), call("cross", 0, seed=5)], torch.zeros(2)).cross_maps()["car"]
    assert torch.equal(m1, m2)
    only_uncond = call("cross", 1, branches=(1,), seed=6)
    rec.begin()
    rec.observe(only_uncond, only_uncond.q)
    rec.end(torch.zeros(3))
    with pytest.raises(ValueError, match="^capture: the run recorded no attention call"):
        rec.take_for(torch.zeros(3)).cross_maps()


def test_two_grids_are_upsampled_to_the_finer_and_averaged_by_calls():
    rec = AttentionRecorder(spec(cross_levels={1, 2}, self_level=None))
    fine, coarse = call("cross", 1, seed=7), call("cross", 2, seed=8)
    take = run_take(rec, [fine, coarse], torch.ones(3))
    got = take.cross_maps()["woman"]
    f = explicit_maps(fine.q[:FRAMES], fine.k[:FRAMES], HEADS, [(6,)])[..., 0].reshape(FRAMES, 1, 4, 4)
    c = explicit_maps(coarse.q[:FRAMES], coarse.k[:FRAMES], HEADS, [(6,)])[..., 0].reshape(FRAMES, 1, 2, 2)
    up = torch.nn.functional.interpolate(c.float(), size=(4, 4), mode="bilinear", align_corners=False).double()
    assert torch.allclose(got.double(), ((f + up) / 2)[:, 0], atol=1e-6)


def test_a_repeated_conditioning_counts_every_copy_of_the_word():
    """The host repeats a 77-token positive to batch it with a 154-token negative: the
    word's mass is split over both copies, and both are summed."""
    rec = AttentionRecorder(spec(self_level=None))
    c = call("cross", 1, lk=154, seed=9)
    got = run_take(rec, [c], torch.ones(4)).cross_maps()["woman"]
    want = explicit_maps(c.q[:FRAMES], c.k[:FRAMES], HEADS, [(6, 83)])[..., 0]
    assert torch.allclose(got.reshape(FRAMES, -1).double(), want, atol=1e-6)
    bad = call("cross", 1, lk=100, seed=10)
    with pytest.raises(ValueError, match=r"^capture: the sampler's conditioning has 100 text tokens"):
        run_take(rec, [bad], torch.ones(5)).cross_maps()


def test_self_features_are_step_means_of_the_decoder_layers_normalised_per_layer():
    rec = AttentionRecorder(spec(words=(), token_count=None, cross_levels=set(), self_level=1))
    calls = [call("self", 1, seed=s, block=blk) for s, blk in ((11, ("output", 4)), (12, ("output", 5)),
                                                               (13, ("input", 4)), (14, ("output", 5)))]
    rec.begin()
    outs = []
    for c in calls:
        out = torch.randn(c.q.shape)
        outs.append(out)
        rec.observe(c, out)
    rec.observe(call("self", 2, seed=15), torch.randn(2 * FRAMES, 4, HEADS * D))   # another grid: ignored
    rec.end(torch.ones(6))
    feats = rec.take_for(torch.ones(6)).self_features()
    assert feats.shape == (FRAMES, 4, 4, 2 * HEADS * D)        # two decoder layers, the encoder's left out
    norm = torch.nn.functional.normalize
    want4 = norm(outs[0][:FRAMES], dim=-1)
    want5 = norm((outs[1][:FRAMES] + outs[3][:FRAMES]) / 2, dim=-1)
    assert torch.allclose(feats.reshape(FRAMES, 16, -1), torch.cat([want4, want5], -1), atol=1e-6)


def test_takes_are_named_by_the_run_output():
    rec = AttentionRecorder(spec(self_level=None), max_takes=2)
    outs = [torch.full((2, 4, 1, 1), float(i)) for i in range(3)]
    maps = [run_take(rec, [call("cross", 1, seed=20 + i)], outs[i]).cross_maps()["car"] for i in range(3)]
    assert not torch.equal(maps[1], maps[2])
    assert torch.equal(rec.take_for(outs[2].double()).cross_maps()["car"], maps[2])  # as the node hands it on
    assert torch.equal(rec.take_for(outs[1]).cross_maps()["car"], maps[1])
    with pytest.raises(ValueError, match=r"^latent: none of the 2 run\(s\)"):
        rec.take_for(outs[0])          # the oldest was dropped (two kept)
    with pytest.raises(ValueError, match="^latent: no sampling run"):
        AttentionRecorder(spec()).take_for(outs[0])
    # an interrupted run leaves no take
    rec.begin()
    rec.observe(call("cross", 1, seed=30), None)
    rec.abort()
    assert len(rec.takes) == 2
    assert latent_digest(outs[1]) == latent_digest(outs[1].clone())


def test_recorder_follows_the_host_rules_for_model_options():
    rec = AttentionRecorder(spec())
    stage = CaptureStage(rec)
    options = {"transformer_options": {}}
    with_stage(options["transformer_options"], stage)
    copied = copy.deepcopy(options)
    (s,) = stages_of(copied["transformer_options"])
    assert s is stage and s.recorder is rec
    assert not hasattr(rec, "to") and not hasattr(stage, "to")
    before = rec.videograin_fingerprint()
    run_take(rec, [call("cross", 1)], torch.ones(1))
    assert rec.videograin_fingerprint() == before == stage.videograin_fingerprint()
    assert before != AttentionRecorder(spec(cross_levels={2})).videograin_fingerprint()
    assert records_unet(stages_of(copied["transformer_options"]))
    assert not records_unet(())


def test_capture_through_the_bare_runtime_changes_nothing():
    """The pack's bare runtime with a capture stage returns what the kernel returns, and
    the stage sees the call's q, k and output."""
    rec = AttentionRecorder(spec())
    seen = []

    def kernel(q, k, v, extra, *args, **kwargs):
        seen.append((q.shape, args, kwargs))
        return q * 2

    rt = StageRuntime(kernel)
    attn2 = rt.make_attn2(None)
    c = call("cross", 1, seed=40)
    extra = dict(c.extra_options)
    with_stage(extra, CaptureStage(rec))
    rec.begin()
    out = attn2(c.q, c.k, c.v, extra)
    rec.end(torch.ones(7))
    assert torch.equal(out, c.q * 2) and len(seen) == 1
    want = explicit_maps(c.q[:FRAMES], c.k[:FRAMES], HEADS, [(2, 3)])[..., 0]
    got = rec.take_for(torch.ones(7)).cross_maps()["car"]
    assert torch.allclose(got.reshape(FRAMES, -1).double(), want, atol=1e-6)
    assert attn2.videograin_runtime is rt and attn2.videograin_previous is None
    # arguments a later host passes beyond (q, k, v, extra_options) go on to the kernel
    seen.clear()
    assert torch.equal(attn2(c.q, c.k, c.v, extra, "positional", new_option=7), c.q * 2)
    assert seen == [(c.q.shape, ("positional",), {"new_option": 7})]


def test_spec_and_level_checks():
    assert parse_levels("1/2+1/4") == {1, 2} and parse_levels("off") == frozenset()
    with pytest.raises(ValueError, match="grid '1/3'"):
        parse_levels("1/3")
    with pytest.raises(ValueError, match="outside the prompt's 77 tokens"):
        CaptureSpec(words=(("x", (80,)),), token_count=77, cross_levels={1})
    with pytest.raises(ValueError, match="nothing to capture"):
        CaptureSpec()


def test_a_stacked_batch_records_its_last_sequence():
    """A chunk of [source F; target F] (two groups): the target (last) sequence is recorded
    by default, the source with group=0."""
    c = call("cross", 1, branches=(0,), frames=2 * FRAMES, seed=50)
    c.batch = BatchLayout((0,), FRAMES, groups=2)
    last = run_take(AttentionRecorder(spec(self_level=None)), [c], torch.ones(8)).cross_maps()["woman"]
    first = run_take(AttentionRecorder(spec(self_level=None, group=0)), [c], torch.ones(8)).cross_maps()["woman"]
    for got, rows in ((last, slice(FRAMES, 2 * FRAMES)), (first, slice(0, FRAMES))):
        want = explicit_maps(c.q[rows], c.k[rows], HEADS, [(6,)])[..., 0]
        assert torch.allclose(got.reshape(FRAMES, -1).double(), want, atol=1e-6)


def test_a_cross_attention_problem_does_not_hide_the_self_features():
    rec = AttentionRecorder(spec())
    take = run_take(rec, [call("cross", 1, lk=100, seed=60), call("self", 1, seed=61)], torch.ones(9))
    assert take.self_features().shape == (FRAMES, 4, 4, HEADS * D)
    with pytest.raises(ValueError, match="^capture: the sampler's conditioning has 100 text tokens"):
        take.cross_maps()
