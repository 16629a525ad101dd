"""VideoGrain P2P Control through the real host: the node on the test checkpoint's CLIP (in
process), its outputs and refusals; and through the server, a bad P2P prompt posted with
POST /prompt fails naming the input, before any sampling, and the server keeps serving."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from vg_testlib import ExecutionFailed, PromptRejected, comfyui_path, pack_modules

MAN = "a man is driving a motorbike in the forest"
SPIDER = "a Spider-Man is driving a motorbike in the forest"
RABBIT = "a rabbit is jumping on the grass"
ORIGAMI = "a origami rabbit is jumping on the grass"


@pytest.fixture(scope="module")
def env(comfy_host, test_models):
    import comfy.sd
    _, clip, _, _ = comfy.sd.load_checkpoint_guess_config(test_models.small, output_vae=False, output_clipvision=False)
    pack = pack_modules(comfy_host, control="videograin_core.p2p.control", tokens="videograin_core.p2p.tokens",
                        node="nodes.p2p_control")
    from transformers import CLIPTokenizer
    hf = CLIPTokenizer.from_pretrained(os.path.join(comfyui_path(), "comfy", "sd1_tokenizer"))
    return dict(clip=clip, pack=pack, node=comfy_host.nodes.NODE_CLASS_MAPPINGS["VideoGrainP2PControl"],
                encode=comfy_host.nodes.CLIPTextEncode(), hf=lambda t: hf(t)["input_ids"])


def execute(env, **kw):
    args = dict(clip=env["clip"], source_prompt=MAN, target_prompt=SPIDER, mode="word swap", cross_replace=0.2,
                self_replace=0.5, reweight="", blend_source_word="", blend_target_word="", blend_threshold=0.3,
                parity_bug=False)
    args.update(kw)
    out = env["node"].execute(**args)
    return out.args if hasattr(out, "args") else out.result


def test_host_tokenizer_reads_as_the_sd15_vocabulary(env):
    tokenize = env["pack"].node.host_tokenizer(env["clip"])
    for text in (MAN, SPIDER, ORIGAMI, "children drawing of a bird, flying!", "A  Lego tiger\nwalks 2 km",
                 " ".join(["a"] * 75)):
        assert tokenize(text) == env["hf"](text), text
    assert len(tokenize(" ".join(["a"] * 80))) == 82   # two host windows, joined: refused by the core


def test_outputs(env):
    src, tgt, ctl = execute(env, reweight="Spider-Man: 4", blend_source_word="man", blend_target_word="Spider-Man")
    # the conditionings are what CLIPTextEncode gives for each prompt
    for got, text in ((src, MAN), (tgt, SPIDER)):
        (want,) = env["encode"].encode(env["clip"], text)
        assert len(got) == len(want) == 1
        assert torch.equal(got[0][0], want[0][0]) and got[0][0].shape == (1, 77, 768)
        assert torch.equal(got[0][1]["pooled_output"], want[0][1]["pooled_output"])
    assert not torch.equal(src[0][0], tgt[0][0])
    # the control, as the core builds it on the same vocabulary
    assert isinstance(ctl, env["pack"].control.P2PControl)
    ref = env["pack"].control.build_control(MAN, SPIDER, env["hf"], mode="word swap", reweight="Spider-Man: 4",
                                            blend_source_word="man", blend_target_word="Spider-Man")
    assert dataclasses.replace(ctl, source_digest="", target_digest="") == ref
    # the digests of the encoded prompts, for the sampler's check
    digest = env["pack"].control.conditioning_digest
    assert (ctl.source_digest, ctl.target_digest) == (digest(src[0][0]), digest(tgt[0][0]))
    assert ctl.source_digest != ctl.target_digest
    assert ctl.mode == "swap" and (ctl.source_tokens, ctl.target_tokens, ctl.token_count) == (11, 13, 77)
    M = ctl.mapper_tensor(dtype=torch.float64)
    assert torch.allclose(M[2, 2:5], torch.full((3,), 1 / 3, dtype=torch.float64)) and M[3, 5] == 1   # is -> is
    assert ctl.equalizer[2:5] == (4.0,) * 3 and ctl.blend_source == (2,) and ctl.blend_target == (2, 3, 4)
    assert (ctl.cross_window, ctl.self_window, ctl.blend_threshold, ctl.parity_bug) == ((0.0, 0.2), (0.0, 0.5), 0.3,
                                                                                        False)
    json.dumps(ctl.videograin_fingerprint())
    # the parity flag reproduces the reference's diagonal after the swapped word
    bug = execute(env, parity_bug=True)[2]
    assert bug.mapper_tensor(dtype=torch.float64)[5, 5] == 1 and bug.mapper_tensor(dtype=torch.float64)[3, 5] == 0
    # refine: "origami" is inserted (keeps its own map), everything else aligned
    r = execute(env, source_prompt=RABBIT, target_prompt=ORIGAMI, mode="refine", reweight="origami: 2",
                blend_source_word="rabbit", blend_target_word="rabbit", cross_replace=0.8, self_replace=0.7)[2]
    assert r.mode == "refine" and r.mapper[:5] == (0, 1, -1, 2, 3) and r.alphas[2] == 0.0
    assert r.equalizer[2] == 2.0 and r.blend_source == (2,) and r.blend_target == (3,)
    assert (r.cross_window, r.self_window) == ((0.0, 0.8), (0.0, 0.7))
    # an escaped parenthesis is a literal one, not weight syntax
    lit = execute(env, source_prompt="a man \\(smiling\\) is driving", target_prompt="a woman \\(smiling\\) is driving")[2]
    assert lit.source_tokens == lit.target_tokens


@pytest.mark.parametrize("change,message", [
    (dict(target_prompt="a Spider-Man drives a motorbike"), "target_prompt: word swap needs the same number of words"),
    (dict(target_prompt="a (Spider-Man:1.2) is driving a motorbike in the forest"), "target_prompt: weight syntax"),
    (dict(source_prompt="a (man) is driving a motorbike in the forest"), "source_prompt: weight syntax"),
    (dict(target_prompt="a embedding:spidey is driving a motorbike in the forest"),
     "target_prompt: textual-inversion embeddings"),
    (dict(source_prompt=" ".join(["a"] * 80), mode="refine"), "source_prompt has 82 tokens"),
    (dict(source_prompt=""), "source_prompt is empty"),
    (dict(reweight="man: 2"), "reweight: 'man' is not a word of the target_prompt"),
    (dict(reweight="Spider-Man = 2"), "reweight: 'Spider-Man = 2' is not 'word: factor'"),
    (dict(blend_source_word="Spider-Man"), "blend_source_word: 'Spider-Man' is not a word of the source_prompt"),
    (dict(blend_target_word="motor"), "blend_target_word: 'motor' is not a word of the target_prompt"),
    (dict(clip=None), "clip: the CLIP input is empty"),
])
def test_refusals_name_the_input(env, change, message):
    with pytest.raises(ValueError) as e:
        execute(env, **change)
    assert str(e.value).startswith(message), str(e.value)


# ---------------------------------------------------------------- through the server
def graph(ckpt: str, tag: str, **p2p) -> dict:
    """The P2P Control's target conditioning sampled for one step by the host's KSampler
    (a P2P sampler is a later phase; this shows the node's outputs are usable conditionings)."""
    inputs = dict(clip=["ckpt", 1], source_prompt=MAN, target_prompt=SPIDER, mode="word swap", cross_replace=0.2,
                  self_replace=0.5, reweight="Spider-Man: 4", blend_source_word="man", blend_target_word="Spider-Man",
                  blend_threshold=0.3, parity_bug=False)
    inputs.update(p2p)
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "p2p": {"class_type": "VideoGrainP2PControl", "inputs": inputs},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": ""}},
        "lat": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "ks": {"class_type": "KSampler", "inputs": {"model": ["ckpt", 0], "seed": 1, "steps": 1, "cfg": 1.0,
                                                    "sampler_name": "ddim", "scheduler": "ddim_uniform",
                                                    "positive": ["p2p", 1], "negative": ["neg", 0],
                                                    "latent_image": ["lat", 0], "denoise": 1.0}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["ks", 0], "filename_prefix": f"vg_p2p/{tag}"}},
    }


def run(client, prompt):
    events = []
    try:
        entry = client.run_with_progress(prompt, lambda ev, d: events.append((ev, d)), timeout=600)
        return "success", entry, events
    except PromptRejected as e:
        return "rejected", e.body, events
    except ExecutionFailed as e:
        msgs = [m[1] for m in e.entry["status"].get("messages", []) if m[0] == "execution_error"]
        return "error", msgs, events


@pytest.mark.server
def test_bad_p2p_prompt_through_the_server(comfy_server, test_models):
    client = comfy_server
    cases = [
        (dict(target_prompt="a (Spider-Man:1.2) is driving a motorbike in the forest"), "target_prompt: weight syntax"),
        (dict(target_prompt="a Spider-Man drives"), "target_prompt: word swap needs the same number of words"),
        (dict(reweight="man: 2"), "reweight: 'man' is not a word of the target_prompt"),
        (dict(blend_target_word="rider"), "blend_target_word: 'rider' is not a word of the target_prompt"),
    ]
    for i, (change, message) in enumerate(cases):
        status, msgs, events = run(client, graph(test_models.small_name, f"bad{i}", **change))
        assert status == "error", (change, status, msgs)
        (m,) = msgs
        assert m["node_id"] == "p2p" and m["exception_message"].startswith(message), m["exception_message"]
        assert not [d for ev, d in events if ev == "progress"]        # nothing was sampled
        assert client.alive()
    # a mode the combo does not offer (this host lets it through validation to the node)
    status, msgs, events = run(client, graph(test_models.small_name, "badmode", mode="swap words"))
    if status == "rejected":
        assert "mode" in json.dumps(msgs) and "p2p" in msgs.get("node_errors", {})
    else:
        assert status == "error" and msgs[0]["node_id"] == "p2p"
        assert msgs[0]["exception_message"].startswith("mode must be one of word swap, refine")
        assert not [d for ev, d in events if ev == "progress"]
    # the server still serves: a valid P2P prompt runs through to the saved latent
    assert client.get("/system_stats")["system"]
    status, entry, events = run(client, graph(test_models.small_name, "good"))
    assert status == "success", entry
    assert [d for ev, d in events if ev == "progress" and d.get("node") == "ks"]   # (what the bad runs lack)
    (item,) = entry["outputs"]["save"]["latents"]
    assert os.path.isfile(os.path.join(client.output_dir, item["subfolder"], item["filename"]))
