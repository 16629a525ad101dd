"""Warp-Err (videograin_core.metrics.warp_error) on clips whose answer is known by hand."""
import math

import pytest
import torch

from videograin_core.metrics.warp_error import backward_warp, consistency_mask, warp_error, warp_error_pairs

H, W = 8, 10


def still_flows(frames, h=H, w=W):
    z = torch.zeros(frames - 1, h, w, 2)
    return z, z.clone()


def test_identical_frames_give_zero():
    g = torch.Generator().manual_seed(0)
    frame = torch.rand(H, W, 3, generator=g)
    clip = frame.expand(4, H, W, 3)
    assert warp_error(clip, *still_flows(4)) == 0.0
    errs, counted = warp_error_pairs(clip, *still_flows(4))
    assert errs.tolist() == [0.0] * 3 and counted.tolist() == [H * W] * 3


@pytest.mark.parametrize("dx,dy", [(2, 0), (-1, 3), (0, 0), (3, -2)])
def test_translated_clip_with_its_exact_flow_gives_zero(dx, dy):
    """Frame t is a window of a larger random image, moved so the content travels by
    (dx, dy) px a frame: the exact flow maps every visible pixel onto itself."""
    g = torch.Generator().manual_seed(1)
    big = torch.rand(40, 40, 3, generator=g, dtype=torch.float64)
    frames = 4
    clip = torch.stack([big[10 - t * dy:10 - t * dy + H, 10 - t * dx:10 - t * dx + W] for t in range(frames)])
    fw = torch.tensor([float(dx), float(dy)]).expand(frames - 1, H, W, 2)
    errs, counted = warp_error_pairs(clip, fw, -fw)
    assert errs.abs().max() < 1e-12
    # counted: exactly the pixels whose source lies inside the previous frame
    assert counted.tolist() == [(H - abs(dy)) * (W - abs(dx))] * (frames - 1)
    # a wrong flow is not ~0: the metric does measure the misalignment
    if (dx, dy) != (0, 0):
        assert warp_error(clip, *still_flows(frames)) > 0.05


def test_changed_pixels_give_the_hand_computed_mean():
    g = torch.Generator().manual_seed(2)
    a = torch.rand(H, W, 3, generator=g, dtype=torch.float64) * 0.5
    b = a.clone()
    b[2:6, 3:8, 0] += 0.25          # 20 pixels, one channel, +0.25
    b[0, 0, :] += 0.1               # one pixel, three channels, +0.1
    clip = torch.stack([a, b, b])
    pair0 = (20 * 0.25 + 3 * 0.1) / (H * W * 3)
    errs, counted = warp_error_pairs(clip, *still_flows(3))
    assert errs[0].item() == pytest.approx(pair0, abs=1e-15) and errs[1].item() == 0.0
    assert warp_error(clip, *still_flows(3)) == pytest.approx(pair0 / 2, abs=1e-15)


def test_bilinear_sampling_and_sign_of_the_backward_flow():
    """A ramp moving half a pixel right: frame 1 at x holds frame 0 at x - 0.5, which
    bilinear sampling of a linear ramp gives exactly; column 0 samples outside."""
    x = torch.arange(W, dtype=torch.float64)
    f0 = (x / W)[None, :, None].expand(H, W, 3)
    f1 = ((x - 0.5) / W)[None, :, None].expand(H, W, 3)
    bw = torch.tensor([-0.5, 0.0]).expand(1, H, W, 2)
    warped, inside = backward_warp(f0, bw[0])
    assert torch.allclose(warped[:, 1:], f1[:, 1:], atol=1e-15)
    assert inside[:, 0].logical_not().all() and inside[:, 1:].all()
    errs, counted = warp_error_pairs(torch.stack([f0, f1]), -bw, bw)
    assert errs.item() < 1e-15 and counted.item() == H * (W - 1)


def test_forward_backward_check_threshold():
    """b = (-10, 0); f = (10 + e, 0): |e|^2 < 0.01 (|10 + e|^2 + 100) + 0.5 holds for
    e = 1.5 (2.25 < 2.8225) and fails for e = 1.8 (3.24 >= 2.8924)."""
    h, w = 8, 16
    bw = torch.tensor([-10.0, 0.0]).expand(h, w, 2)
    fw = torch.zeros(h, w, 2)
    fw[:4, :, 0] = 11.5
    fw[4:, :, 0] = 11.8
    mask = consistency_mask(fw, bw)
    want = torch.zeros(h, w, dtype=torch.bool)
    want[:4, 10:] = True            # x - 10 inside the frame, rows that pass
    assert torch.equal(mask, want)
    # consistent flows whose sample point leaves the frame by a fraction of a pixel:
    # column 0 is out even though zero padding would make the check pass there
    mask = consistency_mask(torch.tensor([0.2, 0.0]).expand(h, w, 2), torch.tensor([-0.2, 0.0]).expand(h, w, 2))
    assert not mask[:, 0].any() and mask[:, 1:].all()


def test_occluded_pixels_are_excluded():
    g = torch.Generator().manual_seed(3)
    a = torch.rand(H, W, 3, generator=g, dtype=torch.float64) * 0.5
    b = a.clone()
    b[:, :4] += 0.4                 # changed where the flows disagree (an "occlusion")
    b[6:, 6:] += 0.2                # and in a consistent part: 2 x 4 pixels, 3 channels
    fw, bw = still_flows(2)
    fw = fw.clone()
    fw[0, :, :4, 0] = 5.0           # forward says the left strip moved; backward says it did not
    errs, counted = warp_error_pairs(torch.stack([a, b]), fw, bw)
    kept = H * (W - 4)
    assert counted.item() == kept
    assert errs.item() == pytest.approx(8 * 3 * 0.2 / (kept * 3), abs=1e-15)
    # without the check the strip counts
    errs, counted = warp_error_pairs(torch.stack([a, b]), None, bw)
    assert counted.item() == H * W
    assert errs.item() == pytest.approx((H * 4 * 3 * 0.4 + 8 * 3 * 0.2) / (H * W * 3), abs=1e-15)


def test_degenerate_clips_and_shape_errors():
    one = torch.rand(1, H, W, 3)
    assert math.isnan(warp_error(one, torch.zeros(0, H, W, 2), torch.zeros(0, H, W, 2)))
    clip = torch.rand(2, H, W, 3)
    away = torch.full((1, H, W, 2), 100.0)     # every sample outside: nothing counted
    errs, counted = warp_error_pairs(clip, None, away)
    assert counted.item() == 0 and math.isnan(errs.item()) and math.isnan(warp_error(clip, None, away))
    with pytest.raises(ValueError, match="flows must be"):
        warp_error(clip, None, torch.zeros(2, H, W, 2))
    with pytest.raises(ValueError, match="forward"):
        warp_error(clip, torch.zeros(1, H, W + 1, 2), torch.zeros(1, H, W, 2))
