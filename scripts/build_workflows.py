"""Turn the API-format workflows (example_workflows/api/*.json) into UI-format workflows
(example_workflows/*.json) with the real ComfyUI frontend, so the UI files are exactly what the
frontend saves: it loads each API graph (`app.loadApiJson`), lays it out, adds the notes
below, and serialises it (`app.graph.serialize()`).

    python scripts/build_workflows.py --comfyui PATH [--check]

--check: do not write; fail if a UI workflow's nodes (all but their sizes, which depend on
the fonts installed) differ from what the frontend makes of its API twin, or if a UI
workflow has no API twin (used to keep the two in step). Run it on the host the files were
made with (the 0.3.75 test host, frontend 1.32.9): newer frontends save some fields
differently (1.35.9, in ComfyUI 0.8.0, names outputs by their display names), though they
load these files as they are (the browser test checks that on whichever host it runs).
example_workflows/ is the folder ComfyUI lists a custom node's templates from (only its
top-level *.json), so the API twins in its api/ subfolder are not offered as templates.
The host must have this pack installed and a checkpoint named as in the workflows (the
test models are enough: `scripts/make_test_models.py`).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
UI_DIR = os.path.join(REPO, "example_workflows")  # UI format: what ComfyUI offers as templates
API_DIR = os.path.join(UI_DIR, "api")             # API format: headless runs, the tests, the demo
sys.path.insert(0, HERE)
import comfy_runner  # noqa: E402

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

# Notes shown on the canvas (UI-only nodes, so they live here and not in the API files).
NOTES = {
    "controlnet_canny_edit": (
        "ControlNet: this workflow uses core Canny as the preprocessor so it runs with core "
        "nodes only. For depth or pose (what VideoGrain used: depth for most edits, pose for "
        "people), install a preprocessor pack such as comfyui_controlnet_aux and replace the "
        "Canny node with its Depth Anything / DWPose node; load the matching SD1.5 ControlNet "
        "(control_v11f1p_sd15_depth / control_v11p_sd15_openpose). The same conditioning "
        "(with its ControlNet) feeds the inversion and the edit. Strength 0.5-1.0."),
    "instance_level_edit": (
        "Instance-level edit: one region per person plus the background, each with its own "
        "local prompt. Every local prompt must appear word for word inside the global prompt. "
        "Region masks: one PNG per frame per region in input/vtest_two_people_masks/<region>/ "
        "(any MASK source works: SAM2, the mask editor, core mask nodes)."),
    "class_level_edit": (
        "Class-level edit: one region for all people (the union of their masks) and one for "
        "the background. The Metrics branch scores the edit (CLIP-T, CLIP-F, Warp-Err, Q-edit, "
        "as the paper): put openai's clip-vit-large-patch14 model.safetensors (both halves) in "
        "models/clip_vision as clip-vit-large-patch14.safetensors, or delete the two Metrics "
        "nodes; the edit runs either way."),
    "attention_maps_view": (
        "Attention maps: Attention Capture records each listed word's cross-attention map "
        "while DDIM Invert runs on the source prompt; Attention View draws them over the "
        "frames (word by word, frames in order). Put the capture in front of Sample instead "
        "to see where the edit's words land. The words must appear in the capture's prompt."),
    "mask_free_edit": (
        "Mask-free edit: no masks are drawn. A first inversion with Attention Capture records "
        "the self-attention features of all frames; Auto Regions clusters them into K regions "
        "(the same region in every frame) and names each by the capture's words. Check its "
        "preview and names, then give each mask_k its local prompt (swap them if the people "
        "came out as mask_2). The edit then runs as the class-level one."),
    "part_level_edit": (
        "Part-level edit: the head region is carved out of the left person's region "
        "(MaskComposite subtract) and gets the new part; the rest of the person, the other "
        "person and the background get prompts that describe the source, so only the head "
        "changes."),
    "video_p2p_tuned": (
        "Video-P2P with its optional T2S tuning: T2S Tune tunes the attention queries and a "
        "temporal attention on this clip (source prompt, VAE-encoded frames) and saves the "
        "result to output/videograin_t2s/ (T2S Load puts it back on the model later). The "
        "tuned model inverts and edits, with frame attention 'first frame' as it was tuned. "
        "30 steps keep the example short; the paper tunes 300-500 (a GPU is advised)."),
}

BUILD_JS = """async ([api, name, note]) => {
    const app = window.app;
    await app.loadApiJson(api, name);
    // Seeds stay as written: the examples must reproduce.
    for (const n of app.graph.nodes) {
        for (const w of (n.widgets || [])) {
            if (w.name === 'control_after_generate') w.value = 'fixed';
        }
    }
    // Lay the graph out in columns by depth (sources left), wrapped into rows so the
    // whole graph reads at a useful zoom.
    const nodes = app.graph.nodes, depth = new Map();
    const inputsOf = n => (n.inputs || []).filter(i => i.link != null).map(i => app.graph.links[i.link]?.origin_id ?? app.graph.getLink?.(i.link)?.origin_id);
    const d = n => {
        if (depth.has(n.id)) return depth.get(n.id);
        depth.set(n.id, 0);
        const v = Math.max(-1, ...inputsOf(n).map(id => d(app.graph.getNodeById(id)))) + 1;
        depth.set(n.id, v);
        return v;
    };
    nodes.forEach(d);
    const perRow = 6, colW = 470, columns = new Map();
    for (const n of [...nodes].sort((a, b) => a.id - b.id)) {
        const k = depth.get(n.id);
        if (!columns.has(k)) columns.set(k, []);
        columns.get(k).push(n);
    }
    let rowTop = 0, rowHeight = 0;
    for (const k of [...columns.keys()].sort((a, b) => a - b)) {
        if (k % perRow === 0 && k > 0) { rowTop += rowHeight + 120; rowHeight = 0; }
        let y = rowTop;
        for (const n of columns.get(k)) {
            n.pos = [(k % perRow) * colW, y];
            y += n.size[1] + 70;
        }
        rowHeight = Math.max(rowHeight, y - rowTop);
    }
    if (note) {
        const n = window.LiteGraph.createNode('Note');
        n.widgets[0].value = note;
        let minX = Infinity, minY = Infinity;
        for (const m of app.graph.nodes) { minX = Math.min(minX, m.pos[0]); minY = Math.min(minY, m.pos[1]); }
        n.pos = [minX, minY - 220];
        n.size = [520, 180];
        app.graph.add(n);
    }
    // Open with the whole graph in view (the view is saved in extra.ds).
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (const m of app.graph.nodes) {
        x0 = Math.min(x0, m.pos[0]); y0 = Math.min(y0, m.pos[1] - 40);
        x1 = Math.max(x1, m.pos[0] + m.size[0]); y1 = Math.max(y1, m.pos[1] + m.size[1]);
    }
    const el = app.canvas.canvas, ds = app.canvas.ds;
    const scale = Math.min(el.width / (x1 - x0), el.height / (y1 - y0)) * 0.95;
    ds.scale = scale;
    ds.offset = [-x0 + (el.width / scale - (x1 - x0)) / 2, -y0 + (el.height / scale - (y1 - y0)) / 2];
    app.canvas.setDirty(true, true);
    // As the frontend's own save does: JSON text (undefined fields are left out, not null).
    return JSON.stringify(app.graph.serialize());
}"""


def open_ui(pw, client):
    browser = pw.chromium.launch(executable_path=os.environ.get("CHROMIUM", "/usr/bin/chromium"), args=CHROMIUM_ARGS)
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    # Only the local server: the frontend's calls to the internet (release news, update
    # notices) would make what it shows depend on the network.
    local = client.base_url.rstrip("/")
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(local) else route.abort())
    page.goto(client.base_url, wait_until="load", timeout=120000)
    page.wait_for_function("window.app && window.app.graph && window.LiteGraph", timeout=90000)
    return browser, page


def _comparable(graph: dict) -> list[dict]:
    """The nodes without their sizes: the frontend sizes a node to its text as the browser's
    fonts measure it, so widths differ between machines with different fonts installed."""
    return [{k: v for k, v in n.items() if k != "size"} for n in graph["nodes"]]


def build(comfy: str, check: bool = False) -> int:
    from playwright.sync_api import sync_playwright
    api_files = sorted(glob.glob(os.path.join(API_DIR, "*.json")))
    if not api_files:
        print(f"no {os.path.relpath(API_DIR, REPO)}/*.json", file=sys.stderr)
        return 2
    work = tempfile.mkdtemp(prefix="vg-build-")
    client = comfy_runner.start_server(comfy, work, os.path.join(work, "server.log"),
                                       os.environ.get("HOST_PYTHON", sys.executable), ("--cpu",))
    stale = []
    try:
        client.post("/settings/Comfy.TutorialCompleted", True)
        with sync_playwright() as pw:
            browser, page = open_ui(pw, client)
            for path in api_files:
                name = os.path.splitext(os.path.basename(path))[0]
                with open(path) as f:
                    api = json.load(f)
                graph = json.loads(page.evaluate(BUILD_JS, [api, name, NOTES.get(name)]))
                out = os.path.join(UI_DIR, name + ".json")
                text = json.dumps(graph, indent=2) + "\n"
                if check:
                    if not os.path.isfile(out):
                        stale.append(name + " (missing)")
                        continue
                    with open(out) as f:
                        if _comparable(json.load(f)) != _comparable(graph):
                            stale.append(name)
                else:
                    with open(out, "w") as f:
                        f.write(text)
                    print("wrote", os.path.relpath(out, REPO))
            browser.close()
    finally:
        comfy_runner.stop_server(client)
    if check:  # a UI workflow with no API twin would be offered as a template but never tested
        twins = {os.path.basename(p) for p in api_files}
        stale += [os.path.basename(p) + " (no API twin)" for p in sorted(glob.glob(os.path.join(UI_DIR, "*.json")))
                  if os.path.basename(p) not in twins]
    if stale:
        print("stale UI workflows (rebuild with scripts/build_workflows.py):", ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfyui", default=comfy_runner.default_comfyui(REPO))
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args()
    raise SystemExit(build(a.comfyui, a.check))
