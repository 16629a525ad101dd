"""VideoGrain T2S Tune / T2S Load through the real host (small random test model, in
process, 2 frames of 64x64): the untuned T2S model is the input model bit for bit, tuning
lowers the clip's loss, the temporal attention is the formula of VIDEO_P2P.md section 3
(checked against a float64 reference written here) and an exact no-op untuned, the saved
file reloads to the same outputs, and bad inputs are refused naming the input."""
from __future__ import annotations

import math
import os

import pytest
import torch
from vg_testlib import pack_modules

FRAMES, LATENT = 2, 8
PROMPT = "a rabbit is jumping on the grass"


def _args(out):
    return out.args if hasattr(out, "args") else out.result


@pytest.fixture(scope="module")
def env(comfy_host, test_models):
    import comfy.sd
    with torch.inference_mode():  # as the host loads models for a node
        model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(test_models.small, output_vae=False,
                                                                  output_clipvision=False)
        cond = comfy_host.nodes.CLIPTextEncode().encode(clip, PROMPT)[0]
        negative = comfy_host.nodes.CLIPTextEncode().encode(clip, "")[0]
        g = torch.Generator().manual_seed(3)
        lat = torch.nn.functional.interpolate(torch.randn(FRAMES, 4, 4, 4, generator=g), size=(LATENT, LATENT),
                                              mode="bilinear") * 2
    cls = comfy_host.nodes.NODE_CLASS_MAPPINGS
    pack = pack_modules(comfy_host, temporal="videograin_core.tuning.temporal", weights="videograin_core.tuning.weights",
                        tune="videograin_core.tuning.tune", node="nodes.t2s_tune")
    return dict(model=model, cond=cond, negative=negative, latent={"samples": lat}, cls=cls, pack=pack,
                host=comfy_host)


def tune(env, model=None, **kw):
    args = dict(model=model or env["model"], latent=env["latent"], conditioning=env["cond"], steps=0,
                learning_rate=3e-5, seed=0, filename_prefix="")
    args.update(kw)
    with torch.inference_mode():  # as the executor runs nodes
        return _args(env["cls"]["VideoGrainT2STune"].execute(**args))[0]


def p2p_inputs(env, test_models, model, steps):
    """P2P Control's outputs for PROMPT -> a word swap (rabbit -> tiger), and DDIM Invert of
    the clip with `model` (next-step scheme, `steps` steps): (source, target, p2p, inversion)."""
    import comfy.sd
    cls = env["cls"]
    with torch.inference_mode():
        _, clip, _, _ = comfy.sd.load_checkpoint_guess_config(test_models.small, output_vae=False,
                                                              output_clipvision=False)
        src, tgt, p2p = _args(cls["VideoGrainP2PControl"].execute(
            clip=clip, source_prompt=PROMPT, target_prompt=PROMPT.replace("rabbit", "tiger"), mode="word swap",
            cross_replace=0.2, self_replace=0.5, reweight="", blend_source_word="", blend_target_word="",
            blend_threshold=0.3, parity_bug=False))
        _, inv = _args(cls["VideoGrainDDIMInvert"].execute(model=model, conditioning=src, steps=steps, cfg=1.0,
                                                           use_cache=False, latent=env["latent"], scheme="next-step"))
    return src, tgt, p2p, inv


def ksample(env, model, seed=1):
    """Two Euler steps of the host's KSampler at cfg 4 on the clip's latent (partial denoise)."""
    with torch.inference_mode():
        out = env["host"].nodes.KSampler().sample(model, seed, 2, 4.0, "euler", "normal", env["cond"],
                                                  env["negative"], env["latent"], denoise=0.6)[0]
    return out["samples"].clone()


# ---------------------------------------------------------------- the temporal module
def _reference(x, m, sequences, frames):
    """x + TemporalAttn(LayerNorm(x)), float64, written out per sequence and token."""
    p = {k: v.double() for k, v in m.state_dict().items()}
    x = x.double()
    rows, tokens, c = x.shape
    out = x.clone()
    heads, d = m.heads, m.dim_head
    for s in range(sequences):
        for t in range(tokens):
            h = x[s * frames:(s + 1) * frames, t]                         # [F, C]
            mu = h.mean(-1, keepdim=True)
            var = ((h - mu) ** 2).mean(-1, keepdim=True)
            h = (h - mu) / torch.sqrt(var + m.norm.eps) * p["norm.weight"] + p["norm.bias"]
            q, k, v = h @ p["to_q.weight"].T, h @ p["to_k.weight"].T, h @ p["to_v.weight"].T
            o = torch.zeros(frames, heads * d, dtype=torch.float64)
            for j in range(heads):
                sl = slice(j * d, (j + 1) * d)
                w = torch.softmax(q[:, sl] @ k[:, sl].T / math.sqrt(d), dim=-1)   # [F, F]
                o[:, sl] = w @ v[:, sl]
            out[s * frames:(s + 1) * frames, t] += o @ p["to_out.weight"].T + p["to_out.bias"]
    return out


def test_untuned_temporal_module_is_an_exact_noop(env):
    T = env["pack"].temporal
    m = T.TemporalAttention(64, 4, 16, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2 * FRAMES, 5, 64, generator=torch.Generator().manual_seed(4)) * 3
    assert torch.equal(m(x, 2, FRAMES), x)
    assert torch.equal(m(x.half(), 2, FRAMES), x.half())


def test_temporal_attention_matches_a_float64_reference(env):
    T = env["pack"].temporal
    m = T.TemporalAttention(32, 4, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
    x = torch.randn(2 * FRAMES, 6, 32, generator=torch.Generator().manual_seed(5))
    got = m(x, 2, FRAMES).double()
    want = _reference(x, m, 2, FRAMES)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
    # sequences never mix: changing sequence 1 leaves sequence 0's output alone
    x2 = x.clone()
    x2[FRAMES:] += 1
    assert torch.equal(m(x2, 2, FRAMES)[:FRAMES], m(x, 2, FRAMES)[:FRAMES])


def test_the_temporal_patch_reads_the_published_batch_layout(env):
    T = env["pack"].temporal
    BL = __import__(T.__name__.rsplit(".", 2)[0] + ".attention.batch_layout", fromlist=["x"])
    # P2P Sample's stacked batch: 2 chunks (cond, uncond) x 2 sequences (source, target) x F frames
    layout = BL.BatchLayout((0, 1), FRAMES, 2)
    got = T.call_layout(4 * FRAMES, {BL.PUBLISHED_KEY: layout, "cond_or_uncond": [0, 1]})
    assert got is layout and got.sequences == 4
    # no publisher (a core KSampler): one sequence per cond_or_uncond entry
    got = T.call_layout(2 * FRAMES, {"cond_or_uncond": [0, 1]})
    assert (got.sequences, got.frames) == (2, FRAMES)
    assert T.call_layout(5, {"cond_or_uncond": [0, 1]}) is None
    # a batch it cannot split runs without temporal attention (the block's output as it was)
    m = T.TemporalAttention(8, 2, 4, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        m.to_out.weight.fill_(1.0)
    patch = T.TemporalBlockPatch(lambda x, context=None, transformer_options=None: x * 2, m, "b")
    x = torch.randn(5, 3, 8, generator=torch.Generator().manual_seed(2))
    assert torch.equal(patch(x, transformer_options={"cond_or_uncond": [0, 1]}), x * 2)
    assert not torch.equal(patch(x[:4], transformer_options={"cond_or_uncond": [0, 1]}), x[:4] * 2)
    # frozen weights are copied to a device once, and a change of the weights is seen
    a = patch(x[:4], transformer_options={"cond_or_uncond": [0, 1]})
    with torch.no_grad():
        m.to_out.bias.fill_(1.0)
    assert torch.allclose(patch(x[:4], transformer_options={"cond_or_uncond": [0, 1]}), a + 1, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- through the host
def test_zero_steps_leave_the_model_unchanged_bit_for_bit(env):
    tuned = tune(env, steps=0)
    assert tuned is not env["model"]
    assert any(k.endswith(".forward") for k in tuned.object_patches)
    assert any("to_q" in k for k in tuned.patches)
    assert torch.equal(ksample(env, tuned), ksample(env, env["model"]))


def test_tuning_lowers_the_clip_loss(env):
    node = env["pack"].node
    specs = node.block_specs(env["model"].model.diffusion_model)
    weights = env["pack"].weights.T2SWeights(specs, seed=0)
    config = env["pack"].tune.TuneConfig(steps=5, learning_rate=1e-3, seed=0)
    with torch.inference_mode():
        lat, text = node.check_inputs(env["model"], env["latent"], env["cond"], 5, 1e-3)
        out = node.run_tuning(env["model"], lat, text, config, weights, eval_timesteps=[100, 500, 900])
    assert len(out["losses"]) == 5 and all(math.isfinite(v) for v in out["losses"])
    assert out["after"] < out["before"], out
    # everything tuned moved, the model's own weights did not take part
    assert any(d.abs().max() > 0 for d in weights.q_deltas.values())
    assert any(m.to_out.weight.abs().max() > 0 for m in weights.temporal.values())
    assert not any(p.requires_grad for p in weights.parameters())
    dm = env["model"].model.diffusion_model
    assert all(p.is_inference() for p in dm.parameters())  # the originals are back
    assert not any(m._forward_hooks for m in dm.modules())


def test_tuning_is_deterministic_and_the_saved_file_reloads_to_the_same_outputs(env):
    node = env["pack"].node
    a = tune(env, steps=2, learning_rate=1e-3, seed=7, filename_prefix="rabbit")
    files = node.t2s_files()
    assert files and files[-1].startswith("rabbit_")
    name = files[-1]
    assert os.path.isfile(os.path.join(env["host"].folder_paths.get_output_directory(), "videograin_t2s", name))
    with torch.inference_mode():
        b = _args(env["cls"]["VideoGrainT2SLoad"].execute(model=env["model"], tuned=name))[0]
    out_a, out_b = ksample(env, a), ksample(env, b)
    assert torch.equal(out_a, out_b)
    assert not torch.equal(out_a, ksample(env, env["model"]))   # the tuning does change the model
    c = tune(env, steps=2, learning_rate=1e-3, seed=7)
    assert torch.equal(ksample(env, c), out_a)                  # same seed, same result
    # the loader lists the file for the UI
    schema = env["cls"]["VideoGrainT2SLoad"].define_schema()
    assert name in schema.inputs[1].options


def test_interrupting_restores_the_model(env, monkeypatch):
    import comfy.model_management as mm
    calls = {"n": 0}

    def interrupt():
        calls["n"] += 1
        if calls["n"] > 2:
            raise mm.InterruptProcessingException()
    monkeypatch.setattr(mm, "throw_exception_if_processing_interrupted", interrupt)
    with pytest.raises(mm.InterruptProcessingException):
        tune(env, steps=50)
    dm = env["model"].model.diffusion_model
    assert all(p.is_inference() for p in dm.parameters())
    assert not any(m._forward_hooks for m in dm.modules())


# ---------------------------------------------------------------- refusals
@pytest.mark.parametrize("over,words", [
    (dict(steps=-1), "steps"),
    (dict(learning_rate=0.0), "learning_rate"),
    (dict(latent={"samples": torch.zeros(FRAMES, 4, 8)}), "latent"),
    (dict(latent={"samples": torch.zeros(FRAMES, 3, 8, 8)}), "latent"),
    (dict(latent={"samples": torch.full((FRAMES, 4, 8, 8), float("nan"))}), "latent"),
    (dict(latent="nope"), "latent"),
    (dict(filename_prefix="../../escape"), "filename_prefix"),
])
def test_bad_inputs_are_refused_naming_the_input(env, over, words):
    with pytest.raises(ValueError) as e:
        tune(env, **{"steps": 1, **over})
    assert str(e.value).startswith(words), e.value


def test_bad_conditioning_is_refused(env):
    ca, extra = env["cond"][0]
    with pytest.raises(ValueError, match="^conditioning: it holds 3 prompts but the latent has 2 frames"):
        tune(env, conditioning=[[ca.repeat(3, 1, 1), extra]])
    with pytest.raises(ValueError, match="^conditioning: expected the source prompt encoded once"):
        tune(env, conditioning=env["cond"] + env["cond"])


def test_too_little_memory_is_refused_before_tuning(env, monkeypatch):
    import comfy.model_management as mm
    monkeypatch.setattr(mm, "get_free_memory", lambda *a, **k: 1024)
    with pytest.raises(ValueError, match="^latent: tuning 2 frames of 64x64 needs about"):
        tune(env, steps=1)


def test_bad_files_are_refused(env):
    from safetensors.torch import save_file
    node = env["pack"].node
    load = env["cls"]["VideoGrainT2SLoad"]
    root = node.t2s_folder()
    os.makedirs(root, exist_ok=True)
    save_file({"x": torch.zeros(2)}, os.path.join(root, "foreign.safetensors"))
    w = env["pack"].weights.T2SWeights([env["pack"].weights.BlockSpec("b.transformer_blocks.0", 8, 2, 4,
                                                                      ((8, 8), (8, 8)))])
    save_file(w.state_dict(), os.path.join(root, "other.safetensors"), metadata=w.metadata())
    for name, match in (("../escape.safetensors", "^tuned: .* is not a .safetensors file inside"),
                        ("missing.safetensors", "^tuned: .* was not found"),
                        ("foreign.safetensors", "^tuned: not a VideoGrain T2S file"),
                        ("other.safetensors", "^tuned: this T2S file was tuned for another UNet")):
        with pytest.raises(ValueError, match=match):
            with torch.inference_mode():
                load.execute(model=env["model"], tuned=name)


def test_p2p_sample_on_the_tuned_model_keeps_the_branches_apart(env, test_models, monkeypatch):
    """Inverted and edited by P2P Sample, the tuned model's temporal attention sees each
    branch (source, target) of each chunk as its own clip."""
    cls, T = env["cls"], env["pack"].temporal
    tuned = tune(env, steps=1, learning_rate=1e-3)
    src, tgt, p2p, inv = p2p_inputs(env, test_models, tuned, steps=2)
    seen = []
    real = T.call_layout

    def spy(rows, options):
        layout = real(rows, options)
        seen.append((rows, layout))
        return layout
    monkeypatch.setattr(T, "call_layout", spy)
    with torch.inference_mode():
        target, source = _args(cls["VideoGrainP2PSample"].execute(
            model=tuned, source=src, target=tgt, p2p=p2p, negative=env["negative"], inversion=inv, cfg=7.5,
            source_mode="direct", frame_attention="first frame"))
    assert seen and all(layout is not None and layout.frames == FRAMES and layout.sequences == rows // FRAMES
                        and layout.groups == 2 for rows, layout in seen), seen[:3]
    assert torch.isfinite(target["samples"]).all() and target["samples"].shape == env["latent"]["samples"].shape


def test_a_bad_input_fails_the_prompt_with_the_message(env, test_models):
    """Through the host's executor (an API prompt): the node's refusal is the prompt's error."""
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": test_models.small_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["1", 1]}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "4": {"class_type": "VideoGrainT2STune", "inputs": {"model": ["1", 0], "latent": ["3", 0],
                                                            "conditioning": ["2", 0], "steps": 1,
                                                            "learning_rate": 3e-5, "seed": 0,
                                                            "filename_prefix": "../../escape"}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "seed": 0, "steps": 1, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "normal",
                                                   "positive": ["2", 0], "negative": ["2", 0],
                                                   "latent_image": ["3", 0], "denoise": 1.0}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "vg_t2s_test"}},
    }
    ex = env["host"].run(prompt)
    assert not ex.success
    errors = [m for m in ex.status_messages if m[0] == "execution_error"]
    assert errors and errors[0][1]["node_type"] == "VideoGrainT2STune", ex.status_messages
    assert errors[0][1]["exception_message"].startswith("filename_prefix: '../../escape' does not name a file"), \
        errors[0][1]["exception_message"]


def test_the_models_wrappers_run_while_tuning(env):
    """The loop calls the UNet as sampling does: DIFFUSION_MODEL wrappers (the pack's batch
    layout publisher, which frame-pooled norms read) run, and see the clip as one sequence."""
    import comfy.patcher_extension
    seen = []

    def spy(executor, x, *args, **kwargs):
        options = args[4] if len(args) > 4 else kwargs.get("transformer_options")
        seen.append((x.shape[0], list(options.get("cond_or_uncond", []))))
        return executor(x, *args, **kwargs)
    m = env["model"].clone()
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "t2s_test_spy", spy)
    tune(env, model=m, steps=1)
    assert seen == [(FRAMES, [0])], seen


def test_a_failure_while_setting_up_restores_the_model(env, monkeypatch):
    node = env["pack"].node

    def broken(*a, **k):
        raise RuntimeError("set-up failed")
    monkeypatch.setattr(node, "_eps_fn", broken)
    with pytest.raises(RuntimeError, match="set-up failed"):
        tune(env, steps=1)
    dm = env["model"].model.diffusion_model
    assert all(p.is_inference() for p in dm.parameters())
    assert not any(m._forward_hooks for m in dm.modules())


# ---------------------------------------------------------------- temporal map replacement
def test_temporal_replacement_gives_the_target_the_sources_maps(env):
    """With pairs (source, target), the target's temporal attention is softmax(q_s k_s^T) v_t:
    the reference written here builds the maps from the source's frames and applies them to
    the target's values; the source and any sequence not named stay as without replacement."""
    T = env["pack"].temporal
    m = T.TemporalAttention(32, 4, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel() + 1)) * 0.3)
    seqs, tokens = 4, 5
    x = torch.randn(seqs * FRAMES, tokens, 32, generator=torch.Generator().manual_seed(6))
    got = m(x, seqs, FRAMES, replace=[(0, 1), (2, 3)]).double()
    plain = m(x, seqs, FRAMES).double()
    p = {k: v.double() for k, v in m.state_dict().items()}
    heads, d = m.heads, m.dim_head

    def norm(h):
        mu = h.mean(-1, keepdim=True)
        return (h - mu) / torch.sqrt(((h - mu) ** 2).mean(-1, keepdim=True) + m.norm.eps) * p["norm.weight"] + p["norm.bias"]

    xd = x.double()
    for src, tgt in ((0, 1), (2, 3)):
        for t in range(tokens):
            hs, ht = norm(xd[src * FRAMES:(src + 1) * FRAMES, t]), norm(xd[tgt * FRAMES:(tgt + 1) * FRAMES, t])
            q, k, v = hs @ p["to_q.weight"].T, hs @ p["to_k.weight"].T, ht @ p["to_v.weight"].T
            o = torch.zeros(FRAMES, heads * d, dtype=torch.float64)
            for j in range(heads):
                sl = slice(j * d, (j + 1) * d)
                o[:, sl] = torch.softmax(q[:, sl] @ k[:, sl].T / math.sqrt(d), dim=-1) @ v[:, sl]
            want = xd[tgt * FRAMES:(tgt + 1) * FRAMES, t] + o @ p["to_out.weight"].T + p["to_out.bias"]
            assert torch.allclose(got[tgt * FRAMES:(tgt + 1) * FRAMES, t], want, atol=1e-5, rtol=1e-5)
        assert torch.equal(got[src * FRAMES:(src + 1) * FRAMES], plain[src * FRAMES:(src + 1) * FRAMES])
    assert not torch.allclose(got[FRAMES:2 * FRAMES], plain[FRAMES:2 * FRAMES], atol=1e-3)  # it did act


def test_p2p_sample_replaces_temporal_maps_of_the_target_only(env, test_models, monkeypatch):
    """self_replace_maps "spatial + temporal" vs "spatial" on a model whose temporal modules
    act (random output projections): the source latent is the same bit for bit, the target
    changes; the pairs handed to the temporal modules are (source, target) of the cond chunks,
    inside the self window only."""
    cls, T = env["cls"], env["pack"].temporal
    tuned = tune(env, steps=0)
    for patch in tuned.object_patches.values():  # make every temporal module act
        if isinstance(patch, T.TemporalBlockPatch):
            with torch.no_grad():
                out = patch.module.to_out
                out.weight.copy_(torch.randn(out.weight.shape, generator=torch.Generator().manual_seed(2)) * 0.05)
    src, tgt, p2p, inv = p2p_inputs(env, test_models, tuned, steps=4)
    pairs_seen = []
    real = T.TemporalAttention.residual

    def spy(self, x, sequences, frames, replace=()):
        pairs_seen.append(list(replace))
        return real(self, x, sequences, frames, replace)

    def run(maps):
        with torch.inference_mode():
            return [o["samples"].clone() for o in _args(cls["VideoGrainP2PSample"].execute(
                model=tuned, source=src, target=tgt, p2p=p2p, negative=env["negative"], inversion=inv, cfg=7.5,
                source_mode="fast", frame_attention="first frame", self_replace_maps=maps))]
    target_s, source_s = run("spatial")
    monkeypatch.setattr(T.TemporalAttention, "residual", spy)
    target_t, source_t = run("spatial + temporal")
    assert torch.equal(source_s, source_t)
    assert not torch.allclose(target_s, target_t, atol=1e-4)
    # 4 steps, self window 0.5: the first 2 steps replace; batched cond + uncond chunks: the
    # cond chunk's (source, target) pair only
    replaced = [p for p in pairs_seen if p]
    assert replaced and len(replaced) < len(pairs_seen)
    assert all(len(p) == 1 and p[0][1] == p[0][0] + 1 and p[0][0] % 2 == 0 for p in replaced), replaced[:3]
