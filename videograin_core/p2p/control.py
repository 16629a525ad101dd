"""The P2P control object that travels on VIDEOGRAIN_P2P wires: everything a Video-P2P
edit decides from the two prompts before sampling (VIDEO_P2P.md sections 6-8).

Immutable and plain (tuples of numbers), so it can sit in a model's transformer_options
(shared by clones: `__deepcopy__` returns self) and be fingerprinted. It has no `.to`:
the host moves nothing of it; tensors are made on demand per device and dtype and kept.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields

import torch

from . import maps
from .tokens import (MAX_TOKENS, PromptTokens, Tokenize, parse_reweight, parse_words, refinement_mapper,
                     replacement_mapper, tokenize_prompt, word_token_indices)

BLEND_START = 0.2   # the local blend applies from step int(0.2 * steps) on


@dataclass(frozen=True)
class P2PControl:
    mode: str                                   # "swap" (word swap) or "refine"
    token_count: int                            # L: tokens of each conditioning (77: one CLIP window)
    source_tokens: int                          # the source prompt's tokens, markers included, unpadded
    target_tokens: int
    # swap: ((w, n, weight), ...) the nonzero entries of M [L, L]; refine: the source
    # position each target position reads (-1: none), one per target position
    mapper: tuple
    alphas: tuple[float, ...]                   # per target position: 1 reads the source, 0 keeps its own
    cross_window: tuple[float, float] = (0.0, 0.2)
    word_windows: tuple = ()                    # ((target token positions), (start, end)) overrides
    self_window: tuple[float, float] = (0.0, 0.5)
    equalizer: tuple[float, ...] = ()           # per target position reweight factor (() = none)
    reweights: tuple = ()                       # ((word, factor), ...) as given, for messages
    blend_source: tuple[int, ...] = ()          # source positions of the blend word(s)
    blend_target: tuple[int, ...] = ()          # target positions of the blend word(s)
    blend_threshold: float = 0.3
    blend_start: float = BLEND_START
    parity_bug: bool = False
    source_prompt: str = ""
    target_prompt: str = ""
    # digests of the encoded source / target conditionings (conditioning_digest), set by the
    # P2P Control node after encoding: a sampler checks its wired conditionings against them
    source_digest: str = ""
    target_digest: str = ""
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False,
                                  hash=False)

    def __post_init__(self):
        if self.mode not in maps.MODES:
            raise ValueError(f"mode must be one of {', '.join(maps.MODES)}, got {self.mode!r}")
        L = self.token_count
        if len(self.alphas) != L or (self.mode == "refine" and len(self.mapper) != L):
            raise ValueError(f"P2PControl: mapper/alphas do not cover the {L} tokens")
        if self.equalizer and len(self.equalizer) != L:
            raise ValueError(f"P2PControl: the equalizer does not cover the {L} tokens")
        maps.as_window(self.cross_window, "cross_replace")
        maps.as_window(self.self_window, "self_replace")
        for _, w in self.word_windows:
            maps.as_window(w, "word window")
        if not 0.0 <= self.blend_threshold <= 1.0:
            raise ValueError(f"blend_threshold must be between 0 and 1, got {self.blend_threshold}")

    def __deepcopy__(self, memo):
        return self

    @property
    def has_blend(self) -> bool:
        return bool(self.blend_source or self.blend_target)

    def videograin_fingerprint(self) -> dict:
        """Every field that decides the edit, as plain JSON values."""
        out = {"p2p_control": 1}
        for f in fields(self):
            if not f.name.startswith("_"):
                out[f.name] = _plain(getattr(self, f.name))
        return out

    # ------------------------------------------------------------ tensors (kept per device/dtype)
    def _tensor(self, key, make, device, dtype):
        k = (key, str(device), dtype)
        t = self._cache.get(k)
        if t is None:
            made = make().to(device=device, dtype=dtype)   # outside the lock: `make` may use the cache
            with self._lock:
                t = self._cache.setdefault(k, made)
        return t

    def mapper_tensor(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """swap: M [L, L] in `dtype`; refine: int64 [L] (source position per target position, -1 none)."""
        if self.mode == "refine":
            return self._tensor("mapper", lambda: torch.tensor(self.mapper, dtype=torch.int64), device, torch.int64)

        def dense():
            m = torch.zeros(self.token_count, self.token_count, dtype=torch.float64)
            for w, n, v in self.mapper:
                m[w, n] = v
            return m
        return self._tensor("mapper", dense, device, dtype)

    def alphas_tensor(self, device=None, dtype=torch.float32) -> torch.Tensor:
        return self._tensor("alphas", lambda: torch.tensor(self.alphas, dtype=torch.float64), device, dtype)

    def equalizer_tensor(self, device=None, dtype=torch.float32) -> torch.Tensor | None:
        if not self.equalizer:
            return None
        return self._tensor("equalizer", lambda: torch.tensor(self.equalizer, dtype=torch.float64), device, dtype)

    def cross_table(self, steps: int, device=None, dtype=torch.float32) -> torch.Tensor:
        """The cross alpha table [steps + 1, L] for a run of `steps` steps."""
        return self._tensor(("cross_table", int(steps)),
                            lambda: maps.cross_alpha_table(int(steps), self.token_count, self.cross_window,
                                                           self.word_windows), device, dtype)

    def cross_alpha(self, step: int, steps: int, device=None, dtype=torch.float32) -> torch.Tensor | None:
        """The step's row of the cross alpha table, or None when no token is controlled."""
        if not 0 <= step <= steps:
            return None
        active = self._tensor(("cross_active", int(steps)),
                              lambda: self.cross_table(steps, "cpu", torch.float64).amax(1) > 0, "cpu", torch.bool)
        if not bool(active[step]):
            return None
        return self.cross_table(steps, device, dtype)[step]

    def self_active(self, step: int, steps: int) -> bool:
        return maps.self_window_active(step, steps, self.self_window)

    def blend_active(self, step: int, steps: int) -> bool:
        return self.has_blend and maps.blend_active(step, steps, self.blend_start)

    def control_cross(self, source_probs: torch.Tensor, target_probs: torch.Tensor, step: int,
                      steps: int) -> torch.Tensor | None:
        """The target's controlled cross-attention probabilities at `step` of `steps`
        (None outside the cross window: the target keeps its own)."""
        dev, dt = target_probs.device, target_probs.dtype
        alpha = self.cross_alpha(step, steps, dev, dt)
        if alpha is None:
            return None
        return maps.cross_control(source_probs, target_probs, self.mapper_tensor(dev, dt),
                                  self.alphas_tensor(dev, dt), self.mode, alpha, self.equalizer_tensor(dev, dt))


def conditioning_digest(cross_attn: torch.Tensor) -> str:
    """sha256 of an encoded prompt (its cross_attn tensor: shape and float32 values)."""
    import hashlib
    t = cross_attn.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha256(repr(tuple(t.shape)).encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()


def _plain(v):
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    return v


MODE_NAMES = {"word swap": "swap", "swap": "swap", "refine": "refine"}


def build_control(source_prompt: str, target_prompt: str, tokenize: Tokenize, mode: str = "refine",
                  cross_replace=0.2, self_replace=0.5, reweight: str = "", blend_source_word: str = "",
                  blend_target_word: str = "", blend_threshold: float = 0.3, parity_bug: bool = False,
                  token_count: int = MAX_TOKENS, word_windows: dict | None = None,
                  blend_start: float = BLEND_START) -> P2PControl:
    """Check and align a P2P prompt pair. Every refusal is a ValueError naming its input:
    source_prompt / target_prompt (empty, weight syntax, embeddings, over 77 tokens, a word
    swap with unequal word counts), reweight (syntax, a word not in the target prompt),
    blend_source_word / blend_target_word (a word not in its prompt), cross_replace /
    self_replace / blend_threshold (out of 0..1). `word_windows` maps target words to their
    own cross windows (fraction or (start, end))."""
    m = MODE_NAMES.get(str(mode).strip().lower())
    if m is None:
        raise ValueError(f"mode must be 'word swap' or 'refine', got {mode!r}")
    cross = maps.as_window(cross_replace, "cross_replace")
    self_w = maps.as_window(self_replace, "self_replace")
    if not 0.0 <= float(blend_threshold) <= 1.0:
        raise ValueError(f"blend_threshold must be between 0 and 1, got {blend_threshold}")
    L = int(token_count)
    limit = min(MAX_TOKENS, L)
    src = tokenize_prompt(source_prompt, tokenize, "source_prompt", limit)
    tgt = tokenize_prompt(target_prompt, tokenize, "target_prompt", limit)
    if m == "swap":
        mapper_t, alphas_t = replacement_mapper(src, tgt, L, parity_bug=bool(parity_bug))
        nz = torch.nonzero(mapper_t).tolist()
        mapper = tuple((w, n, float(mapper_t[w, n])) for w, n in nz)
    else:
        mapper_t, alphas_t = refinement_mapper(src, tgt, L)
        mapper = tuple(int(x) for x in mapper_t.tolist())

    weights = parse_reweight(reweight)
    equalizer: tuple = ()
    if weights:
        eq = [1.0] * L
        for word, factor in weights:
            for p in word_token_indices(tgt, word, "reweight", "target_prompt"):
                eq[p] = float(factor)
        equalizer = tuple(eq)

    blend_src = _blend_tokens(src, blend_source_word, "blend_source_word", "source_prompt")
    blend_tgt = _blend_tokens(tgt, blend_target_word, "blend_target_word", "target_prompt")

    windows = tuple((word_token_indices(tgt, w, "word_windows", "target_prompt"), maps.as_window(v, f"window of {w!r}"))
                    for w, v in (word_windows or {}).items())
    return P2PControl(mode=m, token_count=L, source_tokens=len(src), target_tokens=len(tgt), mapper=mapper,
                      alphas=tuple(float(a) for a in alphas_t.tolist()), cross_window=cross, word_windows=windows,
                      self_window=self_w, equalizer=equalizer, reweights=tuple(weights), blend_source=blend_src,
                      blend_target=blend_tgt, blend_threshold=float(blend_threshold), blend_start=float(blend_start),
                      parity_bug=bool(parity_bug), source_prompt=src.text, target_prompt=tgt.text)


def _blend_tokens(prompt: PromptTokens, text: str, name: str, prompt_name: str) -> tuple[int, ...]:
    out: list[int] = []
    for w in parse_words(text):
        out.extend(p for p in word_token_indices(prompt, w, name, prompt_name) if p not in out)
    return tuple(out)


__all__ = ["P2PControl", "build_control", "conditioning_digest", "MODE_NAMES", "BLEND_START"]
