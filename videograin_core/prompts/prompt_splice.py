"""Where each local prompt sits among the global prompt's tokens (METHOD.md section 4).

Pure token arithmetic: the caller tokenizes with the host's own tokenizer and hands in
token ids. The global prompt arrives as the tokenizer's windows (CLIP encodes at most 77
tokens at once, so a long prompt becomes several windows, each with its own start/end
markers and padding); the encoded conditioning is those windows concatenated, so a span
is given in positions of that concatenation.
"""
from __future__ import annotations

from typing import Hashable, Sequence

Span = tuple[int, int]
_PLACEMENT_BUDGET = 10_000  # choices tried before placement falls back to the greedy rule


class SpanError(ValueError):
    """A local prompt that cannot be placed in the global prompt (a user error)."""


def interior_tokens(windows: Sequence[Sequence[Hashable]], markers: set) -> list[tuple[Hashable, int]]:
    """(token, position in the concatenated windows) of every token that is not a start,
    end or padding marker."""
    out = []
    pos = 0
    for window in windows:
        for tok in window:
            if tok not in markers:
                out.append((tok, pos))
            pos += 1
    return out


def local_prompt_tokens(windows: Sequence[Sequence[Hashable]], markers: set) -> list[Hashable]:
    """A local prompt's own tokens without start/end markers or padding."""
    return [t for t, _ in interior_tokens(windows, markers)]


def _occurrences(global_windows, local, markers) -> tuple[list[Span], int | None]:
    """Every occurrence of `local` inside one window (in order), and where the first one
    that straddles a window boundary starts (None if none does)."""
    stream = interior_tokens(global_windows, markers)
    toks = [t for t, _ in stream]
    n = len(local)
    found, straddling = [], None
    for i in range(len(toks) - n + 1):
        if toks[i:i + n] == local:
            start, last = stream[i][1], stream[i + n - 1][1]
            if last - start == n - 1:
                found.append((start, start + n))
            elif straddling is None:
                straddling = start
    return found, straddling


def _overlaps(a: Span, b: Span) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def find_span(global_windows: Sequence[Sequence[Hashable]], local: Sequence[Hashable], markers: set,
              phrase: str = "", global_text: str = "") -> Span | None:
    """[start, end) of the first occurrence of `local` among the global prompt's tokens.

    Returns None for an empty local prompt (the region then has no text). Raises SpanError
    when the phrase is absent, or when its only occurrences straddle a window boundary
    (the two halves would be encoded in different CLIP windows, each with its own context,
    and the span would not be one contiguous run of conditioning positions).
    """
    local = list(local)
    if not local:
        return None
    found, straddling = _occurrences(global_windows, local, markers)
    if found:
        return found[0]
    if straddling is not None:
        raise SpanError(f"local prompt {phrase!r} crosses a 77-token window boundary of the global prompt "
                        f"(it starts at token {straddling}): CLIP encodes each window separately, so move the "
                        f"phrase or shorten the text before it. Global prompt: {global_text!r}")
    hint = ""
    if phrase.strip() and phrase.strip().lower() in global_text.lower():
        hint = (f" ('{phrase.strip()}' is there only inside a longer word, which the tokenizer reads as other "
                f"pieces: write it as a word of its own)")
    raise SpanError(f"local prompt {phrase!r} does not occur in the global prompt {global_text!r}: the global prompt "
                    f"must contain every local prompt word for word (case does not matter){hint}")


def place_spans(global_windows: Sequence[Sequence[Hashable]], locals_: Sequence[Sequence[Hashable]], markers: set,
                phrases: Sequence[str], global_text: str = "") -> list[Span | None]:
    """The span of every local prompt, each an occurrence no other local prompt holds when
    some choice allows it: so "a man in a red shirt and a man" gives "man in a red shirt"
    and "man" a span each (the first-occurrence rule alone would put "man" inside the
    other's words, and one splice would overwrite the other). Among such choices, earlier
    occurrences win, longer prompts choosing first. When no choice avoids an overlap, each
    prompt takes its first free occurrence, else its first one (overlapping_spans reports it)."""
    occurrences = []
    for local, phrase in zip(locals_, phrases):  # missing phrases are reported in region order
        found = _occurrences(global_windows, list(local), markers)[0] if local else []
        if local and not found:
            find_span(global_windows, local, markers, phrase=phrase, global_text=global_text)  # raises why
        occurrences.append(found)
    order = sorted((i for i in range(len(locals_)) if occurrences[i]), key=lambda i: -len(locals_[i]))
    spans: list[Span | None] = [None] * len(locals_)
    budget = [_PLACEMENT_BUDGET]

    def place(k: int) -> bool:  # depth-first, occurrences in order: the first disjoint choice
        if k == len(order):
            return True
        i = order[k]
        for span in occurrences[i]:
            budget[0] -= 1
            if budget[0] < 0:
                return False
            if not any(s is not None and _overlaps(span, s) for s in spans):
                spans[i] = span
                if place(k + 1):
                    return True
                spans[i] = None
        return False

    if not place(0):
        spans = [None] * len(locals_)
        for i in order:  # no disjoint choice (or too many to try): greedily, first free else first
            taken = [s for s in spans if s is not None]
            spans[i] = next((o for o in occurrences[i] if not any(_overlaps(o, t) for t in taken)),
                            occurrences[i][0])
    return spans


def overlapping_spans(spans: Sequence[Span | None]) -> list[tuple[int, int]]:
    """Index pairs of regions whose spans overlap (the later splice would overwrite the
    earlier one at the shared tokens)."""
    out = []
    for a in range(len(spans)):
        for b in range(a + 1, len(spans)):
            sa, sb = spans[a], spans[b]
            if sa is not None and sb is not None and _overlaps(sa, sb):
                out.append((a, b))
    return out


__all__ = ["Span", "SpanError", "interior_tokens", "local_prompt_tokens", "find_span", "place_spans",
           "overlapping_spans"]
