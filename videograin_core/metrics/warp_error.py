"""Warp-Err (METHOD.md section 11): how much an edited clip's frames disagree once the
SOURCE clip's motion is taken out.

For each pair (t, t+1), with the source's flows f_fw = flow t -> t+1 and f_bw = flow
t+1 -> t (pixels, as `trajectories.flow.clip_flows(source, backward=True)` returns):

    warped(p) = E_t(p + f_bw(p))                        backward warping, bilinear
    err_t     = mean over counted p and channels of |warped(p) - E_{t+1}(p)|
    Warp-Err  = mean of err_t over the pairs that count any pixel

E is the edited clip on [0, 1]. A pixel p of frame t+1 is counted when
- its sample point p + f_bw(p) lies inside frame t (pixel centres 0..W-1, 0..H-1; the
  bilinear sample then reads frame t only), and
- it passes the forward-backward check (the usual one, from occlusion-aware video style
  transfer): with b = f_bw(p) and f = f_fw(p + b) (bilinear),
      |f + b|^2 < alpha * (|f|^2 + |b|^2) + beta,   alpha = 0.01, beta = 0.5 px^2,
  i.e. going back and forth returns within ~0.7 px (more for fast motion): the point is
  visible in both frames. Occluded and disoccluded pixels fail it and are left out.
  Without a forward flow only the first condition applies.
The value is raw (mean absolute difference on [0, 1]); the paper reports x100.
Computed in float64, one pair at a time.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CONSISTENCY_ALPHA = 0.01
CONSISTENCY_BETA = 0.5


def backward_warp(image: torch.Tensor, flow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(warped [H, W, C], inside bool [H, W]): warped(p) = image(p + flow(p)), bilinear,
    for image [H, W, C] and flow [H, W, 2] (dx, dy in pixels). `inside`: the sample point
    is within the pixel centres of the image (elsewhere warped holds partial zeros)."""
    h, w = flow.shape[:2]
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64, device=flow.device),
                            torch.arange(w, dtype=torch.float64, device=flow.device), indexing="ij")
    x = xs + flow[..., 0].to(torch.float64)
    y = ys + flow[..., 1].to(torch.float64)
    inside = (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)
    # grid_sample's [-1, 1] with align_corners=True puts -1 and 1 on the first and last
    # pixel centres; a side of one pixel has only its centre (any value maps to it)
    gx = 2 * x / (w - 1) - 1 if w > 1 else torch.zeros_like(x)
    gy = 2 * y / (h - 1) - 1 if h > 1 else torch.zeros_like(y)
    src = image.to(torch.float64).permute(2, 0, 1)[None]
    warped = F.grid_sample(src, torch.stack([gx, gy], -1)[None], mode="bilinear",
                           padding_mode="zeros", align_corners=True)
    return warped[0].permute(1, 2, 0), inside


def consistency_mask(forward: torch.Tensor, backward: torch.Tensor, *, alpha: float = CONSISTENCY_ALPHA,
                     beta: float = CONSISTENCY_BETA) -> torch.Tensor:
    """bool [H, W] over frame t+1: the pixels whose backward flow (t+1 -> t) lands inside
    frame t and agrees with the forward flow (t -> t+1) there (module docstring)."""
    b = backward.to(torch.float64)
    f, inside = backward_warp(forward, b)          # f_fw(p + f_bw(p))
    err = (f + b).pow(2).sum(-1)
    bound = alpha * (f.pow(2).sum(-1) + b.pow(2).sum(-1)) + beta
    return inside & (err < bound)


def warp_error_pairs(edited: torch.Tensor, forward: torch.Tensor | None, backward: torch.Tensor, *,
                     alpha: float = CONSISTENCY_ALPHA,
                     beta: float = CONSISTENCY_BETA) -> tuple[torch.Tensor, torch.Tensor]:
    """(err float64 [F-1], counted int64 [F-1]): each pair's mean absolute difference over
    its counted pixels and the number of pixels counted (err is NaN where none is).
    edited [F, H, W, C] on [0, 1]; forward / backward [F-1, H, W, 2], the SOURCE's flows
    (forward None: no forward-backward check)."""
    edited = torch.as_tensor(edited)
    backward = torch.as_tensor(backward)
    n, h, w, c = edited.shape
    want = (n - 1, h, w, 2)
    if tuple(backward.shape) != want or (forward is not None and tuple(torch.as_tensor(forward).shape) != want):
        raise ValueError(f"flows must be {list(want)} for {n} edited frames of {h}x{w}, got backward "
                         f"{tuple(backward.shape)}" + ("" if forward is None else
                                                      f", forward {tuple(torch.as_tensor(forward).shape)}"))
    errs = torch.full((n - 1,), math.nan, dtype=torch.float64)
    counted = torch.zeros(n - 1, dtype=torch.long)
    for t in range(n - 1):
        bw = backward[t].to(edited.device)
        warped, keep = backward_warp(edited[t], bw)
        if forward is not None:
            fw = torch.as_tensor(forward[t]).to(edited.device)
            keep = keep & consistency_mask(fw, bw, alpha=alpha, beta=beta)
        diff = (warped - edited[t + 1].to(torch.float64)).abs().sum(-1)    # over channels
        k = int(keep.sum())
        counted[t] = k
        if k:
            errs[t] = diff[keep].sum() / (k * c)
    return errs, counted


def warp_error(edited: torch.Tensor, forward: torch.Tensor | None, backward: torch.Tensor, *,
               alpha: float = CONSISTENCY_ALPHA, beta: float = CONSISTENCY_BETA) -> float:
    """Warp-Err of an edited clip [F, H, W, C] on [0, 1] under the source's flows (module
    docstring): the mean of the per-pair errors over the pairs with counted pixels; NaN
    when no pair has any (e.g. one frame). Raw, not x100."""
    errs, counted = warp_error_pairs(edited, forward, backward, alpha=alpha, beta=beta)
    used = errs[counted > 0]
    return float(used.mean()) if used.numel() else math.nan
