"""Attention capture: a stage of the attention runtime that records, while a sampler runs,
- cross-attention maps: for each named group of text tokens (a word, a local prompt), the
  probability mass the queries of each frame put on those tokens, softmax(q k^T / sqrt(d))
  over ALL text keys, averaged over heads, summed over the group's tokens, averaged over
  the layers at the chosen token grids and over the steps;
- self-attention features for clustering: the self-attention output (before the layer's
  to_out) of the decoder layers at one chosen grid, per frame and token, averaged over
  the steps.
Only the positive (cond) branch is recorded, and of a chunk that stacks several frame
sequences only sequence `group` (default -1, the last: the only one of a plain edit, the
target of a stacked [source; target] batch).

What the stage sees: its `after` hook gets the output as the stages added before it left
it, and q / k as the `before` hooks left them. The cross-attention maps are the plain
softmax of q against k: a stage that changes probabilities inside its own kernel (the P2P
control's reweighting) is not reflected in them.

What is kept (no per-head maps, no full maps over all keys): per captured grid one
float32 sum [F, h*w, groups of tokens], per captured decoder layer one float32 sum
[F, h*w, channels]; e.g. 16 frames at 512x512 (64x64 latent) with self features at 1/2
(32x32, three 640-channel layers) hold 16*1024*1920*4 B = 120 MiB, cross maps at 1/2 and
1/4 for 4 words 0.3 MiB. The sums stay on the device the UNet runs on while it runs (no
copy and no device sync per layer call) and move to the CPU when the run ends.

Runs and takes. A recorder belongs to one capture node's model; every sampling run of
that model is a *take*: begun before its first step, finished with the run's output. A
reader names the take it wants by that output (the LATENT the sampler node returned), so
the maps always belong to the run that made the latent the reader was wired to, however
the host cached the nodes around it; a latent no finished take produced is an error, not
stale maps. The last `MAX_TAKES` finished takes are kept (one model feeding DDIM Invert
and Sample makes two).

The recorder is an object shared by reference, per HOST_MECHANICS section 3: copies of
the model options share it (`__deepcopy__` returns self), it has no `.to`, it reports its
memory (`get_ram_usage`) and says what identifies it for the inversion cache key
(`videograin_fingerprint`).
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..attention.runtime import AttentionCall, Stage, grid_level
from ..sampling.inversion_cache import tensor_digest

MAX_TAKES = 2
# Cross-attention probabilities are computed a few frames at a time: at most this many
# bytes of [frames, heads, queries, keys] float32 logits at once.
CROSS_CHUNK_BYTES = 64 << 20
LEVEL_NAMES = {0: "1/1", 1: "1/2", 2: "1/4", 3: "1/8"}


@dataclass(frozen=True)
class CaptureSpec:
    """What to capture.

    words: (name, token positions) pairs; positions index the tokens of the conditioning
        the sampler is given (77 per CLIP window, `token_count` in all). When the host
        repeats a shorter conditioning to batch it with a longer one, position p also
        covers p + token_count, p + 2 * token_count, ...
    cross_levels: token grids whose cross-attention is averaged, as halvings of the
        latent (0 = the latent's own grid, 1 = half of it, ...).
    self_level: the grid of the self-attention features (None: none captured).
    self_blocks: the UNet block kinds whose self-attention output is captured.
    group: which frame sequence of a stacked chunk is recorded (negative: from the end).
    """
    words: tuple[tuple[str, tuple[int, ...]], ...] = ()
    token_count: int | None = None
    cross_levels: frozenset = frozenset()
    self_level: int | None = None
    self_blocks: tuple[str, ...] = ("output",)
    group: int = -1

    def __post_init__(self):
        object.__setattr__(self, "cross_levels", frozenset(int(x) for x in self.cross_levels))
        names = [n for n, _ in self.words]
        if len(set(names)) != len(names):
            raise ValueError(f"words: each name once, got {names}")
        for name, pos in self.words:
            if not pos:
                raise ValueError(f"words: {name!r} has no tokens")
            if self.token_count is None or any(not 0 <= p < self.token_count for p in pos):
                raise ValueError(f"words: token positions of {name!r} {list(pos)} lie outside the prompt's "
                                 f"{self.token_count} tokens")
        if not (self.words and self.cross_levels) and self.self_level is None:
            raise ValueError("nothing to capture: give words (or a layout) with a cross-attention grid, or a "
                             "self-attention grid")

    @property
    def captures_cross(self) -> bool:
        return bool(self.words and self.cross_levels)

    def videograin_fingerprint(self) -> dict:
        return {"words": [[n, list(p)] for n, p in self.words], "token_count": self.token_count,
                "cross_levels": sorted(self.cross_levels), "self_level": self.self_level,
                "self_blocks": list(self.self_blocks), "group": self.group}


def cross_probabilities(q: torch.Tensor, k: torch.Tensor, heads: int, select: torch.Tensor,
                        chunk_bytes: int = CROSS_CHUNK_BYTES) -> torch.Tensor:
    """float32 [B, Lq, W]: softmax(q k^T / sqrt(d)) over all Lk keys, per head, averaged
    over the heads, times `select` [Lk, W] (column w sums the keys of group w).
    q [B, Lq, heads*d], k [B, Lk, heads*d]; a few rows at a time."""
    b, lq, c = q.shape
    lk = k.shape[1]
    d = c // heads
    per_row = heads * lq * lk * 4
    step = max(1, chunk_bytes // max(1, per_row))
    sel = select.to(q.device, torch.float32)
    out = []
    for i in range(0, b, step):
        qh = q[i:i + step].float().reshape(-1, lq, heads, d).transpose(1, 2)      # [b, H, Lq, d]
        kh = k[i:i + step].float().reshape(-1, lk, heads, d).transpose(1, 2)      # [b, H, Lk, d]
        p = torch.softmax(torch.matmul(qh, kh.transpose(-1, -2)) * (d ** -0.5), dim=-1)
        out.append(torch.matmul(p, sel).mean(dim=1))                             # [b, Lq, W]
    return torch.cat(out)


@dataclass
class _Sum:
    total: torch.Tensor
    count: int
    grid: tuple[int, int]


@dataclass
class Take:
    """One sampling run's record (see the module docstring)."""
    frames: int | None = None
    cross: dict = field(default_factory=dict)      # level -> _Sum [F, h*w, W]
    features: dict = field(default_factory=dict)   # (block, number, index) -> _Sum [F, h*w, C]
    problems: list = field(default_factory=list)   # why cross-attention calls were skipped
    output_digest: str | None = None
    word_names: tuple[str, ...] = ()
    self_level: int | None = None

    def nbytes(self) -> int:
        return sum(s.total.numel() * s.total.element_size() for d in (self.cross, self.features) for s in d.values())

    def _check(self, cross: bool) -> None:
        if cross and self.problems:
            raise ValueError(self.problems[0])
        if self.frames is None:
            raise ValueError("capture: the run recorded no attention call (the model's attention did not run "
                             "through the VideoGrain runtime, or no call had a positive branch)")

    def cross_maps(self) -> dict[str, torch.Tensor]:
        """name -> float32 [F, h, w] at the finest captured grid: the mean over every
        captured layer call (coarser grids upsampled bilinearly to it first)."""
        self._check(cross=True)
        if not self.cross:
            raise ValueError("capture: no cross-attention maps were captured (the capture node has no words or "
                             "layout, its cross_grid is off, or the UNet has no cross-attention at that grid)")
        finest = min(self.cross)  # the level with the fewest halvings
        h, w = self.cross[finest].grid
        acc, n = None, 0
        for level, s in sorted(self.cross.items()):
            gh, gw = s.grid
            m = s.total.reshape(self.frames, gh, gw, -1).permute(0, 3, 1, 2)      # [F, W, gh, gw]
            if (gh, gw) != (h, w):
                m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
            acc = m if acc is None else acc + m
            n += s.count
        mean = acc / n
        return {name: mean[:, i].contiguous() for i, name in enumerate(self.word_names)}

    def self_features(self) -> torch.Tensor:
        """float32 [F, h, w, D]: per captured layer the step-averaged output, each token's
        vector scaled to unit length (so every layer weighs the same), concatenated over the
        layers in UNet order."""
        self._check(cross=False)
        if not self.features:
            raise ValueError("capture: no self-attention features were captured (the capture node's self_grid is "
                             "off, or the UNet's decoder has no self-attention at that grid)")
        parts = []
        grid = None
        for key in sorted(self.features, key=_layer_order):
            s = self.features[key]
            grid = s.grid
            parts.append(F.normalize(s.total / s.count, dim=-1))
        x = torch.cat(parts, dim=-1)
        return x.reshape(self.frames, grid[0], grid[1], -1)


def _layer_order(key) -> tuple:
    order = {"input": 0, "middle": 1, "output": 2}
    return (order.get(key[0], 3), key[1], key[2])


class AttentionRecorder:
    """Collects takes for one capture (module docstring)."""

    def __init__(self, spec: CaptureSpec, max_takes: int = MAX_TAKES):
        self.spec = spec
        self._takes: collections.deque = collections.deque(maxlen=max_takes)
        self._current: Take | None = None
        self._select: dict = {}   # (Lk, device) -> selection matrix [Lk, W]
        self.runs_begun = 0

    # -------------------------------------------------------------- host protocol
    def __deepcopy__(self, memo):
        return self

    def videograin_fingerprint(self) -> dict:
        return {"attention_capture": self.spec.videograin_fingerprint()}

    def get_ram_usage(self) -> int:
        return sum(t.nbytes() for t in self._takes) + (self._current.nbytes() if self._current else 0)

    # -------------------------------------------------------------- runs
    def begin(self) -> None:
        """A sampling run starts: a new take (an unfinished earlier one is dropped)."""
        self._current = Take(word_names=tuple(n for n, _ in self.spec.words), self_level=self.spec.self_level)
        self.runs_begun += 1

    def abort(self) -> None:
        self._current = None

    def end(self, output: torch.Tensor) -> None:
        """The run finished with `output` (the sampler's result): the take is kept, its sums
        moved to the CPU, and named by the output's digest."""
        take, self._current = self._current, None
        if take is None:
            return
        for d in (take.cross, take.features):
            for s in d.values():
                s.total = s.total.to("cpu")
        take.output_digest = latent_digest(output)
        self._takes.append(take)

    @property
    def takes(self) -> tuple[Take, ...]:
        return tuple(self._takes)

    def take_for(self, samples: torch.Tensor) -> Take:
        """The latest finished take whose run returned `samples` (the sampler node's LATENT)."""
        digest = latent_digest(samples)
        for take in reversed(self._takes):
            if take.output_digest == digest:
                return take
        if not self._takes:
            why = ("no sampling run of the captured model has finished (the model from this capture node must be "
                   "the one the sampler ran; a DDIM Invert whose result came from its cache runs no UNet)")
        else:
            why = (f"none of the {len(self._takes)} run(s) this capture recorded returned it: wire the LATENT output "
                   f"of the sampler (DDIM Invert or Sample) that the capture node's model feeds, unchanged")
        raise ValueError(f"latent: {why}")

    # -------------------------------------------------------------- the stage's work
    def _rows(self, call: AttentionCall) -> slice | None:
        batch = call.batch
        group = self.spec.group if self.spec.group >= 0 else batch.groups + self.spec.group if batch else -1
        if batch is None or 0 not in batch.branches or not 0 <= group < batch.groups:
            return None
        chunk = batch.branches.index(0)
        start = chunk * batch.rows_per_chunk + group * batch.frames
        return slice(start, start + batch.frames)

    def observe(self, call: AttentionCall, out: torch.Tensor) -> None:
        take = self._current
        if take is None:
            return
        eo = call.extra_options
        level = grid_level(eo.get("activations_shape"), eo.get("original_shape"))
        if level is None:
            return
        spec = self.spec
        if call.kind == "cross":
            if not spec.captures_cross or level not in spec.cross_levels:
                return
        elif call.kind == "self":
            block = eo.get("block")
            if level != spec.self_level or not block or block[0] not in spec.self_blocks:
                return
        else:
            return
        rows = self._rows(call)
        if rows is None:
            return
        frames = call.batch.frames
        if take.frames is None:
            take.frames = frames
        elif take.frames != frames:
            return  # a call of another batch shape (e.g. a ControlNet's): not this clip's frames
        act = eo["activations_shape"]
        grid = (int(act[-2]), int(act[-1]))
        if grid[0] * grid[1] != call.q.shape[1]:
            return
        with torch.no_grad():
            if call.kind == "cross":
                self._add_cross(take, call, rows, level, grid)
            else:
                key = (str(eo["block"][0]), int(eo["block"][1]), int(eo.get("block_index", 0)))
                _accumulate(take.features, key, out[rows].float(), grid)

    def _add_cross(self, take: Take, call: AttentionCall, rows: slice, level: int, grid) -> None:
        k = call.k[rows]
        lk = k.shape[1]
        L = self.spec.token_count
        if lk % L:
            if not take.problems:
                take.problems.append(
                    f"capture: the sampler's conditioning has {lk} text tokens, not a multiple of the {L} tokens of "
                    f"the capture node's prompt: give that node's prompt the text of the conditioning this sampler "
                    f"gets")
            return
        key = (lk, str(k.device))
        select = self._select.get(key)
        if select is None:
            select = torch.zeros(lk, len(self.spec.words), dtype=torch.float32)
            for w, (_, positions) in enumerate(self.spec.words):
                for rep in range(lk // L):
                    select[[p + rep * L for p in positions], w] = 1.0
            select = self._select[key] = select.to(k.device)
        probs = cross_probabilities(call.q[rows], k, int(call.extra_options["n_heads"]), select)
        _accumulate(take.cross, level, probs, grid)


def _accumulate(table: dict, key, value: torch.Tensor, grid) -> None:
    s = table.get(key)
    if s is None:
        table[key] = _Sum(value.clone(), 1, grid)
    else:
        s.total += value.to(s.total.device)
        s.count += 1


def latent_digest(samples: torch.Tensor) -> str:
    """The identity of a sampler's result as its node hands it on (float32 on the CPU)."""
    return tensor_digest(samples.detach().to("cpu", torch.float32).contiguous(), sample=False)


class CaptureStage(Stage):
    """The runtime stage: hands each layer call's q, k and output to the recorder, changes
    nothing. `videograin_records_unet` tells nodes with a result cache (DDIM Invert) to run
    the UNet rather than load a result."""
    videograin_records_unet = True

    def __init__(self, recorder: AttentionRecorder):
        self.recorder = recorder

    def after(self, call: AttentionCall, out: torch.Tensor) -> torch.Tensor:
        self.recorder.observe(call, out)
        return out

    def videograin_fingerprint(self) -> dict:
        return self.recorder.videograin_fingerprint()


def records_unet(stages) -> bool:
    """True when a stage in `stages` needs the UNet to run (a capture)."""
    return any(getattr(s, "videograin_records_unet", False) for s in stages or ())


def parse_levels(text: str) -> frozenset:
    """"1/2+1/4" -> {1, 2}; "off" or "" -> {}."""
    text = (text or "").strip().lower()
    if text in ("", "off", "none"):
        return frozenset()
    by_name = {v: k for k, v in LEVEL_NAMES.items()}
    out = set()
    for part in text.split("+"):
        part = part.strip()
        if part not in by_name:
            raise ValueError(f"grid {part!r}: expected one of {', '.join(LEVEL_NAMES.values())} (joined by '+') or off")
        out.add(by_name[part])
    return frozenset(out)


__all__ = ["CaptureSpec", "AttentionRecorder", "CaptureStage", "Take", "cross_probabilities", "records_unet",
           "parse_levels", "latent_digest", "LEVEL_NAMES", "MAX_TAKES"]
