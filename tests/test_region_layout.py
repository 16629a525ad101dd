"""Region layout at token grids, checked against straightforward loops."""
import pytest
import torch
import torch.nn.functional as F

from videograin_core.attention.region_layout import RegionLayout, masks_at_grid, treg


def random_masks(frames, regions, h, w, seed=0, dtype=torch.bool):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(frames, regions, h, w, generator=g) < 0.35       # overlapping, scattered
    if regions > 1:
        m[:, -1] = False                                            # one empty region
    return m if dtype == torch.bool else m.to(dtype)


def loop_grid(masks, h, w):
    """Reference: per-pixel loops over the nearest-resized masks."""
    small = F.interpolate(masks.float(), size=(h, w), mode="nearest") > 0.5
    f, s = small.shape[:2]
    hw = h * w
    clip = torch.zeros(f * hw, s, dtype=torch.bool)
    for fi in range(f):
        for y in range(h):
            for x in range(w):
                clip[fi * hw + y * w + x] = small[fi, :, y, x]
    share = lambda a, b: bool((a & b).any())
    same = torch.zeros(f, hw)
    every = torch.zeros(f * hw)
    # the official code's count: a key once per region it shares with the query
    same_per_region = torch.zeros(f, hw)
    every_per_region = torch.zeros(f * hw)
    for i in range(f * hw):
        for j in range(f * hw):
            shared = int((clip[i] & clip[j]).sum())
            every_per_region[i] += shared
            if i // hw == j // hw:
                same_per_region[i // hw, i % hw] += shared
            if share(clip[i], clip[j]):
                every[i] += 1
                if i // hw == j // hw:
                    same[i // hw, i % hw] += 1
    return clip, same, every, same_per_region, every_per_region


@pytest.mark.parametrize("frames,h,w", [(3, 5, 7), (1, 3, 4), (2, 8, 8), (2, 9, 13)])
def test_grid_membership_and_sizes_match_loops(frames, h, w):
    masks = random_masks(frames, 3, 72, 104, seed=h * w)
    layout = RegionLayout(masks)
    g = layout.grid(h, w)
    clip, same, every, same_per_region, every_per_region = loop_grid(masks, h, w)
    hw = h * w
    assert torch.equal(g.clip_regions, clip)
    assert torch.equal(g.frame_regions, clip.view(frames, hw, -1))
    assert torch.allclose(g.cross_size, 1 - same / hw)
    assert torch.allclose(g.self_size("paper"), 1 - every / (frames * hw))
    # the masks overlap, so the two counts differ somewhere: the reference term sums over regions
    assert bool((every_per_region != every).any())
    assert torch.allclose(g.self_size("reference"), 1 - every_per_region / (frames * frames * hw))
    assert torch.allclose(g.frame_self_size("paper"), 1 - same / hw)
    assert torch.allclose(g.frame_self_size("reference"), 1 - same_per_region / (hw * frames))
    # tokens in no region: nothing positive, size 1
    none = ~clip.any(1)
    assert torch.all(g.self_size("paper")[none] == 1)


def test_float_masks_and_frame_major_order():
    masks = torch.zeros(2, 2, 16, 16)
    masks[0, 0, :8] = 0.9          # frame 0: top half is region 0
    masks[1, 1, :, 8:] = 0.6       # frame 1: right half is region 1
    masks[1, 0, :, :] = 0.4        # below threshold: not inside
    g = RegionLayout(masks).grid(2, 2)
    expect = torch.tensor([[1, 0], [1, 0], [0, 0], [0, 0],      # frame 0, row-major
                           [0, 0], [0, 1], [0, 0], [0, 1]], dtype=torch.bool)
    assert torch.equal(g.clip_regions, expect)
    # cross size: frame 0, top pixels share with 2 of 4 pixels -> 1 - 2/4
    assert torch.allclose(g.cross_size[0], torch.tensor([0.5, 0.5, 1.0, 1.0]))


def test_overlapping_pixel_uses_union_of_its_regions():
    masks = torch.zeros(1, 2, 8, 8, dtype=torch.bool)
    masks[0, 0, :, :4] = True      # left half
    masks[0, 1, :, 3:5] = True     # a stripe overlapping the left half's last column
    g = RegionLayout(masks).grid(8, 8)
    x = 3                           # column 3 is in both regions
    idx = 0 * 8 + x
    union = (masks[0, 0] | masks[0, 1]).sum().item()
    assert g.frame_positive_counts[0, idx].item() == union
    assert torch.allclose(g.cross_size[0, idx], torch.tensor(1 - union / 64))


def test_grid_is_cached_and_odd_grids_follow_nearest():
    masks = random_masks(2, 2, 72, 104)
    layout = RegionLayout(masks)
    assert layout.grid(5, 7) is layout.grid(5, 7)
    assert layout.grid(3, 4) is not layout.grid(5, 7)
    small = masks_at_grid(masks, 5, 7)
    assert torch.equal(small, F.interpolate(masks.float(), size=(5, 7), mode="nearest") > 0.5)


def test_no_regions():
    g = RegionLayout(torch.zeros(2, 0, 16, 16)).grid(4, 4)
    assert g.clip_regions.shape == (32, 0)
    assert torch.all(g.self_size() == 1) and torch.all(g.cross_size == 1)


def test_text_regions_from_spans_with_repeated_conditioning():
    masks = random_masks(1, 3, 16, 16)
    layout = RegionLayout(masks, spans=[(2, 5), None, (4, 9)], token_count=77)
    for lk in (77, 154):
        t = layout.text_regions(lk)
        assert t.shape == (lk, 3)
        for p in range(lk):
            for r, span in enumerate([(2, 5), None, (4, 9)]):
                want = span is not None and span[0] <= p % 77 < span[1]
                assert bool(t[p, r]) == want
    assert layout.text_regions(154) is layout.text_regions(154)
    # before prompt encoding nothing is positive
    assert not RegionLayout(masks).text_regions(77).any()
    with pytest.raises(ValueError):
        RegionLayout(masks, spans=[(0, 1)])


def test_treg():
    assert treg(1) == 0
    assert abs(treg(981) - 0.98 ** 5) < 1e-12
    assert treg(961) < treg(981)
