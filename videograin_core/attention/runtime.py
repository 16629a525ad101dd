"""The attention runtime: the one self-attention (attn1) and one cross-attention (attn2)
function per transformer layer that the pack registers with the host's attention-replace
patch points (METHOD.md sections 2, 3 and 7).

Host independent: the node hands in the host's attention function, the model's
sigma -> timestep map and the layout; this module reads only the plain values the host
puts in `extra_options` (cond_or_uncond, activations_shape, original_shape, sigmas,
sample_sigmas, n_heads) and the pack's own published batch layout, and never imports
ComfyUI.

A layer call is a small pipeline:
1. the batch layout: chunks x sequences x frames, as the pack published it for this UNet
   call (attention.batch_layout), never guessed from rows // chunks when published;
2. the `before` of each stage in `extra_options[STAGES_KEY]` (in order): a stage may
   replace the call's q, k or v (feature injection); then the stages' `around`, nested
   around the kernel, where a stage may compute rows itself (frame-attention variants,
   prompt-to-prompt control) and leave the others to the rest of the chain;
3. the kernel the step needs (the ST-Layout stage below): each sequence's frames regrouped
   into one sequence for full-frame attention, the modulated attention on modulated
   layers and steps, else the host's (or a chained foreign replace's) attention;
4. the `after` of each stage, in order, on the output before the layer's to_out
   (trajectory attention, capture).
Stages live in the model's transformer_options (per MODEL, so a node adding one clones
the model and never changes its input), so no stage needs a second replace per layer.
`StageRuntime` is that pipeline with the host's attention as the kernel (for a model the
ST-Layout Patch has not patched); `STLayoutRuntime` adds the ST-Layout kernel stage.

The ST-Layout stage
- Self-attention (attn1): with full-frame attention on, the batch [sequences*F, hw, C]
  is regrouped into [sequences, F*hw, C] so every query sees every frame's keys of its
  own sequence; on modulated layers and steps, the chunks of the chosen branch(es) get
  the modulated attention (positive pair = the two tokens share a region).
- Cross-attention (attn2): on modulated layers and steps, the positive (cond) chunks get
  the modulated attention (positive pair = pixel in region k, token in local prompt k's
  span); every other chunk goes to the host's (or the chained) attention untouched.

Everything that depends only on the run (masks at each token grid, region membership,
size terms, text-token membership: region_layout.RegionLayout; treg and the step window
per sigma) is computed once and cached.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..prompts.layout import Layout
from .batch_layout import PUBLISHED_KEY, BatchLayout, published
from .region_layout import SIZE_TERMS, RegionLayout, treg

log = logging.getLogger(__name__)

SELF_BRANCHES = {"uncond": (1,), "cond": (0,), "both": (0, 1)}

# Attention the host would run: fn(q, k, v, extra_options) -> [B, Lq, heads*d].
AttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, dict], torch.Tensor]


STAGES_KEY = "videograin_attention_stages"  # transformer_options: tuple of Stage objects


@dataclass
class AttentionCall:
    """One call of a patched attention layer, as the stages see it. q, k, v are the host's
    projections ([rows, tokens, heads*d]; for cross-attention k and v hold the text);
    a `before` stage may replace them."""
    kind: str                   # "self" (attn1) or "cross" (attn2)
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    extra_options: dict
    batch: BatchLayout | None   # None: not a batch the pack understands (leave it alone)


class Stage:
    """A part of the attention runtime added by a node (see the module docstring). Every
    hook defaults to doing nothing. Stage objects are shared by clones of the model's
    options (`__deepcopy__` returns self) and must hold no per-call state.

    - `before(call)`: may replace call.q / call.k / call.v before the kernel runs;
    - `around(call, next)`: computes the call's output; `next(call)` runs the rest of the
      chain (later stages' `around`, then the kernel). A stage that computes some rows
      itself (a frame-attention variant, prompt-to-prompt control) runs `next` on a call
      narrowed to the other rows, or on none, so no row is computed twice;
    - `after(call, out)`: may replace the output (before the layer's to_out)."""

    def before(self, call: AttentionCall) -> None:
        return None

    def around(self, call: AttentionCall, next: Callable[[AttentionCall], torch.Tensor]) -> torch.Tensor:
        return next(call)

    def after(self, call: AttentionCall, out: torch.Tensor) -> torch.Tensor:
        return out

    def __deepcopy__(self, memo):
        return self


def select_sequences(call: AttentionCall, sequences) -> AttentionCall:
    """The call narrowed to some of its sequences (indices chunk * groups + group, in
    order), for a stage's `around` that computes the other rows itself. Each kept sequence
    becomes a chunk of its own (groups 1) of its chunk's branch, with `cond_or_uncond`,
    `uuids` and the published layout narrowed to match, so the rest of the chain sees an
    ordinary batch: frames still regroup per sequence, branches stay as they were."""
    batch = call.batch
    if batch is None:
        raise ValueError("select_sequences: the call has no batch layout")
    seqs = [int(s) for s in sequences]
    frames, groups = batch.frames, batch.groups
    rows = torch.cat([torch.arange(s * frames, (s + 1) * frames) for s in seqs]).to(call.q.device)
    chunks = [s // groups for s in seqs]
    layout = BatchLayout(tuple(batch.branches[c] for c in chunks), frames, 1)
    extra = dict(call.extra_options)
    for name in ("cond_or_uncond", "uuids"):
        value = extra.get(name)
        if isinstance(value, (list, tuple)) and len(value) == batch.chunks:
            extra[name] = [value[c] for c in chunks]
    extra[PUBLISHED_KEY] = layout
    return dataclasses.replace(call, q=call.q[rows], k=call.k[rows], v=call.v[rows], extra_options=extra,
                               batch=layout)


def sequence_rows(batch: BatchLayout, sequences) -> torch.Tensor:
    """Row indices of the given sequences (chunk * groups + group), in order."""
    return torch.cat([torch.arange(s * batch.frames, (s + 1) * batch.frames) for s in sequences])


def stages_of(extra_options: dict) -> tuple:
    return tuple(extra_options.get(STAGES_KEY) or ())


def with_stage(transformer_options: dict, stage: Stage) -> None:
    """Append `stage` to a (cloned) model's transformer_options, keeping earlier stages."""
    transformer_options[STAGES_KEY] = stages_of(transformer_options) + (stage,)


@dataclass(frozen=True)
class PatchOptions:
    full_frame_attention: bool = True
    self_strength: float = 0.3
    cross_strength: float = 1.0
    end_percent: float = 0.3
    self_branch: str = "uncond"          # which CFG branch gets self-attention modulation
    size_term: str = "reference"         # self-attention size term: reference (F*F*h*w) or paper (F*h*w)
    modulate_full_resolution: bool = False  # also modulate the layers at the latent's own resolution

    def __post_init__(self):
        if self.self_branch not in SELF_BRANCHES:
            raise ValueError(f"self_branch must be one of {', '.join(SELF_BRANCHES)}, got {self.self_branch!r}")
        if self.size_term not in SIZE_TERMS:
            raise ValueError(f"size_term must be one of {', '.join(SIZE_TERMS)}, got {self.size_term!r}")
        if not 0.0 <= self.end_percent <= 1.0:
            raise ValueError(f"end_percent must be between 0 and 1, got {self.end_percent}")
        for name in ("self_strength", "cross_strength"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1 (1 pulls positive keys all the way to the "
                                 f"row maximum), got {getattr(self, name)}")


    def videograin_fingerprint(self) -> dict:
        """The inversion cache key's view of these options (the attention functions hold
        them): only full-frame attention can change an inversion, which never modulates;
        see STLayoutRuntime.videograin_fingerprint."""
        return {"full_frame_attention": bool(self.full_frame_attention)}

def _passing_on(fn: AttnFn, args: tuple, kwargs: dict) -> AttnFn:
    """fn, handed the arguments a host passed beyond (q, k, v, extra_options) on every call."""
    if not args and not kwargs:
        return fn
    return lambda q, k, v, extra_options: fn(q, k, v, extra_options, *args, **kwargs)


def grid_level(activations_shape, original_shape) -> int | None:
    """How many times the token grid was halved from the latent (0 = full resolution)."""
    if not activations_shape or not original_shape or len(activations_shape) < 4 or len(original_shape) < 4:
        return None
    h, H = activations_shape[-2], original_shape[-2]
    if h <= 0 or H <= 0:
        return None
    # Odd sizes halve with rounding up, so the ratio is near, not exactly, a power of two.
    return max(0, round(math.log2(H / h)))


class _Terms:
    """What one modulated layer call needs at one token grid, derived once per run from
    region_layout's GridLayout."""

    def __init__(self, g, options: PatchOptions):
        self.frame_regions = g.frame_regions                       # bool [F, hw, S]
        self.clip_regions = g.clip_regions                         # bool [F*hw, S]
        self.self_size_clip = g.self_size(options.size_term)       # [F*hw]
        # per-frame self-attention (full-frame attention off): the frame's own keys
        self.self_size_frame = g.frame_self_size(options.size_term)  # [F, hw]
        self.cross_size = g.cross_size                             # [F, hw]


class StageRuntime:
    """The per-layer pipeline (module docstring) with the host's own attention as the
    kernel: what a node that adds a stage installs on a model the ST-Layout Patch has not
    patched (e.g. attention capture while inverting a clip that has no layout yet). Calls
    go to the replace registered before it (another pack's), else the host's attention,
    with the same arguments: only the stages are added."""

    def __init__(self, host_attention: AttnFn):
        self.host_attention = host_attention
        self._warned_batch = False

    def videograin_fingerprint(self) -> dict:
        """The bare runtime changes no attention result: only its stages (fingerprinted
        through the transformer_options) can."""
        return {"stage_runtime": 1}

    # ------------------------------------------------------------ the pipeline
    def batch_of(self, q, extra_options) -> BatchLayout | None:
        """The call's batch layout: the one the pack published for this UNet call, else
        (callers outside the pack's wrapper) one chunk of frames per cond_or_uncond entry.
        None when the rows do not fit it (another wrapper reshaped the batch): not ours."""
        layout = published(extra_options)
        if layout is not None and layout.rows == q.shape[0]:
            return layout
        cu = extra_options.get("cond_or_uncond")
        layout = BatchLayout.from_call(q.shape[0], cu)
        if layout is None and cu and not self._warned_batch:
            self._warned_batch = True
            log.warning("VideoGrain: an attention call got a batch of %d for %d cond/uncond parts (something "
                        "else reshaped the batch): that call runs without full-frame attention or modulation",
                        q.shape[0], len(cu))
        return layout

    def _pipeline(self, kind: str, q, k, v, extra_options, kernel) -> torch.Tensor:
        """One layer call: the stages' `before` (in order), their `around` nested around the
        kernel (the first stage outermost), then their `after` (in order)."""
        stages = stages_of(extra_options)
        call = AttentionCall(kind, q, k, v, extra_options, self.batch_of(q, extra_options))
        for stage in stages:
            stage.before(call)
        run = kernel
        for stage in reversed(stages):
            run = functools.partial(stage.around, next=run)
        out = run(call)
        for stage in stages:
            out = stage.after(call, out)
        return out

    def make_attn1(self, previous: AttnFn | None) -> AttnFn:
        return self._bare("self", previous)

    def make_attn2(self, previous: AttnFn | None) -> AttnFn:
        return self._bare("cross", previous)

    def _bare(self, kind: str, previous: AttnFn | None) -> AttnFn:
        host_inner = previous or self.host_attention

        def attn(q, k, v, extra_options, *args, **kwargs):
            # arguments a host passes beyond (q, k, v, extra_options) go on to the kernel
            inner = _passing_on(host_inner, args, kwargs)
            return self._pipeline(kind, q, k, v, extra_options,
                                  lambda call: inner(call.q, call.k, call.v, call.extra_options))
        attn.videograin_runtime = self
        attn.videograin_previous = previous  # what a later runtime chains instead of this function
        return attn


class STLayoutRuntime(StageRuntime):
    """Shared by the attn1/attn2 functions of one patched model."""

    def __init__(self, layout: Layout, options: PatchOptions, host_attention: AttnFn,
                 timestep_fn: Callable[[torch.Tensor], torch.Tensor], layout_attention: Callable,
                 frames_attention: AttnFn | None = None):
        """host_attention runs what the host would run anyway (per-frame self-attention,
        cross-attention); frames_attention (default: host_attention) runs the unmodulated
        self-attention over all frames, which only this patch asks for: F times the keys,
        so it wants a kernel whose memory is linear in the key count."""
        if layout.spans is None:
            raise ValueError("layout: it has no token spans; pass it through VideoGrain Layout Conditioning first "
                             "and wire that node's layout output here")
        if not layout.regions:
            raise ValueError("layout: it has no regions; add at least one VideoGrain Local Prompt")
        self.layout = layout
        self.options = options
        self.host_attention = host_attention
        self.frames_attention = frames_attention or host_attention
        self.timestep_fn = timestep_fn
        self.layout_attention = layout_attention
        self._grids: dict = {}
        self._steps: dict = {}
        self._by_frames: dict = {}
        self._last_schedule = (object(), None)
        self._warned_batch = self._warned_bypass = False

    @classmethod
    def unmodulated(cls, host_attention: AttnFn, full_frame_attention: bool = True,
                    frames_attention: AttnFn | None = None) -> "STLayoutRuntime":
        """A runtime without a layout (a model the ST-Layout Patch did not prepare): the
        kernel is the host's attention, over all frames of each sequence when
        `full_frame_attention`; the stages run as on a patched model. Nothing is modulated."""
        rt = cls.__new__(cls)
        rt.layout = None
        rt.options = PatchOptions(full_frame_attention=bool(full_frame_attention), self_strength=0.0,
                                  cross_strength=0.0)
        rt.host_attention = host_attention
        rt.frames_attention = frames_attention or host_attention
        rt.timestep_fn = None
        rt.layout_attention = None
        rt._grids, rt._steps, rt._by_frames = {}, {}, {}
        rt._last_schedule = (object(), None)
        rt._warned_batch = rt._warned_bypass = False
        return rt

    def videograin_fingerprint(self) -> dict:
        """What an inversion through this patch depends on (the inversion cache key).

        The inversion turns modulation off (`videograin_disable_modulation`), so the
        layout, the local prompts and the strengths cannot change its result: only whether
        self-attention spans all frames does. A new edit of the same clip therefore reuses
        the cached inversion."""
        return {"st_layout_patch": 1, "full_frame_attention": bool(self.options.full_frame_attention)}

    # ------------------------------------------------------------ checks
    def check_latent(self, latent_shape) -> None:
        """Errors before sampling: mask size vs latent*8, mask frames vs latent batch."""
        if len(latent_shape) != 4:
            raise ValueError(f"latent: expected a 4-D image latent [frames, channels, h, w], got "
                             f"{tuple(latent_shape)}")
        frames, _, h, w = latent_shape
        mh, mw = self.layout.size
        if (mh, mw) != (h * 8, w * 8):
            raise ValueError(f"layout: the region masks are {mw}x{mh} but the latent is {w}x{h} (frames of "
                             f"{w * 8}x{h * 8}): give masks at the frames' size (Region Mask with the Video "
                             f"Loader's transform)")
        self.check_frames(frames)

    def check_frames(self, frames: int) -> None:
        fc = self.layout.frame_count
        if fc not in (1, frames):
            raise ValueError(f"layout: the region masks have {fc} frames but the video latent has {frames} frames: "
                             f"give one mask per frame (or a single mask for all frames)")

    def check_positive(self, token_count: int) -> None:
        """The positive as wired (before the sampler batches it) must be the conditioning
        the spans were computed in: anything concatenated to it would shift or repeat them."""
        L = self.layout.token_count
        if L and token_count != L:
            raise ValueError(f"positive: the positive conditioning has {token_count} tokens but the layout was "
                             f"encoded for {L}: wire VideoGrain Layout Conditioning's positive output (unaltered) as "
                             f"the positive, from the same prompt as the layout")

    # ------------------------------------------------------------ cached per-run terms
    def _regions(self, frames: int) -> RegionLayout:
        r = self._by_frames.get(frames)
        if r is None:
            self.check_frames(frames)
            r = self._by_frames[frames] = RegionLayout.from_layout(self.layout, frames)
        return r

    def grid(self, h: int, w: int, frames: int, device) -> _Terms:
        key = (h, w, frames, str(device))
        t = self._grids.get(key)
        if t is None:
            t = self._grids[key] = _Terms(self._regions(frames).grid(h, w, device), self.options)
        return t

    def text_regions(self, lk: int, device) -> torch.Tensor:
        """bool [Lk, S] membership of the text keys (region_layout: p % token_count)."""
        L = self.layout.token_count or lk
        if lk % L:
            raise ValueError(f"positive: cross-attention got {lk} text tokens, not a multiple of the {L} tokens "
                             f"the layout was encoded for: use VideoGrain Layout Conditioning's positive output "
                             f"unaltered as the positive conditioning")
        # The membership depends on the spans only, not on the frame count.
        return self._regions(self.layout.frame_count or 1).text_regions(lk, device)

    def step_weight(self, extra_options: dict) -> float:
        """treg(t) while the step is within end_percent of the schedule, else 0."""
        sigmas = extra_options.get("sigmas")
        if sigmas is None:
            return 0.0
        sigma = torch.as_tensor(sigmas).flatten()[0].float()
        schedule = extra_options.get("sample_sigmas")
        # The same sigma can sit at different step indices in different schedules, so the
        # cache key includes the schedule (converted once per schedule object, not per layer).
        if schedule is not self._last_schedule[0]:
            sched_key = None if schedule is None else tuple(torch.as_tensor(schedule).flatten().float().tolist())
            self._last_schedule = (schedule, sched_key)
        key = (float(sigma), self._last_schedule[1])
        w = self._steps.get(key)
        if w is not None:
            return w
        active = False
        if schedule is not None:
            sched = torch.as_tensor(schedule).flatten().float().cpu()
            steps = max(1, sched.numel() - 1)
            idx = int(torch.argmin((sched - sigma.cpu()).abs()))
            # The tolerance keeps float products honest: 0.28 * 50 is 14.000000000000002,
            # which would let a 15th step in.
            active = idx < self.options.end_percent * steps - 1e-9
        t = float(torch.as_tensor(self.timestep_fn(sigma.reshape(1))).flatten()[0])
        if schedule is None:
            # No schedule (a caller outside the host's samplers): judge by the timestep.
            active = t >= (1.0 - self.options.end_percent) * 1000.0 - 1e-6
        w = self._steps[key] = treg(t) if active else 0.0
        return w

    def layer_modulated(self, extra_options: dict) -> tuple[int, int] | None:
        """(h, w) of the token grid when this layer is one the method modulates."""
        act = extra_options.get("activations_shape")
        level = grid_level(act, extra_options.get("original_shape"))
        if level is None:
            return None
        if level in (1, 2, 3) or (level == 0 and self.options.modulate_full_resolution):
            return int(act[-2]), int(act[-1])
        return None

    # ------------------------------------------------------------ attention functions
    def _modulation_weight(self, extra_options) -> float:
        if extra_options.get("videograin_disable_modulation"):
            return 0.0
        return self.step_weight(extra_options)

    def make_attn1(self, previous: AttnFn | None) -> AttnFn:
        host_inner = previous or self.host_attention
        host_frames_inner = previous or self.frames_attention  # a chained replace stays the kernel

        def attn1(q, k, v, extra_options, *args, **kwargs):
            # arguments a host passes beyond (q, k, v, extra_options) go on to the kernels
            inner, frames_inner = _passing_on(host_inner, args, kwargs), _passing_on(host_frames_inner, args, kwargs)
            return self._pipeline("self", q, k, v, extra_options,
                                  lambda call: self.self_attention(call, inner, frames_inner, previous))
        attn1.videograin_runtime = self
        return attn1

    def make_attn2(self, previous: AttnFn | None) -> AttnFn:
        host_inner = previous or self.host_attention

        def attn2(q, k, v, extra_options, *args, **kwargs):
            inner = _passing_on(host_inner, args, kwargs)
            return self._pipeline("cross", q, k, v, extra_options,
                                  lambda call: self.cross_attention(call, inner, previous))
        attn2.videograin_runtime = self
        return attn2

    # ------------------------------------------------------------ the ST-Layout kernel stage
    def self_attention(self, call: "AttentionCall", inner: AttnFn, frames_inner: AttnFn,
                       previous: AttnFn | None) -> torch.Tensor:
        """attn1: all frames of each sequence as one, modulated on the chosen branch."""
        q, k, v, extra_options, batch = call.q, call.k, call.v, call.extra_options, call.batch
        if batch is None:
            return inner(q, k, v, extra_options)
        opts = self.options
        seqs, frames, groups = batch.sequences, batch.frames, batch.groups
        lq, c = q.shape[1], q.shape[2]
        heads = extra_options["n_heads"]
        grid = self.layer_modulated(extra_options) if opts.self_strength > 0 else None
        weight = self._modulation_weight(extra_options) if grid is not None else 0.0
        mod_seqs = ([i * groups + g for i, b in enumerate(batch.branches) if b in SELF_BRANCHES[opts.self_branch]
                     for g in range(groups)] if weight > 0 else [])
        if grid is not None and (grid[0] * grid[1] != lq or k.shape[1] != lq):
            # token counts that are not the grid (another patch changed q or the context): leave it
            mod_seqs = []

        all_frames = opts.full_frame_attention and frames > 1
        if all_frames:
            # sequence-major batch: rows s*F .. s*F+F-1 are one sequence's frames
            q2 = q.reshape(seqs, frames * lq, c)
            k2 = k.reshape(seqs, frames * k.shape[1], k.shape[2])
            v2 = v.reshape(seqs, frames * v.shape[1], v.shape[2])
            plain = frames_inner
        else:
            q2, k2, v2 = q, k, v
            plain = inner
        if not mod_seqs:
            # A chained replace gets the regrouped [sequences, F*hw, C] tensors: it stays the
            # attention kernel, full-frame attention is this patch's own doing.
            out = plain(q2, k2, v2, extra_options)
            return out.reshape(q.shape[0], lq, -1)

        terms = self.grid(grid[0], grid[1], frames, q.device)
        if all_frames:
            rows, rows_per_chunk = mod_seqs, groups  # a sequence's frames are one row
            qr = kr = terms.clip_regions
            cw = (opts.self_strength * weight) * terms.self_size_clip
        else:
            rows, rows_per_chunk = [s * frames + f for s in mod_seqs for f in range(frames)], batch.rows_per_chunk
            qr = kr = terms.frame_regions.repeat(len(mod_seqs), 1, 1)
            cw = ((opts.self_strength * weight) * terms.self_size_frame).repeat(len(mod_seqs), 1)
        self._note_bypass(previous)
        out = self._split_run(q2, k2, v2, rows, plain, extra_options,
                              lambda qq, kk, vv: self.layout_attention(qq, kk, vv, heads, qr, kr, cw),
                              rows_per_chunk=rows_per_chunk)
        return out.reshape(q.shape[0], lq, -1)

    def cross_attention(self, call: "AttentionCall", inner: AttnFn, previous: AttnFn | None) -> torch.Tensor:
        """attn2: the positive (cond) chunks modulated toward each region's own words."""
        q, k, v, extra_options, batch = call.q, call.k, call.v, call.extra_options, call.batch
        opts = self.options
        if opts.cross_strength <= 0:
            return inner(q, k, v, extra_options)
        grid = self.layer_modulated(extra_options)
        if batch is None or grid is None or grid[0] * grid[1] != q.shape[1]:
            return inner(q, k, v, extra_options)
        weight = self._modulation_weight(extra_options)
        cond_chunks = [i for i, b in enumerate(batch.branches) if b == 0]  # the positive is the cond branch
        if weight <= 0 or not cond_chunks:
            return inner(q, k, v, extra_options)
        heads = extra_options["n_heads"]
        frames, rpc = batch.frames, batch.rows_per_chunk
        terms = self.grid(grid[0], grid[1], frames, q.device)
        kr = self.text_regions(k.shape[1], q.device)
        qr = terms.frame_regions.repeat(len(cond_chunks) * batch.groups, 1, 1)
        cw = ((opts.cross_strength * weight) * terms.cross_size).repeat(len(cond_chunks) * batch.groups, 1)
        rows = [i * rpc + f for i in cond_chunks for f in range(rpc)]
        self._note_bypass(previous)
        return self._split_run(q, k, v, rows, inner, extra_options,
                               lambda qq, kk, vv: self.layout_attention(qq, kk, vv, heads, qr, kr, cw),
                               rows_per_chunk=rpc)

    def _note_bypass(self, previous: AttnFn | None) -> None:
        # Modulated rows run this patch's own attention: a replace set before it (another
        # pack's) cannot take part in them. Say so once rather than drop its effect silently.
        if previous is not None and not self._warned_bypass:
            self._warned_bypass = True
            log.warning("VideoGrain: another attention replace was set on this model before the ST-Layout Patch; "
                        "while the layout modulation is active (the first end_percent of the steps) the modulated "
                        "rows (self-attention: %s branch, cross-attention: cond) run VideoGrain's attention "
                        "without it; it still runs for the other rows and steps", self.options.self_branch)

    @staticmethod
    def _split_run(q, k, v, rows, inner, extra_options, modulated, rows_per_chunk):
        """Rows `rows` through `modulated`, the rest through `inner`, reassembled in order.
        Rows come in whole cond/uncond chunks of `rows_per_chunk`; `inner` is told which
        chunks it got (its `cond_or_uncond` and `uuids`), as a replace that splits by branch
        expects."""
        b = q.shape[0]
        if len(rows) == b:
            return modulated(q, k, v)
        idx = torch.tensor(rows, device=q.device)
        chosen = set(rows)
        rest_rows = [r for r in range(b) if r not in chosen]
        rest = torch.tensor(rest_rows, device=q.device)
        chunks = [r // rows_per_chunk for r in rest_rows[::rows_per_chunk]]
        narrowed = {name: [extra_options[name][c] for c in chunks] for name in ("cond_or_uncond", "uuids")
                    if isinstance(extra_options.get(name), (list, tuple))
                    and len(extra_options[name]) * rows_per_chunk == b}
        extra_options = {**extra_options, **narrowed}
        out_mod = modulated(q[idx], k[idx], v[idx])
        out_rest = inner(q[rest], k[rest], v[rest], extra_options)
        out = out_mod.new_empty((b,) + tuple(out_mod.shape[1:]))
        out[idx] = out_mod
        out[rest] = out_rest.to(out.dtype)
        return out


__all__ = ["PatchOptions", "StageRuntime", "STLayoutRuntime", "AttentionCall", "Stage", "STAGES_KEY", "with_stage",
           "select_sequences", "sequence_rows", "treg", "grid_level", "SELF_BRANCHES", "SIZE_TERMS"]
