"""Every example workflow runs through the real server with the small test models and
writes videos with the expected frame count and size; the host offers them as the pack's
templates; the demo command's code path runs end to end."""
from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys

import av
import pytest
from vg_testlib import (API_WORKFLOWS as API_DIR, REPO, UI_WORKFLOWS as UI_DIR, comfyui_path, copy_to_input,
                        pack_template_key, workflow_names)

WORKFLOWS = workflow_names(API_DIR)
FRAMES, SIZE, STEPS = 3, 64, 2


def _video_facts(path):
    with av.open(path) as c:
        s = c.streams.video[0]
        frames = sum(1 for _ in c.decode(s))
        return frames, s.codec_context.width, s.codec_context.height, float(s.average_rate)


def _expected_size():
    """The loader's output size for the sample clip at SIZE (short side), centre crop to /8."""
    _, w, h, _ = _video_facts(os.path.join(REPO, "example_data", "vtest_two_people.mp4"))
    scale = SIZE / min(w, h)
    rw, rh = round(w * scale), round(h * scale)
    return rw // 8 * 8, rh // 8 * 8


def _for_test(prompt: dict, test_models) -> dict:
    for node in prompt.values():
        t, inp = node["class_type"], node["inputs"]
        if t == "CheckpointLoaderSimple":
            inp["ckpt_name"] = test_models.small_name
        elif t == "ControlNetLoader":
            inp["control_net_name"] = test_models.small_cnet_name
        elif t == "VideoGrainVideoLoader":
            inp.update(frame_load_cap=FRAMES, size=SIZE)
        elif t == "VideoGrainDDIMInvert":
            inp["steps"] = STEPS
        elif t == "VideoGrainT2STune":
            inp["steps"] = STEPS
        elif t == "VideoGrainMetricsCLIPLoader":
            inp["clip_name"] = test_models.clip_name
    return prompt


@pytest.fixture(scope="module")
def sample_inputs(comfy_server, test_models):
    copy_to_input(comfy_server, os.path.join(REPO, "example_data", "vtest_two_people.mp4"))
    copy_to_input(comfy_server, os.path.join(REPO, "example_data", "masks"), "vtest_two_people_masks")
    # the random CLIP ViT-L/14 the metrics branch scores with (in place of openai's file)
    maker = __import__("vg_testlib").load_script("make_test_models")
    test_models.clip_name = maker.write_clip_pair(os.path.join(comfyui_path(), "models"))


def test_workflow_set_is_complete():
    assert {"instance_level_edit", "class_level_edit", "part_level_edit", "controlnet_canny_edit",
            "attention_maps_view", "mask_free_edit", "video_p2p_word_swap", "video_p2p_refine"} <= set(WORKFLOWS)
    for name in WORKFLOWS:
        ui_path = os.path.join(UI_DIR, name + ".json")
        assert os.path.isfile(ui_path), f"{name}: no UI-format twin (scripts/build_workflows.py)"
        with open(ui_path) as f:
            ui = json.load(f)
        with open(os.path.join(API_DIR, name + ".json")) as f:
            api = json.load(f)
        ui_nodes = {str(n["id"]): n["type"] for n in ui["nodes"] if n["type"] != "Note"}
        assert ui_nodes == {k: v["class_type"] for k, v in api.items()}
        types = set(ui_nodes.values())
        allowed_core = {"CheckpointLoaderSimple", "CLIPTextEncode", "MaskComposite", "Canny", "ControlNetLoader",
                        "ControlNetApplyAdvanced", "VAEEncode"}
        assert all(t.startswith("VideoGrain") or t in allowed_core for t in types), types


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_runs_through_the_server(name, comfy_server, test_models, sample_inputs):
    with open(os.path.join(API_DIR, name + ".json")) as f:
        prompt = _for_test(json.load(f), test_models)
    entry = comfy_server.run(prompt, timeout=900)
    save_id = next(k for k, v in prompt.items() if v["class_type"] == "VideoGrainSaveVideo")
    save = prompt[save_id]["inputs"]
    files = entry["outputs"][save_id]
    items = [i for v in files.values() if isinstance(v, list) for i in v if isinstance(i, dict) and "filename" in i]
    paths = [os.path.join(comfy_server.output_dir, i.get("subfolder", ""), i["filename"]) for i in items]
    w, h = _expected_size()
    _, _, _, src_fps = _video_facts(os.path.join(REPO, "example_data", "vtest_two_people.mp4"))
    facts = sorted(_video_facts(p) for p in paths)
    shown_by = prompt[save["images"][0]]
    if shown_by["class_type"] == "VideoGrainAttentionView":
        # one frame per word per source frame, drawn on the frames at their size
        words = [x for x in prompt[shown_by["inputs"]["capture"][0]]["inputs"]["words"].split(",") if x.strip()]
        assert "source" not in save and len(paths) == 1, files
        assert facts[0][:3] == (FRAMES * len(words), w, h)
    else:
        assert len(paths) == 2, files  # the edit and the side-by-side comparison
        (n1, w1, h1, fps1), (n2, w2, h2, fps2) = facts
        assert n1 == n2 == FRAMES
        assert (w1, h1) == (w, h) and (w2, h2) == (2 * w, h)
        assert abs(fps2 - src_fps) < 0.01
    assert abs(facts[0][3] - src_fps) < 0.01
    for node_id, node in prompt.items():
        if node["class_type"] == "VideoGrainMetrics":  # the metrics branch scored the edit
            (table,) = entry["outputs"][node_id]["text"]
            assert f"{FRAMES} frames" in table and re.search(r"^Q-edit\s+\S+", table, re.M), table
        elif node["class_type"] == "VideoGrainAutoRegions":  # mask-free: its masks made the layout
            assert any(v["class_type"] == "VideoGrainLocalPrompt" and v["inputs"]["mask"][0] == node_id
                       for v in prompt.values())


def test_host_offers_the_ui_workflows_as_templates(comfy_server):
    """Through the host's own template API (the routes the frontend's Templates dialog uses),
    whichever host runs the tests: the pack's category lists each UI workflow of
    example_workflows/ exactly once and nothing else (an API twin listed too would show up as
    a second entry of the same name), and serves this checkout's files."""
    listed = comfy_server.get("/api/workflow_templates")
    key = pack_template_key(listed)
    ui_names = workflow_names(UI_DIR)
    assert sorted(listed[key]) == ui_names, listed[key]
    assert ui_names == WORKFLOWS  # each template has its API twin
    for name in ui_names:
        served = comfy_server.get(f"/api/workflow_templates/{key}/{name}.json")
        with open(os.path.join(UI_DIR, name + ".json")) as f:
            assert served == json.load(f), name
        assert isinstance(served.get("nodes"), list), name  # UI format, not an API twin


def test_demo_command_runs_end_to_end(tmp_path, test_models):
    out = tmp_path / "output"
    env = dict(os.environ, COMFYUI_PATH=comfyui_path())
    p = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "demo.py"), "--frames", str(FRAMES),
                        "--size", str(SIZE), "--steps", str(STEPS), "--output", str(out), "--cpu"],
                       capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert "RANDOMLY INITIALISED" in p.stdout  # the loud warning when no checkpoint is named
    assert "running VideoGrainSample" in p.stdout and "step " in p.stdout  # progress as it goes
    videos = sorted(glob.glob(str(out / "videograin" / "*.mp4")))
    assert len(videos) == 2, p.stdout[-3000:]
    for v in videos:
        assert f"wrote {v}" in p.stdout or os.path.relpath(v) in p.stdout
        assert _video_facts(v)[0] == FRAMES


def test_full_size_sd15_checkpoint_runs_the_instance_edit(comfy_server, test_models, sample_inputs):
    """The real SD1.5 sizes (UNet, CLIP-L, KL VAE) through the whole chain: shapes, key
    names and weight fingerprints of a user's checkpoint, not only of the small model."""
    maker = __import__("vg_testlib").load_script("make_test_models")
    full = maker.write_model(os.path.join(comfyui_path(), "models"), "full")
    with open(os.path.join(API_DIR, "instance_level_edit.json")) as f:
        prompt = _for_test(json.load(f), test_models)
    for node in prompt.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            node["inputs"]["ckpt_name"] = os.path.basename(full)
        elif node["class_type"] == "VideoGrainVideoLoader":
            node["inputs"]["frame_load_cap"] = 2
    entry = comfy_server.run(prompt, timeout=900)
    save_id = next(k for k, v in prompt.items() if v["class_type"] == "VideoGrainSaveVideo")
    items = [i for v in entry["outputs"][save_id].values() if isinstance(v, list) for i in v if isinstance(i, dict)]
    assert len(items) == 2
    assert _video_facts(os.path.join(comfy_server.output_dir, items[0].get("subfolder", ""), items[0]["filename"]))[0] == 2
