"""Prompt splicing (METHOD.md section 4): token spans found with the host's own tokenizer,
each local prompt's own embeddings spliced in at its span, through the host's CLIP."""
from __future__ import annotations


import pytest
import torch
from vg_testlib import pack_modules, warnings_logged


@pytest.fixture(scope="module")
def pack(comfy_host):
    return pack_modules(comfy_host, splice="videograin_core.prompts.prompt_splice", layout="videograin_core.prompts.layout")


@pytest.fixture(scope="module")
def clip(comfy_host, test_models):
    import comfy.sd
    _, clip, _, _ = comfy.sd.load_checkpoint_guess_config(test_models.small, output_vae=False, output_clipvision=False)
    return clip


def _node(comfy_host, node_id):
    return comfy_host.nodes.NODE_CLASS_MAPPINGS[node_id]


def _ids(clip, text):
    return [[t[0] for t in w] for w in clip.tokenize(text)["l"]]


START, END = 49406, 49407  # CLIP-L's start and end/padding tokens
MARKERS = {START, END}


def _layout(pack, prompts, size=(16, 16), frames=1):
    lay = pack.layout.Layout()
    for i, p in enumerate(prompts):
        m = torch.zeros(frames, *size)
        m[:, :, i::len(prompts)] = 1
        lay = lay.add(m, p)
    return lay


def _encode(comfy_host, clip, text, layout):
    out = _node(comfy_host, "VideoGrainLayoutConditioning").execute(clip=clip, global_prompt=text, layout=layout)
    return out.args if hasattr(out, "args") else out.result


# ---------------------------------------------------------------- pure span search
def test_span_against_hand_checked_tokens(pack, clip):
    # "a red car and a woman": [START, a, red, car, and, a, woman, END, pad...]
    g = _ids(clip, "a red car and a woman")
    assert g[0][:8] == [START, 320, 736, 1615, 537, 320, 2308, END]
    find = pack.splice.find_span
    assert find(g, [736, 1615], MARKERS) == (2, 4)          # "red car"
    assert find(g, [320], MARKERS) == (1, 2)                 # first occurrence of "a"
    assert find(g, [], MARKERS) is None                      # empty local prompt
    # "batwoman" is [bat, woman]: the piece "woman" counts
    assert find(_ids(clip, "a batwoman"), [2308], MARKERS) == (3, 4)
    with pytest.raises(pack.splice.SpanError, match="'blue bird'.*does not occur.*'a red car'"):
        find(_ids(clip, "a red car"), [1746, 3329], MARKERS, phrase="blue bird", global_text="a red car")


def test_span_beyond_77_tokens_and_across_a_window(pack, clip):
    find = pack.splice.find_span
    g = _ids(clip, " ".join(["word"] * 80) + " red car")
    assert len(g) == 2 and all(len(w) == 77 for w in g)
    # window 1 = START + 75 x word + END; window 2 = START + 5 x word + red car ...
    assert find(g, [736, 1615], MARKERS) == (77 + 1 + 5, 77 + 1 + 7)
    g = _ids(clip, " ".join(["word"] * 74) + " red car")
    assert g[0][75] == 736 and g[1][1] == 1615  # the phrase straddles the two windows
    with pytest.raises(pack.splice.SpanError, match="crosses a 77-token window"):
        find(g, [736, 1615], MARKERS, phrase="red car")


def test_each_local_prompt_takes_an_occurrence_of_its_own(pack, clip):
    place = pack.splice.place_spans

    def spans(text, phrases):
        locals_ = [[t for w in _ids(clip, p) for t in w if t not in MARKERS] for p in phrases]
        return place(_ids(clip, text), locals_, MARKERS, phrases, text)
    # [START, a, man, in, a, red, shirt, and, a, man]: the first-occurrence rule alone would
    # put "man" at 2, inside the other prompt's words
    assert spans("a man in a red shirt and a man", ["man", "man in a red shirt"]) == [(9, 10), (2, 7)]
    assert spans("a man and a man", ["man", "man"]) == [(2, 3), (5, 6)]       # two instances, a word each
    assert spans("a man and a woman", ["woman", "man"]) == [(5, 6), (2, 3)]   # no overlap: first occurrences
    # greedy placement would give "red hat" (2, 4) and leave "hat and" only an overlap
    assert spans("a red hat and a red hat", ["red hat", "hat and"]) == [(6, 8), (3, 5)]
    # no free occurrence: the first one, reported as an overlap
    nested = spans("a man wearing sunglasses", ["man wearing sunglasses", "sunglasses"])
    assert nested == [(2, 5), (4, 5)] and pack.splice.overlapping_spans(nested) == [(0, 1)]
    # missing phrases are reported in region order
    with pytest.raises(pack.splice.SpanError, match="'cat'"):
        spans("a man", ["cat", "a blue bird in the sky"])


def test_a_phrase_inside_a_longer_word_gets_a_hint(pack, clip):
    assert len([t for t in _ids(clip, "spiderman")[0] if t not in MARKERS]) == 1  # one token: no "man" piece
    with pytest.raises(pack.splice.SpanError, match=r"does not occur .*'man' is there only inside a longer word"):
        pack.splice.find_span(_ids(clip, "a Spiderman"), _ids(clip, "man")[0][1:2], MARKERS, phrase="man",
                              global_text="a Spiderman")


# ---------------------------------------------------------------- splicing through the host CLIP
def test_spliced_embeddings(comfy_host, pack, clip):
    text = "a Red Car and a batwoman on the road"
    lay = _layout(pack, ["red car", "woman", ""])
    (cond, extra), = _encode(comfy_host, clip, text, lay)[0]
    layout = _encode(comfy_host, clip, text, lay)[1]
    assert layout.spans == ((2, 4), (7, 8), None)
    assert layout.token_count == 77
    g_cond, g_pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    red = clip.encode_from_tokens(clip.tokenize("red car"))
    woman = clip.encode_from_tokens(clip.tokenize("woman"))
    assert cond.shape == g_cond.shape == (1, 77, 768)
    assert torch.equal(cond[0, 2:4], red[0, 1:3])
    assert torch.equal(cond[0, 7:8], woman[0, 1:2])
    keep = torch.ones(77, dtype=torch.bool)
    keep[2:4] = False
    keep[7:8] = False
    assert torch.equal(cond[0, keep], g_cond[0, keep])
    assert not torch.equal(cond[0, 2:4], g_cond[0, 2:4])  # contextual embeddings differ: the splice did something
    assert torch.equal(extra["pooled_output"], g_pooled)   # the global prompt's pooled output is kept


def test_clip_set_last_layer_is_honoured(comfy_host, pack, clip):
    text = "a red car on the road"
    lay = _layout(pack, ["red car"])
    (c_last, _), = _encode(comfy_host, clip, text, lay)[0]
    clip2 = _node(comfy_host, "CLIPSetLastLayer")().set_last_layer(clip, -2)[0]
    (c_pen, _), = _encode(comfy_host, clip2, text, lay)[0]
    g2 = clip2.encode_from_tokens(clip2.tokenize(text))
    r2 = clip2.encode_from_tokens(clip2.tokenize("red car"))
    assert torch.equal(c_pen[0, 2:4], r2[0, 1:3])
    assert torch.equal(c_pen[0, 4:], g2[0, 4:])
    assert not torch.equal(c_pen, c_last)


def test_long_prompt_is_spliced_in_its_window(comfy_host, pack, clip):
    text = " ".join(["word"] * 80) + " red car"
    (cond, _), = _encode(comfy_host, clip, text, _layout(pack, ["red car"]))[0]
    layout = _encode(comfy_host, clip, text, _layout(pack, ["red car"]))[1]
    assert cond.shape == (1, 154, 768) and layout.token_count == 154
    assert layout.spans == ((83, 85),)
    red = clip.encode_from_tokens(clip.tokenize("red car"))
    g = clip.encode_from_tokens(clip.tokenize(text))
    assert torch.equal(cond[0, 83:85], red[0, 1:3])
    assert torch.equal(cond[0, :83], g[0, :83]) and torch.equal(cond[0, 85:], g[0, 85:])


def test_shared_words_are_spliced_in_region_order_and_logged(comfy_host, pack, clip):
    with warnings_logged(comfy_host.pack.__name__ + ".nodes.layout_conditioning") as messages:
        text = "a man wearing sunglasses"
        (cond, _), = _encode(comfy_host, clip, text, _layout(pack, ["man wearing sunglasses", "sunglasses"]))[0]
        _encode(comfy_host, clip, "a man in a red shirt and a man", _layout(pack, ["man", "man in a red shirt"]))
    assert sum("'man wearing sunglasses' and 'sunglasses' share words" in m for m in messages) == 1, messages
    assert len(messages) == 1  # the second prompt had an occurrence of its own for each phrase
    own = clip.encode_from_tokens(clip.tokenize("sunglasses"))
    assert torch.equal(cond[0, 4], own[0, 1])  # the later region's embedding is the one at the shared token


def test_errors_name_the_input(comfy_host, pack, clip):
    with pytest.raises(ValueError, match=r"'a blue bird' does not occur in the global prompt 'a red car'"):
        _encode(comfy_host, clip, "a red car", _layout(pack, ["a blue bird"]))
    with pytest.raises(ValueError, match="crosses a 77-token window"):
        _encode(comfy_host, clip, " ".join(["word"] * 74) + " red car", _layout(pack, ["red car"]))
    with pytest.raises(ValueError, match="no regions"):
        _encode(comfy_host, clip, "a red car", pack.layout.Layout())
