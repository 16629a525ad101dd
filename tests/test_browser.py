"""The web UI in headless Chromium (Debian's package, driven by Playwright from PyPI; no
browser download): the frontend finds the example workflows among the host's templates,
each one, fetched from the host as the Templates dialog fetches it, loads with no node
missing or in error, and converts back to exactly its API-format twin. Host-agnostic: the
templates come from whatever the running host lists and serves. Screenshots go to
test-artifacts/browser/."""
from __future__ import annotations

import glob
import json
import os
import shutil

import pytest
from vg_testlib import API_WORKFLOWS, ARTIFACTS, UI_WORKFLOWS, load_script, pack_template_key, workflow_names

pytestmark = pytest.mark.browser
UI_FILES = sorted(glob.glob(os.path.join(UI_WORKFLOWS, "*.json")))
SHOTS = os.path.join(ARTIFACTS, "browser")

# The frontend's own API client: the template listing, then one template as the Templates
# dialog fetches it (GET /api/workflow_templates/<category>/<name>.json).
LIST_TEMPLATES_JS = "async () => await window.app.api.getWorkflowTemplates()"
FETCH_TEMPLATE_JS = """async ([category, name]) => {
    const r = await fetch(window.app.api.apiURL(`/workflow_templates/${category}/${name}.json`));
    return {status: r.status, graph: r.ok ? await r.json() : null};
}"""

CHECK_JS = """async (graph) => {
    const app = window.app;
    await app.loadGraphData(graph);
    await new Promise(r => setTimeout(r, 500));
    const nodes = app.graph.nodes;
    const missing = nodes.filter(n => !window.LiteGraph.registered_node_types[n.type]).map(n => n.type);
    const errored = nodes.filter(n => n.has_errors).map(n => n.type);
    // every dialog, alert or toast the frontend shows (schema errors come as an alert)
    const dialogs = Array.from(document.querySelectorAll('.p-dialog, [role=dialog], [role=alert], .p-toast-message, .comfy-modal'))
        .filter(d => d.offsetParent !== null).map(d => d.innerText);
    const prompt = (await app.graphToPrompt()).output;
    return {missing, errored, dialogs, prompt, count: nodes.length};
}"""


@pytest.fixture(scope="module")
def ui_page(comfy_server):
    if not shutil.which(os.environ.get("CHROMIUM", "chromium")) and not os.path.exists("/usr/bin/chromium"):
        pytest.fail("Debian's chromium is not installed: run scripts/setup_system.sh")
    from playwright.sync_api import sync_playwright
    builder = load_script("build_workflows")
    comfy_server.post("/settings/Comfy.TutorialCompleted", True)
    # screenshots that can be read: draw node text at any zoom, no minimap over the graph
    comfy_server.post("/settings/LiteGraph.Canvas.MinFontSizeForLOD", 1)
    comfy_server.post("/settings/Comfy.Minimap.Visible", False)
    with sync_playwright() as pw:
        browser, page = builder.open_ui(pw, comfy_server)
        yield page
        browser.close()


@pytest.fixture(scope="module")
def template_category(ui_page):
    return pack_template_key(ui_page.evaluate(LIST_TEMPLATES_JS))


def test_every_workflow_has_a_ui_file():
    assert len(UI_FILES) >= 4


def test_the_ui_lists_each_example_workflow_once_as_a_template(ui_page, template_category):
    listed = ui_page.evaluate(LIST_TEMPLATES_JS)[template_category]
    assert sorted(listed) == workflow_names(UI_WORKFLOWS), listed  # no API twin among them


@pytest.mark.parametrize("path", UI_FILES, ids=[os.path.basename(p) for p in UI_FILES])
def test_workflow_loads_in_the_ui_without_missing_or_broken_nodes(path, ui_page, comfy_server, template_category):
    name = os.path.splitext(os.path.basename(path))[0]
    served = ui_page.evaluate(FETCH_TEMPLATE_JS, [template_category, name])
    assert served["status"] == 200, served["status"]
    graph = served["graph"]
    with open(path) as f:
        assert graph == json.load(f)  # the host serves this checkout's file
    res = ui_page.evaluate(CHECK_JS, graph)
    os.makedirs(SHOTS, exist_ok=True)
    ui_page.screenshot(path=os.path.join(SHOTS, name + ".png"))
    assert res["missing"] == [], res["missing"]
    assert res["errored"] == [], res["errored"]
    assert res["dialogs"] == [], res["dialogs"]  # no missing-nodes dialog, no schema alert, no error toast
    assert res["count"] == len(graph["nodes"])
    with open(os.path.join(API_WORKFLOWS, name + ".json")) as f:
        api = json.load(f)
    info = comfy_server.get("/object_info")

    def declared(node):  # UI-only widgets (e.g. the upload preview) are not node inputs
        spec = info[node["class_type"]]["input"]
        names = set(spec.get("required", {})) | set(spec.get("optional", {}))
        return {k: v for k, v in node["inputs"].items() if k in names}
    got = {k: {"class_type": v["class_type"], "inputs": declared(v)} for k, v in res["prompt"].items()}
    want = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
    for k in want:
        assert got.get(k) == want[k], json.dumps([k, got.get(k), want[k]])
    assert got.keys() == want.keys()
