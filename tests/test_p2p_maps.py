"""Video-P2P control arithmetic (VIDEO_P2P.md sections 6 and 8) against plain loops written
here, in float64. No host."""
from __future__ import annotations

import itertools

import pytest
import torch

from videograin_core.p2p import maps

L = 7


def probs(*shape, seed=0, sharpness=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(*shape, L, generator=g, dtype=torch.float64) * sharpness, -1)


def loop_cross(src, tgt, mode, mapper, alphas, step_alpha, eq):
    """The rule token by token: edited[n] = sum_w src[w] M[w, n] (swap, then alphas against
    the target's own) or src[mapper[n]] / own (refine); times eq[n]; blended by step_alpha[n]."""
    out = torch.empty_like(tgt)
    for idx in itertools.product(*[range(s) for s in tgt.shape[:-1]]):
        for n in range(L):
            if mode == "swap":
                swapped = sum(float(src[idx + (w,)]) * float(mapper[w, n]) for w in range(L))
                e = alphas[n] * swapped + (1 - alphas[n]) * float(tgt[idx + (n,)])
            else:
                e = float(src[idx + (int(mapper[n]),)]) if alphas[n] else float(tgt[idx + (n,)])
            e *= eq[n]
            out[idx + (n,)] = step_alpha[n] * e + (1 - step_alpha[n]) * float(tgt[idx + (n,)])
    return out


def test_swap_against_loops():
    src, tgt = probs(2, 3, 4, seed=1), probs(2, 3, 4, seed=2)
    g = torch.Generator().manual_seed(3)
    mapper = torch.rand(L, L, generator=g, dtype=torch.float64) * (torch.rand(L, L, generator=g) > 0.6)
    alphas = torch.tensor([1, 1, 0, 1, 1, 1, 0], dtype=torch.float64)
    step = torch.tensor([1, 1, 1, 0, 1, 1, 1], dtype=torch.float64)
    eq = torch.tensor([1, 2, 1, 1, -1.5, 1, 3], dtype=torch.float64)
    got = maps.cross_control(src, tgt, mapper, alphas, "swap", step, eq)
    assert torch.allclose(got, loop_cross(src, tgt, "swap", mapper, alphas, step, eq), rtol=0, atol=1e-12)
    # without an equalizer: the same as factors of 1
    got1 = maps.cross_control(src, tgt, mapper, alphas, "swap", step)
    assert torch.allclose(got1, loop_cross(src, tgt, "swap", mapper, alphas, step, [1] * L), rtol=0, atol=1e-12)


def test_refine_against_loops():
    src, tgt = probs(3, 5, seed=4), probs(3, 5, seed=5)
    mapper = torch.tensor([0, 1, -1, 2, 3, 5, -1])
    alphas = (mapper >= 0).double()
    step = torch.tensor([1, 0, 1, 1, 1, 1, 1], dtype=torch.float64)
    eq = torch.tensor([1, 1, 2, 1, 1, 0.5, 1], dtype=torch.float64)
    got = maps.cross_control(src, tgt, mapper, alphas, "refine", step, eq)
    assert torch.allclose(got, loop_cross(src, tgt, "refine", mapper, alphas, step, eq), rtol=0, atol=1e-12)
    # a scalar step alpha blends every token alike
    got = maps.cross_control(src, tgt, mapper, alphas, "refine", 1.0)
    assert torch.allclose(got, loop_cross(src, tgt, "refine", mapper, alphas, [1] * L, [1] * L), rtol=0, atol=1e-12)


def test_reweight_only_inside_the_window_and_factor_one_is_nothing():
    src, tgt = probs(2, 3, seed=6), probs(2, 3, seed=7)
    mapper, alphas = torch.eye(L, dtype=torch.float64), torch.ones(L, dtype=torch.float64)
    eq = torch.full((L,), 4.0, dtype=torch.float64)
    # outside the window (step alpha 0) the target keeps its own maps, factors or not
    assert torch.equal(maps.cross_control(src, tgt, mapper, alphas, "swap", 0.0, eq), tgt)
    ones = torch.ones(L, dtype=torch.float64)
    assert torch.equal(maps.cross_control(src, tgt, mapper, alphas, "swap", 1.0, ones),
                       maps.cross_control(src, tgt, mapper, alphas, "swap", 1.0))
    # inside: the factor multiplies, with no renormalisation (rows now sum to 4)
    got = maps.cross_control(src, tgt, mapper, alphas, "swap", 1.0, eq)
    assert torch.allclose(got, 4 * src) and torch.allclose(got.sum(-1), torch.full(got.shape[:-1], 4.0, dtype=got.dtype))
    assert torch.equal(maps.reweight(tgt, ones), tgt)


def test_self_replace():
    s, t = probs(2, seed=8), probs(2, seed=9)
    assert maps.self_replace(s, t, True) is s and maps.self_replace(s, t, False) is t


def test_cross_alpha_table_against_loops():
    def loop(steps, window, word_windows):
        rows = steps + 1
        t = torch.zeros(rows, L, dtype=torch.float64)
        for r in range(rows):
            for n in range(L):
                w = window
                for toks, ww in word_windows:
                    if n in toks:
                        w = ww
                lo, hi = (0.0, w) if not isinstance(w, tuple) else w
                t[r, n] = 1.0 if int(lo * rows) <= r < int(hi * rows) else 0.0
        return t

    for steps, window, words in ((50, 0.2, ()), (50, 0.8, ()), (10, (0.1, 0.6), ()), (50, 0.2, (((2, 3), 0.6),)),
                                 (20, 0.2, (((1,), (0.5, 1.0)), ((4, 5), 0.0))), (50, 1.0, ()), (50, 0.0, ())):
        got = maps.cross_alpha_table(steps, L, window, words)
        assert torch.equal(got, loop(steps, window, words)), (steps, window, words)
    # the reference arithmetic: int(0.2 * 51) = 10 active rows, int(0.8 * 51) = 40
    assert maps.cross_alpha_table(50, L, 0.2)[:, 0].sum() == 10
    assert maps.cross_alpha_table(50, L, 0.8)[:, 0].sum() == 40
    with pytest.raises(ValueError, match="window"):
        maps.cross_alpha_table(50, L, (0.6, 0.2))


def test_self_window_and_blend_start():
    assert [s for s in range(50) if maps.self_window_active(s, 50, 0.5)] == list(range(25))
    assert [s for s in range(50) if maps.self_window_active(s, 50, 0.7)] == list(range(35))
    assert [s for s in range(10) if maps.self_window_active(s, 10, (0.2, 0.5))] == [2, 3, 4]
    assert [s for s in range(10) if maps.self_window_active(s, 10, 0.95)] == list(range(9))  # int(9.5), not int(10.45)
    assert [s for s in range(50) if maps.blend_active(s, 50)] == list(range(10, 50))
    assert [s for s in range(7) if maps.blend_active(s, 7)] == list(range(1, 7))   # int(1.4) = 1


# ---------------------------------------------------------------- local blend
def loop_word_mask(layers, tokens, size, threshold):
    f_count, _, h, w, _ = layers[0].shape
    H, W = size
    out = torch.zeros(f_count, H, W, dtype=torch.bool)
    for f in range(f_count):
        # sum over the word's tokens, mean over every head of every layer
        heads = [layer[f, hd] for layer in layers for hd in range(layer.shape[1])]
        m = [[sum(sum(float(hm[y, x, t]) for t in tokens) for hm in heads) / len(heads) for x in range(w)]
             for y in range(h)]
        # 3x3 max over the neighbours inside the grid
        pooled = [[max(m[yy][xx] for yy in range(max(0, y - 1), min(h, y + 2)) for xx in range(max(0, x - 1), min(w, x + 2)))
                   for x in range(w)] for y in range(h)]
        # nearest upsample, divide by the frame's maximum, threshold
        up = [[pooled[Y * h // H][X * w // W] for X in range(W)] for Y in range(H)]
        peak = max(max(r) for r in up)
        for Y in range(H):
            for X in range(W):
                out[f, Y, X] = peak > 0 and up[Y][X] / peak > threshold
    return out


def layer_maps(f, heads, h, w, seed):
    """Maps where each token attends to a blob somewhere in each frame (plus noise), so
    that the masks are neither empty nor full."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.arange(h, dtype=torch.float64)[:, None], torch.arange(w, dtype=torch.float64)[None, :]
    logits = torch.randn(f, heads, h, w, L, generator=g, dtype=torch.float64) * 0.5
    for fi in range(f):
        for t in range(L):
            cy, cx = float(torch.rand(1, generator=g)) * h, float(torch.rand(1, generator=g)) * w
            logits[fi, :, :, :, t] += 6 * torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / 4)
    return torch.softmax(logits, -1)


def test_word_mask_against_loops():
    layers = [layer_maps(2, 2, 8, 8, 10), layer_maps(2, 2, 8, 8, 11), layer_maps(2, 2, 8, 8, 12)]
    wide = [layer_maps(2, 2, 6, 8, 13), layer_maps(2, 2, 6, 8, 14)]
    for ls, tokens, size, thr in ((layers, (1, 3), (16, 16), 0.3), (layers, (2,), (32, 32), 0.3),
                                  (layers, (0, 4, 5), (8, 8), 0.6), (wide, (1,), (12, 24), 0.5)):
        got = maps.word_mask(ls, tokens, size, thr)
        want = loop_word_mask(ls, tokens, size, thr)
        assert got.dtype == torch.bool and got.shape == (2, *size)
        assert torch.equal(got, want), (tokens, size, thr)
        assert got.any() and not got.all()


def test_local_blend_mask_is_the_union_and_blend_formula():
    src = [layer_maps(2, 2, 8, 8, 20)]
    tgt = [layer_maps(2, 2, 8, 8, 21)]
    ms = maps.word_mask(src, (1,), (8, 8), 0.3)
    mt = maps.word_mask(tgt, (2, 3), (8, 8), 0.3)
    u = maps.local_blend_mask(src, tgt, (1,), (2, 3), (8, 8), 0.3)
    assert torch.equal(u, ms | mt) and (u & ~ms).any() and (u & ~mt).any()
    assert torch.equal(maps.local_blend_mask(src, tgt, (), (2, 3), (8, 8), 0.3), mt)
    # all-zero maps: no mask (no 0/0)
    zero = [torch.zeros(2, 2, 4, 4, L, dtype=torch.float64)]
    assert not maps.word_mask(zero, (1,), (8, 8), 0.3).any()
    # x_target <- x_source + mask * (x_target - x_source), the mask broadcast over channels
    g = torch.Generator().manual_seed(22)
    xs, xt = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    got = maps.local_blend(xs, xt, u)
    for f, c, y, x in itertools.product(range(2), range(4), range(8), range(8)):
        want = xt[f, c, y, x] if u[f, y, x] else xs[f, c, y, x]
        assert abs(float(got[f, c, y, x] - want)) <= 1e-12
