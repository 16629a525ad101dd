"""Token alignment between a Video-P2P source prompt and its target prompt (VIDEO_P2P.md
section 7): which source token each target token's cross-attention map is taken from.

Pure functions over token id lists. The caller passes the tokenizer as a function
`tokenize(text) -> [start, ids..., end]` (the prompt's CLIP BPE ids with the start and
end markers, no padding); the node hands in the host CLIP's own tokenizer, the tests the
same SD1.5 vocabulary.

Positions are those of the encoded conditioning (`length` tokens, 77 for one CLIP
window): position 0 is the start marker, the prompt's tokens follow, then its end marker,
then padding up to `length`. Alignment covers the unpadded tokens; after the end markers
the padding positions are paired in step (the p-th padding position after the target's
end reads the p-th after the source's end). A target position that gets no source token
keeps its own map (alpha 0).

Every refusal is a ValueError that starts with the name of the input at fault
(`source_prompt`, `target_prompt`, `reweight`, `blend_words` or the caller's own name).
"""
from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

Tokenize = Callable[[str], Sequence[int]]

MAX_TOKENS = 77                  # one CLIP window, start and end markers included
EMBEDDING_PREFIX = "embedding:"  # the host's textual-inversion syntax
# An unescaped parenthesis opens or closes the host's weight syntax "(word:1.2)" / "(word)".
_WEIGHT_SYNTAX = re.compile(r"(?<!\\)[()]")


@dataclass(frozen=True)
class PromptTokens:
    """A prompt as P2P sees it: its token ids (markers included, unpadded) and, for each
    whitespace-separated word, the [start, end) positions of its tokens among them."""
    text: str
    ids: tuple[int, ...]
    words: tuple[str, ...]
    spans: tuple[tuple[int, int], ...]

    def __len__(self) -> int:
        return len(self.ids)


def check_prompt_text(text: str, name: str) -> None:
    """Refuse what P2P cannot align: an empty prompt, the host's weight syntax, embeddings."""
    if not (text or "").strip():
        raise ValueError(f"{name} is empty: P2P needs a prompt describing the video")
    if EMBEDDING_PREFIX in text:
        raise ValueError(f"{name}: textual-inversion embeddings ({EMBEDDING_PREFIX}...) cannot be used in a P2P "
                         f"prompt (their vectors have no token ids to align); write the words instead. "
                         f"Prompt: {text!r}")
    m = _WEIGHT_SYNTAX.search(text)
    if m is not None:
        raise ValueError(f"{name}: weight syntax such as \"(word:1.2)\" cannot be used in a P2P prompt (the "
                         f"parenthesis at character {m.start()}); use the reweight input to strengthen a word, or "
                         f"write \\( \\) for a literal parenthesis. Prompt: {text!r}")


def tokenize_prompt(text: str, tokenize: Tokenize, name: str, max_tokens: int = MAX_TOKENS) -> PromptTokens:
    """Tokenize a P2P prompt and find each word's tokens. Raises ValueError naming `name`
    for an empty prompt, weight syntax, embeddings, or more than `max_tokens` tokens."""
    check_prompt_text(text, name)
    ids = _ids(tokenize(text), name, text)
    if len(ids) > max_tokens:
        raise ValueError(f"{name} has {len(ids)} tokens with the start and end markers; P2P aligns one CLIP window "
                         f"of at most {max_tokens}: shorten the prompt. Prompt: {text!r}")
    words = tuple(text.split())
    spans, pos = [], 1
    for word in words:
        inner = _ids(tokenize(word), name, text)[1:-1]
        if not inner:
            raise ValueError(f"{name}: the word {word!r} gives no tokens; remove it. Prompt: {text!r}")
        if list(ids[pos:pos + len(inner)]) != inner:
            raise ValueError(f"{name}: the tokenizer reads the prompt differently from its words one by one (at "
                             f"{word!r}), so its words cannot be aligned; separate the words with spaces. "
                             f"Prompt: {text!r}")
        spans.append((pos, pos + len(inner)))
        pos += len(inner)
    if pos != len(ids) - 1:
        raise ValueError(f"{name}: the prompt's tokens do not match its words one by one; separate the words with "
                         f"spaces. Prompt: {text!r}")
    return PromptTokens(text, tuple(ids), words, tuple(spans))


def _ids(tokens: Sequence, name: str, text: str) -> list[int]:
    out = []
    for t in tokens:
        if isinstance(t, torch.Tensor) and (t.ndim > 0 or t.is_floating_point()):
            t = None  # a vector: a textual-inversion embedding
        try:
            out.append(operator.index(t) if not isinstance(t, bool) else None)
        except TypeError:
            out.append(None)
        if out[-1] is None:
            raise ValueError(f"{name}: the tokenizer returned an embedding vector instead of a token id; P2P "
                             f"prompts cannot hold embeddings. Prompt: {text!r}")
    if len(out) < 2:
        raise ValueError(f"{name}: the tokenizer returned {len(out)} tokens (expected the start and end markers "
                         f"around the prompt). Prompt: {text!r}")
    return out


def _check_length(length: int, *prompts: PromptTokens) -> None:
    for p in prompts:
        if len(p) > length:
            raise ValueError(f"conditioning of {length} tokens is shorter than the prompt {p.text!r} "
                             f"({len(p)} tokens)")


# ---------------------------------------------------------------- word swap
def replacement_mapper(source: PromptTokens, target: PromptTokens, length: int = MAX_TOKENS,
                       parity_bug: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The word-swap mapper M [length, length] (float64; M[w, n] = share of source token
    w's map in target token n's) and alphas [length] (1 where a target position reads
    the source, 0 where it keeps its own map).

    The prompts must have the same number of words. Unchanged words map token to token; a
    changed word with as many tokens maps token to token, else each of its source tokens
    maps to each of its target tokens with weight 1 / (target token count). Everything
    else, padding included, advances in step.

    parity_bug=True reproduces the reference implementation: after the last changed word
    it writes M[n, n] instead of M[w, n], so when a swapped word changes its token count
    every later target token reads the source token at its own position."""
    _check_length(length, source, target)
    if len(source.words) != len(target.words):
        raise ValueError(f"target_prompt: word swap needs the same number of words in both prompts (the source has "
                         f"{len(source.words)}, the target {len(target.words)}): swap word for word, or use refine "
                         f"to add words. Source: {source.text!r}, target: {target.text!r}")
    changed = [(source.spans[k], target.spans[k]) for k in range(len(source.words))
               if source.words[k] != target.words[k]]
    mapper = torch.zeros(length, length, dtype=torch.float64)
    i = j = c = 0
    while i < length and j < length:
        if c < len(changed) and changed[c][0][0] == i:
            (s0, s1), (t0, t1) = changed[c]
            if s1 - s0 == t1 - t0:
                for d in range(s1 - s0):
                    mapper[s0 + d, t0 + d] = 1.0
            else:
                mapper[s0:s1, t0:t1] = 1.0 / (t1 - t0)
            i, j, c = s1, t1, c + 1
        else:
            mapper[j if (parity_bug and c == len(changed)) else i, j] = 1.0
            i, j = i + 1, j + 1
    alphas = (mapper.sum(0) > 0).to(torch.float64)
    return mapper, alphas


# ---------------------------------------------------------------- refinement
def global_alignment(x: Sequence, y: Sequence) -> list[int]:
    """Needleman-Wunsch alignment of x (source) and y (target): match +1, mismatch -1,
    gap 0. For each element of y, the index of the x element it is aligned with, or -1
    when it is inserted. On ties the traceback prefers inserting a y element, then
    dropping an x element, then the diagonal."""
    nx, ny = len(x), len(y)
    score = [[0] * (ny + 1) for _ in range(nx + 1)]
    move = [[0] * (ny + 1) for _ in range(nx + 1)]  # 1 insert (left), 2 drop (up), 3 diagonal
    for j in range(1, ny + 1):
        move[0][j] = 1
    for i in range(1, nx + 1):
        move[i][0] = 2
        for j in range(1, ny + 1):
            left, up = score[i][j - 1], score[i - 1][j]
            diag = score[i - 1][j - 1] + (1 if x[i - 1] == y[j - 1] else -1)
            best = max(left, up, diag)
            score[i][j] = best
            move[i][j] = 1 if left == best else 2 if up == best else 3
    out = [-1] * ny
    i, j = nx, ny
    while i > 0 or j > 0:
        m = move[i][j]
        if m == 3:
            i, j = i - 1, j - 1
            out[j] = i
        elif m == 1:
            j -= 1
        else:
            i -= 1
    return out


def refinement_mapper(source: PromptTokens, target: PromptTokens,
                      length: int = MAX_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """The refine mapper: for each target position the source position whose map it takes
    (int64 [length], -1 = none) and alphas [length] (1 aligned, 0 keeps its own map).
    The unpadded token sequences are aligned globally (global_alignment); padding pairs in
    step after the end markers. Never refuses."""
    _check_length(length, source, target)
    mapper = torch.full((length,), -1, dtype=torch.int64)
    mapper[:len(target)] = torch.tensor(global_alignment(source.ids, target.ids), dtype=torch.int64)
    for n in range(len(target), length):
        w = len(source) + n - len(target)
        if w < length:
            mapper[n] = w
    alphas = (mapper >= 0).to(torch.float64)
    return mapper, alphas


# ---------------------------------------------------------------- words for reweighting and blending
def word_token_indices(prompt: PromptTokens, word: str, name: str, prompt_name: str) -> tuple[int, ...]:
    """Positions of the tokens of every occurrence of `word` as a whole word of the prompt
    (case-insensitive, as the tokenizer is). Raises ValueError naming `name` and the
    prompt when it is not one of the prompt's words."""
    w = (word or "").strip()
    if not w:
        raise ValueError(f"{name}: an empty word")
    if len(w.split()) > 1:
        raise ValueError(f"{name}: {w!r} is more than one word; words are matched one by one as whole words of "
                         f"the {prompt_name}, list each on its own")
    out = []
    for k, pw in enumerate(prompt.words):
        if pw.casefold() == w.casefold():
            out.extend(range(*prompt.spans[k]))
    if not out:
        raise ValueError(f"{name}: {w!r} is not a word of the {prompt_name} {prompt.text!r} (words are matched "
                         f"whole, separated by spaces: {', '.join(repr(x) for x in prompt.words)})")
    return tuple(out)


def parse_reweight(text: str) -> list[tuple[str, float]]:
    """'word: factor, word: factor' -> [(word, factor)]. Empty text: no reweighting."""
    out: list[tuple[str, float]] = []
    seen = set()
    for entry in (text or "").split(","):
        entry = entry.strip()
        if not entry:
            continue
        word, sep, factor = entry.rpartition(":")
        word = word.strip()
        if not sep or not word:
            raise ValueError(f"reweight: {entry!r} is not 'word: factor' (e.g. 'origami: 2, rabbit: 0.5')")
        try:
            value = float(factor)
        except ValueError:
            raise ValueError(f"reweight: the factor of {word!r} is {factor.strip()!r}, not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"reweight: the factor of {word!r} must be a finite number, got {factor.strip()!r}")
        if word.casefold() in seen:
            raise ValueError(f"reweight: {word!r} is listed twice; give each word one factor")
        seen.add(word.casefold())
        out.append((word, value))
    return out


def parse_words(text: str) -> list[str]:
    """Blend words: one or more whole words separated by spaces or commas."""
    return [w for w in re.split(r"[\s,]+", text or "") if w]


__all__ = ["Tokenize", "PromptTokens", "MAX_TOKENS", "check_prompt_text", "tokenize_prompt", "replacement_mapper",
           "global_alignment", "refinement_mapper", "word_token_indices", "parse_reweight", "parse_words"]
