"""What keeps the pack working on newer hosts than the one it was written on (make test runs
this on ComfyUI 0.3.75 and 0.8.0): only the v3 API names the host exports, every function
the pack hands the host open to arguments a later host adds (and passing them on), and an
in-process executor built from what the host's own code reads, not from its version."""
from __future__ import annotations

import ast
import importlib.util
import os
import textwrap
from importlib import import_module

import pytest
import torch
from vg_testlib import REPO, in_process_executor, load_script

FRAMES, LATENT = 2, 8


# ---------------------------------------------------------------- v3 API names
def _pack_sources():
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("__pycache__", "test-artifacts", "output")]
        for f in files:
            if f.endswith(".py"):
                yield os.path.join(root, f)


def _api_names_used():
    """{("io" | "ui" | "latest", name): [file:line, ...]} for every name the pack's (and the
    tests' and scripts') code reads from comfy_api.latest, its io or its ui."""
    used: dict = {}
    for path in _pack_sources():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        aliases = {}  # local name -> "io" / "ui"
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "comfy_api.latest":
                for a in node.names:
                    if a.name in ("io", "ui"):
                        aliases[a.asname or a.name] = a.name
                    else:
                        used.setdefault(("latest", a.name), []).append(f"{os.path.relpath(path, REPO)}:{node.lineno}")
            elif isinstance(node, ast.ImportFrom) and node.module in ("comfy_api.latest.io", "comfy_api.latest.ui"):
                for a in node.names:
                    used.setdefault((node.module.rsplit(".", 1)[1], a.name), []).append(
                        f"{os.path.relpath(path, REPO)}:{node.lineno}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                used.setdefault((aliases[node.value.id], node.attr), []).append(
                    f"{os.path.relpath(path, REPO)}:{node.lineno}")
    return used


def test_pack_reads_only_names_the_hosts_v3_api_exports(comfy_host):
    """Newer hosts re-export only `__all__` of their io/ui modules: every io.X / ui.X the code
    uses must be in that list (where the host has one) and reachable."""
    import comfy_api.latest as latest
    used = _api_names_used()
    assert ("io", "ComfyNode") in used and ("io", "Schema") in used, "the scan found none of the pack's io names"

    def exported(module):
        public = getattr(module, "__all__", None)
        return set(public) if public is not None else {n for n in dir(module) if not n.startswith("_")}

    api = {"io": exported(latest.io), "ui": exported(latest.ui), "latest": set(dir(latest))}
    missing = {f"{kind}.{name}": where for (kind, name), where in sorted(used.items())
               if name not in api[kind] or not hasattr(getattr(latest, kind) if kind != "latest" else latest, name)}
    assert not missing, f"names this host's comfy_api.latest does not export: {missing}"


# ---------------------------------------------------------------- the in-process executor
def _fake_execution(tmp_path, name, source, main_py=None):
    d = tmp_path / name
    d.mkdir()
    (d / "execution.py").write_text(textwrap.dedent(source))
    if main_py is not None:
        (d / "main.py").write_text(textwrap.dedent(main_py))
    spec = importlib.util.spec_from_file_location(f"fake_execution_{name}", d / "execution.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_in_process_executor_gets_the_cache_args_the_host_reads(tmp_path, comfy_host):
    runner = load_script("comfy_runner")
    server = object()
    # a later host that reads keys no release here has, in its executor and in main.py
    later = _fake_execution(tmp_path, "later", """
        class PromptExecutor:
            def __init__(self, server, cache_type=False, cache_args=None):
                self.cache_args = cache_args
                self.headroom = (cache_args["ram"], cache_args["ram_inactive"], cache_args.get("pinned"))
                self.lru = cache_args["lru"] + cache_args["spill"]
        """, main_py="""
        e = execution.PromptExecutor(server, cache_type=t, cache_args={ "lru" : a.lru, "ram" : a.ram, "from_main": 1 })
        """)
    ex = runner.in_process_executor(later, server)
    assert ex.cache_args == {"lru": 0, "ram": 0, "ram_inactive": 0, "pinned": 0, "spill": 0, "from_main": 0}
    # an executor without cache arguments gets none
    bare = _fake_execution(tmp_path, "bare", """
        class PromptExecutor:
            def __init__(self, server):
                self.server = server
        """)
    assert runner.in_process_executor(bare, server).server is server

    # the real host: every key its execution module reads from cache_args is there, and it runs
    real = in_process_executor(comfy_host.execution, object())
    import inspect
    import re
    read = set(re.findall(r"""cache_args\s*(?:\[|\.get\()\s*["'](\w+)["']""", inspect.getsource(comfy_host.execution)))
    assert read and read <= set(real.cache_args), (read, real.cache_args)
    assert {"lru", "ram", "ram_inactive"} <= set(real.cache_args)
    ex = comfy_host.run({"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1,
                                                                    "color": 0}},
                         "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}})
    assert ex.success, ex.status_messages


# ---------------------------------------------------------------- functions handed to the host
@pytest.fixture(scope="module")
def patched(comfy_host, test_models):
    """The small model with a recording attention replace on every layer, then the
    ST-Layout Patch over it; plus the real q, k, v and extra_options of one modulated
    self- and cross-attention call of a sampling run."""
    import comfy.ldm.modules.attention as attention
    import comfy.sd
    nodes = comfy_host.nodes
    pack = comfy_host.pack.__name__
    Layout = import_module(pack + ".videograin_core.prompts.layout").Layout
    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(test_models.small, output_clipvision=False)
    left = torch.zeros(FRAMES, LATENT * 8, LATENT * 8)
    left[:, :, :32] = 1
    cls = nodes.NODE_CLASS_MAPPINGS
    out = cls["VideoGrainLayoutConditioning"].execute(clip=clip, global_prompt="a red car and a woman",
                                                      layout=Layout().add(left, "red car").add(1 - left, "woman"))
    positive, layout = out.args if hasattr(out, "args") else out.result
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]

    received, captured = [], {}

    def recording(kind):
        def attn(q, k, v, extra_options, *args, **kwargs):
            received.append((kind, args, kwargs))
            if extra_options.get("activations_shape") and extra_options["activations_shape"][-1] == LATENT // 2:
                captured.setdefault(kind, (q, k, v, dict(extra_options)))
            return attention.optimized_attention(q, k, v, extra_options["n_heads"],
                                                 attn_precision=extra_options.get("attn_precision"))
        return attn

    m = model.clone()
    blocks = import_module(pack + ".nodes.st_layout_patch").transformer_blocks(m.model.diffusion_model)
    for key in blocks:
        m.set_model_attn1_replace(recording("attn1"), *key)
        m.set_model_attn2_replace(recording("attn2"), *key)
    out = cls["VideoGrainSTLayoutPatch"].execute(model=m, layout=layout, full_frame_attention=True, self_strength=0.3,
                                                 cross_strength=1.0, end_percent=1.0, self_branch="uncond",
                                                 size_term="reference", modulate_full_resolution=False)
    p = (out.args if hasattr(out, "args") else out.result)[0]
    latent = {"samples": torch.zeros(FRAMES, 4, LATENT, LATENT)}
    nodes.KSampler().sample(p, 1, 1, 5.0, "ddim", "ddim_uniform", positive, negative, latent, denoise=1.0)
    assert set(captured) == {"attn1", "attn2"}, "no modulated attention call was seen"
    return dict(model=p, received=received, captured=captured, blocks=blocks, pack=pack, layout=layout)


@pytest.mark.parametrize("kind", ["attn1", "attn2"])
def test_attention_replaces_pass_extra_arguments_on(patched, kind):
    """A later host may call an attention replace with more than (q, k, v, extra_options):
    the pack's replaces take them and hand them to the replace they chain, on the modulated
    call (whose other rows go to it) as on a plain one."""
    table = patched["model"].model_options["transformer_options"]["patches_replace"][kind]
    fn = table[patched["blocks"][0]]
    q, k, v, extra = patched["captured"][kind]
    received = patched["received"]
    for extra_options in (extra, {**extra, "cond_or_uncond": None}):  # modulated rows + the rest / all plain
        received.clear()
        expected = fn(q, k, v, extra_options)
        assert received and all(r == (kind, (), {}) for r in received)
        received.clear()
        got = fn(q, k, v, extra_options, "positional", new_option=7)
        assert received and all(r == (kind, ("positional",), {"new_option": 7}) for r in received), received
        assert torch.equal(got, expected)


def test_host_attention_gets_the_extra_keyword_arguments(comfy_host, monkeypatch):
    """Without a chained replace the extras go to the host's attention function."""
    import comfy.ldm.modules.attention as attention
    mod = import_module(comfy_host.pack.__name__ + ".nodes.st_layout_patch")
    seen = []

    def host_fn(q, k, v, heads, *args, **kwargs):
        seen.append((heads, args, kwargs))
        return q

    monkeypatch.setattr(attention, "optimized_attention", host_fn)
    q = torch.zeros(1, 4, 8)
    extra = {"n_heads": 2, "attn_precision": None}
    mod._host_attention(q, q, q, extra, new_option=7)
    assert seen == [(2, (), {"attn_precision": None, "transformer_options": extra, "new_option": 7})]


def test_outer_sample_wrapper_passes_extra_arguments_on(patched):
    import comfy.patcher_extension as pe
    mod = import_module(patched["pack"] + ".nodes.st_layout_patch")
    wrappers = patched["model"].wrappers[pe.WrappersMP.OUTER_SAMPLE][mod.WRAPPER_KEY]
    assert len(wrappers) == 1
    calls = []

    class Executor:
        class_obj = type("Guider", (), {"model_options": {}, "original_conds": {}})()

        def __call__(self, *args, **kwargs):
            calls.append((args, kwargs))
            return "sampled"

    noise = torch.zeros(FRAMES, 4, LATENT, LATENT)
    assert wrappers[0](Executor(), noise, "latent", force_full_load=True, new_option=1) == "sampled"
    assert calls == [((noise, "latent"), {"force_full_load": True, "new_option": 1})]
    with pytest.raises(ValueError, match="layout"):  # still checks before passing on
        wrappers[0](Executor(), torch.zeros(FRAMES, 4, LATENT // 2, LATENT // 2), force_full_load=True)


def test_step_callback_passes_extra_arguments_on(comfy_host, patched, monkeypatch):
    ddim = import_module(comfy_host.pack.__name__ + ".nodes.host_glue")
    seen = []
    monkeypatch.setattr(ddim.latent_preview, "prepare_callback",
                        lambda model, steps: lambda *args, **kwargs: seen.append((args, kwargs)))
    cb = ddim.step_callback(patched["model"], 3)
    cb(0, "x0", "x", 3, "more", new_option=1)
    assert seen == [((0, "x0", "x", 3, "more"), {"new_option": 1})]
