"""The foundation: the host starts with the pack, the test models load as SD1.5, and a
stock text-to-image workflow runs through the real server."""
from __future__ import annotations

import hashlib
import os
import re

from vg_testlib import load_script


def _sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def test_test_model_is_detected_as_sd15(comfy_host, test_models):
    import comfy.sd
    import comfy.supported_models
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(test_models.small)
    assert type(model.model.model_config) is comfy.supported_models.SD15
    # Attention at the top three levels plus the middle block, like SD1.5.
    blocks = {(name.split(".")[0], int(name.split(".")[1])) for name, _ in model.model.diffusion_model.named_modules()
              if name.endswith("transformer_blocks.0")}
    assert ("middle_block", 1) in blocks
    assert len(blocks) == 3 + 6 + 1
    tokens = clip.tokenize("a photo of a cat")
    cond = clip.encode_from_tokens(tokens)
    assert cond.shape == (1, 77, 768)


def test_test_models_are_deterministic(tmp_path, comfy_host, monkeypatch):
    maker = load_script("make_test_models")
    monkeypatch.delenv(maker.STORE_ENV, raising=False)  # build each file, never link one
    a = maker.write_model(str(tmp_path / "a"), "small_cnet", seed=3)
    b = maker.write_model(str(tmp_path / "b"), "small_cnet", seed=3)
    c = maker.write_model(str(tmp_path / "c"), "small_cnet", seed=4)
    assert _sha(a) == _sha(b)
    assert _sha(a) != _sha(c)
    mtime = os.path.getmtime(a)
    assert maker.write_model(str(tmp_path / "a"), "small_cnet", seed=3) == a
    assert os.path.getmtime(a) == mtime, "a matching cached model must not be rewritten"


def test_the_shared_store_holds_one_copy_per_recipe(tmp_path, comfy_host, monkeypatch):
    """Two hosts' models folders get the same file (one inode) from the store; another
    seed is another stored file; the host's copy is a plain file where the host looks."""
    maker = load_script("make_test_models")
    store = tmp_path / "store"
    monkeypatch.setenv(maker.STORE_ENV, str(store))
    a = maker.write_model(str(tmp_path / "hostA"), "small_cnet", seed=5)
    b = maker.write_model(str(tmp_path / "hostB"), "small_cnet", seed=5)
    assert os.path.samefile(a, b) and not os.path.islink(a)
    assert len(os.listdir(store)) == 1
    c = maker.write_model(str(tmp_path / "hostC"), "small_cnet", seed=6)
    assert not os.path.samefile(a, c) and len(os.listdir(store)) == 2
    monkeypatch.delenv(maker.STORE_ENV)
    d = maker.write_model(str(tmp_path / "hostD"), "small_cnet", seed=5)  # built without the store
    assert _sha(d) == _sha(a)


def test_pack_imported_without_error(comfy_server):
    log = comfy_server.log_text()
    lines = [l for l in log.splitlines() if "ComfyUI-VideoGrain" in l]
    assert any(re.search(r"\d+\.\d+ seconds", l) for l in lines), log[-3000:]
    assert not any("IMPORT FAILED" in l for l in lines), "\n".join(lines)
    assert "Traceback" not in "\n".join(lines)


def test_every_pack_node_is_served_with_its_inputs(comfy_server, comfy_host):
    info = comfy_server.get("/object_info")
    pack = comfy_host.pack
    assert pack is not None, "the pack was not loaded in-process"
    from importlib import import_module
    node_classes = import_module(pack.__name__ + ".nodes").NODE_CLASSES
    assert node_classes, "the pack registers no nodes"
    for cls in node_classes:
        schema = cls.GET_SCHEMA()
        assert schema.node_id.startswith("VideoGrain"), schema.node_id
        assert schema.node_id in info, f"{schema.node_id} missing from /object_info"
        served = info[schema.node_id]["input"]
        served_names = set(served.get("required", {})) | set(served.get("optional", {}))
        declared = {i.id for i in schema.inputs}
        assert declared == served_names, (schema.node_id, declared, served_names)
        assert len(info[schema.node_id]["output"]) == len(schema.outputs)


def test_stock_txt2img_workflow_runs(comfy_server, test_models):
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": test_models.small_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox in the snow", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 96, "batch_size": 2}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": 1, "steps": 2, "cfg": 5.0,
                                                   "sampler_name": "ddim", "scheduler": "ddim_uniform", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "vg_txt2img"}},
    }
    entry = comfy_server.run(prompt, timeout=300)
    images = entry["outputs"]["7"]["images"]
    assert len(images) == 2
    from PIL import Image
    for im in images:
        with Image.open(os.path.join(comfy_server.output_dir, im["subfolder"], im["filename"])) as pil:
            assert pil.size == (64, 96)


def test_node_reference_is_up_to_date(comfy_host):
    """docs/NODES.md is generated from the schemas: it must say what the host shows."""
    maker = load_script("node_reference")
    from importlib import import_module
    classes = import_module(comfy_host.pack.__name__ + ".nodes").NODE_CLASSES
    with open(maker.OUT) as f:
        assert f.read() == maker.render(classes), "docs/NODES.md is stale: run scripts/node_reference.py"
