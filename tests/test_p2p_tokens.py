"""Video-P2P token alignment (VIDEO_P2P.md section 7) on the real SD1.5 vocabulary: the
tokenizer files the host ships (comfy/sd1_tokenizer) through transformers' CLIPTokenizer.
No host import; the expected mappings are written out from the spec."""
from __future__ import annotations

import os

import pytest
import torch
from vg_testlib import comfyui_path

from videograin_core.p2p import tokens as T

L = 77
S, E = 49406, 49407


@pytest.fixture(scope="module")
def tok():
    from transformers import CLIPTokenizer
    t = CLIPTokenizer.from_pretrained(os.path.join(comfyui_path(), "comfy", "sd1_tokenizer"))
    return lambda text: t(text)["input_ids"]


def P(tok, text, name="prompt"):
    return T.tokenize_prompt(text, tok, name)


def dense(entries, n=L):
    m = torch.zeros(n, n, dtype=torch.float64)
    for w, t, v in entries:
        m[w, t] = v
    return m


MAN = "a man is driving a motorbike in the forest"
SPIDER = "a Spider-Man is driving a motorbike in the forest"


# ---------------------------------------------------------------- prompts and words
def test_words_and_token_spans(tok):
    src, tgt = P(tok, MAN), P(tok, SPIDER)
    # S a man is driving a motorbike in the forest E  /  S a spider - man is ... E
    assert len(src) == 11 and len(tgt) == 13
    assert src.ids[0] == S and src.ids[-1] == E and tgt.ids[0] == S and tgt.ids[-1] == E
    assert src.spans == ((1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 7), (7, 8), (8, 9), (9, 10))
    assert tgt.spans[:3] == ((1, 2), (2, 5), (5, 6))
    assert tgt.words[1] == "Spider-Man" and tgt.ids[2:5] != src.ids[2:5]
    assert tgt.ids[4] == src.ids[2]  # "man" is the last of Spider-Man's three tokens


def test_refusals_name_the_input(tok):
    with pytest.raises(ValueError, match=r"^source_prompt has 82 tokens.*at most 77"):
        T.tokenize_prompt(" ".join(["a"] * 80), tok, "source_prompt")
    assert len(T.tokenize_prompt(" ".join(["a"] * 75), tok, "source_prompt")) == 77  # the limit itself is fine
    with pytest.raises(ValueError, match=r"^target_prompt has 78 tokens"):
        T.tokenize_prompt(" ".join(["a"] * 76), tok, "target_prompt")
    for text in ("a (man:1.2) is driving", "a (man) is driving", "a man) is driving"):
        with pytest.raises(ValueError, match=r"^target_prompt: weight syntax"):
            T.tokenize_prompt(text, tok, "target_prompt")
    with pytest.raises(ValueError, match=r"^target_prompt: textual-inversion embeddings"):
        T.tokenize_prompt("a embedding:spiderman is driving", tok, "target_prompt")
    with pytest.raises(ValueError, match=r"^source_prompt is empty"):
        T.tokenize_prompt("  ", tok, "source_prompt")
    # a tokenizer whose pieces cross the spaces: the words cannot be found among the tokens
    with pytest.raises(ValueError, match=r"^source_prompt: the tokenizer reads the prompt differently"):
        T.tokenize_prompt("a man", lambda t: [S, len(t), E], "source_prompt")
    # a tokenizer that hands back an embedding vector (the host does for embedding:...)
    with pytest.raises(ValueError, match=r"^source_prompt: the tokenizer returned an embedding"):
        T.tokenize_prompt("a man", lambda t: [S, torch.zeros(768), E], "source_prompt")


def test_word_lookup_is_whole_words(tok):
    tgt = P(tok, SPIDER)
    assert T.word_token_indices(tgt, "Spider-Man", "reweight", "target_prompt") == (2, 3, 4)
    assert T.word_token_indices(tgt, "spider-man", "reweight", "target_prompt") == (2, 3, 4)
    assert T.word_token_indices(tgt, "a", "reweight", "target_prompt") == (1, 7)  # every occurrence
    with pytest.raises(ValueError, match=r"^reweight: 'man' is not a word of the target_prompt 'a Spider-Man"):
        T.word_token_indices(tgt, "man", "reweight", "target_prompt")   # only a piece of a word
    with pytest.raises(ValueError, match=r"^blend_target_word: 'motor' is not a word of the target_prompt"):
        T.word_token_indices(tgt, "motor", "blend_target_word", "target_prompt")
    with pytest.raises(ValueError, match=r"^reweight: 'the forest' is more than one word"):
        T.word_token_indices(tgt, "the forest", "reweight", "target_prompt")


def test_parse_reweight():
    assert T.parse_reweight("") == []
    assert T.parse_reweight(" children: 5, drawing:2 ,") == [("children", 5.0), ("drawing", 2.0)]
    assert T.parse_reweight("crochet: -1.5") == [("crochet", -1.5)]
    for bad, msg in (("origami 2", "not 'word: factor'"), ("origami: two", "not a number"),
                     ("origami: inf", "finite"), ("a: 1, A: 2", "listed twice"), (": 2", "not 'word: factor'")):
        with pytest.raises(ValueError, match=rf"^reweight: .*{msg}"):
            T.parse_reweight(bad)


# ---------------------------------------------------------------- word swap
def _swap_expected(head, tail_src_start, tail_tgt_start, parity):
    """head: the entries up to the last changed word; then every later position in step
    (source i, target j advancing together until one reaches 77), or (j, j) with the bug."""
    entries = list(head)
    i, j = tail_src_start, tail_tgt_start
    while i < L and j < L:
        entries.append((j if parity else i, j, 1.0))
        i, j = i + 1, j + 1
    return dense(entries)


def test_man_to_spider_man(tok):
    src, tgt = P(tok, MAN), P(tok, SPIDER)
    head = [(0, 0, 1.0), (1, 1, 1.0), (2, 2, 1 / 3), (2, 3, 1 / 3), (2, 4, 1 / 3)]
    M, a = T.replacement_mapper(src, tgt)
    assert torch.equal(M, _swap_expected(head, 3, 5, parity=False))   # source 3.. -> target 5..
    assert torch.equal(a, torch.ones(L, dtype=torch.float64))
    # with the fix every later target token reads the same token of the source
    for n in range(5, 13):
        assert src.ids[int(M[:, n].argmax())] == tgt.ids[n]

    Mb, ab = T.replacement_mapper(src, tgt, parity_bug=True)
    assert torch.equal(Mb, _swap_expected(head, 3, 5, parity=True))   # (j, j) from target 5 on
    assert torch.equal(ab, torch.ones(L, dtype=torch.float64))
    assert tgt.ids[5] != src.ids[int(Mb[:, 5].argmax())]  # "is" reads the source's second "a"


def test_spider_man_to_man(tok):
    src, tgt = P(tok, SPIDER), P(tok, MAN)
    head = [(0, 0, 1.0), (1, 1, 1.0), (2, 2, 1.0), (3, 2, 1.0), (4, 2, 1.0)]  # 1 / (one target token)
    M, a = T.replacement_mapper(src, tgt)
    assert torch.equal(M, _swap_expected(head, 5, 3, parity=False))
    # the source runs out two positions early: the last two target paddings keep their own maps
    want_a = torch.ones(L, dtype=torch.float64)
    want_a[75:] = 0
    assert torch.equal(a, want_a)
    Mb, ab = T.replacement_mapper(src, tgt, parity_bug=True)
    assert torch.equal(Mb, _swap_expected(head, 5, 3, parity=True))
    assert torch.equal(ab, want_a)


def test_swap_with_two_changes_the_bug_starts_after_the_last(tok):
    # S a man and a cat E  ->  S a spider - man and a dog E
    src, tgt = P(tok, "a man and a cat"), P(tok, "a Spider-Man and a dog")
    head = [(0, 0, 1.0), (1, 1, 1.0), (2, 2, 1 / 3), (2, 3, 1 / 3), (2, 4, 1 / 3), (3, 5, 1.0), (4, 6, 1.0),
            (5, 7, 1.0)]   # and, a (in step, offset 2), then cat -> dog token to token
    assert torch.equal(T.replacement_mapper(src, tgt)[0], _swap_expected(head, 6, 8, parity=False))
    assert torch.equal(T.replacement_mapper(src, tgt, parity_bug=True)[0], _swap_expected(head, 6, 8, parity=True))


def test_swap_repeated_words_and_same_length_word(tok):
    # only the second "man" changes; "man" -> "woman" is one token each: token to token
    src, tgt = P(tok, "a man and a man"), P(tok, "a man and a woman")
    M, a = T.replacement_mapper(src, tgt)
    assert torch.equal(M, torch.eye(L, dtype=torch.float64))
    assert tgt.ids[5] != src.ids[5]
    # identical prompts: the identity, with or without the bug
    same = P(tok, MAN)
    for parity in (False, True):
        assert torch.equal(T.replacement_mapper(same, same, parity_bug=parity)[0], torch.eye(L, dtype=torch.float64))


def test_swap_refuses_unequal_word_counts(tok):
    with pytest.raises(ValueError, match=r"^target_prompt: word swap needs the same number of words.*source has 7, "
                                         r"the target 8"):
        T.replacement_mapper(P(tok, "a rabbit is jumping on the grass"), P(tok, "a origami rabbit is jumping on the grass"))


# ---------------------------------------------------------------- refinement
def _refine_expected(head, src_len, tgt_len):
    """`head`: the alignment of the unpadded tokens; padding in step after the end markers."""
    m = list(head) + [src_len + p if src_len + p < L else -1 for p in range(L - tgt_len)]
    return torch.tensor(m, dtype=torch.int64), torch.tensor([1.0 if x >= 0 else 0.0 for x in m], dtype=torch.float64)


@pytest.mark.parametrize("source,target,word", [
    ("a rabbit is jumping on the grass", "a origami rabbit is jumping on the grass", "origami"),
    ("a penguin is running on the ice", "a crochet penguin is running on the ice", "crochet"),
    ("a tiger is walking in the forest", "a Lego tiger is walking in the forest", "Lego"),
])
def test_refine_one_added_word(tok, source, target, word):
    # S a X is ... E  ->  S a W X is ... E: W (target position 2) is inserted, the rest aligned
    src, tgt = P(tok, source), P(tok, target)
    assert len(src) == 9 and len(tgt) == 10 and tgt.words[1] == word
    head = [0, 1, -1, 2, 3, 4, 5, 6, 7, 8]
    m, a = T.refinement_mapper(src, tgt)
    want_m, want_a = _refine_expected(head, 9, 10)
    assert torch.equal(m, want_m) and torch.equal(a, want_a)


def test_refine_bird_to_children_drawing(tok):
    # S a bird flying in the forest E  ->  S children drawing of a bird flying in the forest E
    src, tgt = P(tok, "a bird flying in the forest"), P(tok, "children drawing of a bird flying in the forest")
    head = [0, -1, -1, -1, 1, 2, 3, 4, 5, 6, 7]
    m, a = T.refinement_mapper(src, tgt)
    want_m, want_a = _refine_expected(head, 8, 11)
    assert torch.equal(m, want_m) and torch.equal(a, want_a)


def test_refine_a_changed_word_is_inserted_not_matched(tok):
    # mismatch (-1) never beats two gaps (0): "railway" keeps its own map, "road" is dropped
    src, tgt = P(tok, "a car is driving on the road"), P(tok, "a car is driving on the railway")
    m, a = T.refinement_mapper(src, tgt)
    want_m, want_a = _refine_expected([0, 1, 2, 3, 4, 5, 6, -1, 8], 9, 9)
    assert torch.equal(m, want_m) and torch.equal(a, want_a)


def test_refine_tie_breaks_on_repeated_words(tok):
    # S a cat E -> S a cat cat E: two alignments score the same; the traceback (from the end)
    # prefers inserting a target token, so the LATER "cat" is the inserted one
    m, _ = T.refinement_mapper(P(tok, "a cat"), P(tok, "a cat cat"))
    assert m[:5].tolist() == [0, 1, 2, -1, 3]
    # S a cat cat E -> S a cat E: dropping a source token beats the diagonal, so the target's
    # "cat" aligns with the FIRST source "cat"
    m, _ = T.refinement_mapper(P(tok, "a cat cat"), P(tok, "a cat"))
    assert m[:4].tolist() == [0, 1, 2, 4]
    # two words trade places: only one of them can stay aligned. Inserting a target token
    # wins the tie with dropping a source token, so "blue" (the earlier target word) stays
    # aligned and "red" is inserted (dropping first would keep "red" and insert "blue")
    m, _ = T.refinement_mapper(P(tok, "a red blue car"), P(tok, "a blue red car"))
    assert m[:6].tolist() == [0, 1, 3, -1, 4, 5]
    # the alignment itself, on plain sequences
    assert T.global_alignment("xaax", "xaaax") == [0, 1, 2, -1, 3]
    assert T.global_alignment("abc", "") == [] and T.global_alignment("", "ab") == [-1, -1]


def test_refine_shorter_target(tok):
    # the target drops a word; its padding pairs in step with the source's and runs to the end
    src, tgt = P(tok, "a origami rabbit is jumping"), P(tok, "a rabbit is jumping")
    m, a = T.refinement_mapper(src, tgt)
    want_m, want_a = _refine_expected([0, 1, 3, 4, 5, 6], 7, 6)
    assert torch.equal(m, want_m) and torch.equal(a, want_a)
    assert a.sum() == L - 1  # the last target padding has no source partner
