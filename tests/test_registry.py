"""The pack as the Comfy Registry, comfy-cli and ComfyUI-Manager see it: pyproject.toml (the
fields the Registry reads, by its rules), the LICENSE, the icon, the install instructions,
and the example workflows the pack ships (valid UI-format graphs of node types the host and
this pack provide, each with an API-format twin that is the same graph)."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re

import pytest
from vg_testlib import API_WORKFLOWS, REPO, UI_WORKFLOWS, workflow_names

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO_URL = "https://github.com/videograin/ComfyUI-VideoGrain"
RAW_URL = "https://raw.githubusercontent.com/videograin/ComfyUI-VideoGrain/main/"
# sha256 of the GPL version 3 text as the FSF publishes it (gpl-3.0.txt; Debian's
# /usr/share/common-licenses/GPL-3 is the same file).
GPL3_SHA256 = "3972dc9744f6499f0f9b2dbf76696f2ae7ad8af9b23dde66d6af86c9dfb36986"
# What comfy-cli (which publishes to the Registry) accepts; one Environment classifier outside
# this set and it sends no accelerator at all.
REGISTRY_OS_PREFIXES = ("Microsoft", "POSIX", "MacOS", "OS Independent")
REGISTRY_ACCELERATORS = {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "NPU :: Huawei Ascend",
                         "GPU :: Apple Metal"}
# Its version-range rule for requires-comfyui: comma-separated [operator]X.Y.Z[-suffix].
REGISTRY_VERSION_PART = re.compile(r"^(?:(==|>=|<=|!=|~=|>|<|<>|=)\s*)?(\d+\.\d+\.\d+(?:-[a-zA-Z0-9]+)?)?$")
FRONTEND_ONLY = {"Note", "MarkdownNote"}  # node types the frontend defines, not the server
UI_NAMES = workflow_names(UI_WORKFLOWS)


@pytest.fixture(scope="module")
def pyproject():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _read(rel: str) -> str:
    with open(os.path.join(REPO, rel), encoding="utf-8") as f:
        return f.read()


# ---------------------------------------------------------------- pyproject.toml
def test_project_table_follows_the_registry_rules(pyproject):
    p = pyproject["project"]
    # the node id: < 100 characters, letters/digits with single - _ . between, starts with a letter
    assert len(p["name"]) < 100 and re.fullmatch(r"[A-Za-z][A-Za-z0-9]*(?:[-_.][A-Za-z0-9]+)*", p["name"]), p["name"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", p["version"]), p["version"]  # X.Y.Z, as the Registry wants
    assert p["description"].strip() and p["readme"] == "README.md"
    assert re.fullmatch(r">=3\.\d+", p["requires-python"])
    # the same runtime dependencies as requirements.txt (what the Manager and pip install)
    reqs = [ln.strip() for ln in _read("requirements.txt").splitlines() if ln.strip() and not ln.startswith("#")]
    assert p["dependencies"] == reqs
    urls = p["urls"]
    assert urls["Repository"] == REPO_URL
    for key in ("Documentation", "Bug Tracker", "Issues"):
        assert urls[key].startswith(REPO_URL), key


def test_license_is_the_unmodified_gpl3_and_declared_as_such(pyproject):
    p = pyproject["project"]
    assert p["license"] == "GPL-3.0-or-later"  # an SPDX expression (PEP 639); comfy-cli sends it as the licence text
    try:
        from packaging.licenses import canonicalize_license_expression
    except ImportError:  # packaging < 24.2
        pass
    else:
        assert canonicalize_license_expression(p["license"]) == p["license"]
    assert p["license-files"] == ["LICENSE"]
    with open(os.path.join(REPO, "LICENSE"), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == GPL3_SHA256
    # PEP 639: no licence classifiers beside a licence expression
    assert not [c for c in p["classifiers"] if c.startswith("License ::")]


def test_classifiers_are_the_ones_the_registry_reads(pyproject):
    cls = pyproject["project"]["classifiers"]
    os_values = [c[len("Operating System :: "):] for c in cls if c.startswith("Operating System :: ")]
    assert os_values and all(v.startswith(REGISTRY_OS_PREFIXES) for v in os_values), os_values
    accelerators = [c[len("Environment :: "):] for c in cls if c.startswith("Environment ::")]
    assert accelerators and set(accelerators) <= REGISTRY_ACCELERATORS, accelerators
    assert "Programming Language :: Python :: 3" in cls
    assert len(set(cls)) == len(cls)


def test_tool_comfy_table(pyproject):
    c = pyproject["tool"]["comfy"]
    assert re.fullmatch(r"[a-z][a-z0-9-]*", c["PublisherId"]), c["PublisherId"]
    assert c["DisplayName"].strip()
    parts = [s.strip() for s in c["requires-comfyui"].split(",")]
    assert all(REGISTRY_VERSION_PART.match(s) for s in parts), c["requires-comfyui"]
    lower = next(s[2:].strip() for s in parts if s.startswith(">="))
    assert f"ComfyUI ≥ {lower}" in _read("README.md")  # the README states the same minimum
    assert isinstance(c["includes"], list)
    for rel in c["includes"]:
        assert os.path.exists(os.path.join(REPO, rel)), rel


def test_icon_is_a_small_square_image_in_the_repository(pyproject):
    from PIL import Image
    url = pyproject["tool"]["comfy"]["Icon"]
    assert url.startswith(RAW_URL), url  # served from this repository's main branch
    path = os.path.join(REPO, url[len(RAW_URL):])
    assert os.path.isfile(path), path
    assert os.path.getsize(path) < 100 * 1024
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format in ("PNG", "JPEG", "GIF"), im.format  # the Registry takes SVG, PNG, JPG or GIF
        w, h = im.size
        assert w == h and 64 <= w <= 400, im.size  # square, within the Registry's 800x400
        pixels = im.convert("RGBA")
    # and it is what the committed script draws (a small tolerance for Pillow's resampling)
    spec = importlib.util.spec_from_file_location("videograin_make_icon", os.path.join(REPO, "scripts", "make_icon.py"))
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    drawn = maker.draw(w)
    diff = [abs(a - b) for a, b in zip(pixels.tobytes(), drawn.convert("RGBA").tobytes())]
    assert sum(diff) / len(diff) < 1.0 and max(diff) < 64


def test_readme_install_section_matches_the_metadata(pyproject):
    readme = _read("README.md")
    section = readme[readme.index("## Install into an existing ComfyUI"):readme.index("## The two commands")]
    assert f"comfy node install {pyproject['project']['name']}" in section
    assert f"git clone {REPO_URL}" in section
    assert "Custom Nodes Manager" in section and "requirements.txt" in section


# ---------------------------------------------------------------- example workflows
def test_example_workflow_folders():
    """UI workflows at the top of example_workflows/ (what the host lists as templates), their
    API twins, of the same names, in api/, and no second folder a host would list templates from."""
    assert len(UI_NAMES) >= 4
    assert workflow_names(API_WORKFLOWS) == UI_NAMES
    assert set(os.listdir(UI_WORKFLOWS)) == {n + ".json" for n in UI_NAMES} | {"api"}
    for other in ("example", "examples", "workflow", "workflows"):  # also read by ComfyUI 0.3.75 - 0.8.0
        assert not os.path.exists(os.path.join(REPO, other)), other


def _load(folder: str, name: str) -> dict:
    with open(os.path.join(folder, name + ".json")) as f:
        return json.load(f)


@pytest.mark.parametrize("name", UI_NAMES)
def test_ui_workflow_is_a_consistent_ui_graph(name):
    g = _load(UI_WORKFLOWS, name)
    assert isinstance(g.get("nodes"), list) and isinstance(g.get("links"), list) and "version" in g
    nodes = {n["id"]: n for n in g["nodes"]}
    assert len(nodes) == len(g["nodes"]) and g["last_node_id"] >= max(nodes)
    for n in g["nodes"]:
        assert isinstance(n["type"], str) and len(n["pos"]) == 2 and len(n["size"]) == 2, n["id"]
    links = {}
    for link in g["links"]:
        lid, src, src_slot, dst, dst_slot, kind = link
        assert lid not in links
        links[lid] = link
        out, inp = nodes[src]["outputs"][src_slot], nodes[dst]["inputs"][dst_slot]
        assert lid in out["links"] and inp["link"] == lid, link
        assert kind == out["type"] and inp["type"] in (kind, "*"), link
    assert not links or g["last_link_id"] >= max(links)
    # every link a node names is in the link table
    named = {i["link"] for n in g["nodes"] for i in n.get("inputs", []) if i.get("link") is not None}
    named |= {lid for n in g["nodes"] for o in n.get("outputs", []) for lid in (o.get("links") or [])}
    assert named == set(links)


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.get("/api/object_info")


@pytest.mark.server
@pytest.mark.parametrize("name", UI_NAMES)
def test_workflow_node_types_exist_in_the_host_and_the_pack(name, object_info):
    types = {n["type"] for n in _load(UI_WORKFLOWS, name)["nodes"]}
    assert not types - set(object_info) - FRONTEND_ONLY, types - set(object_info) - FRONTEND_ONLY
    pack = {t for t in types if t.startswith("VideoGrain")}
    assert pack
    for t in pack:  # served by this pack (loaded from custom_nodes), not by something else
        module = object_info[t]["python_module"]
        assert module.startswith("custom_nodes.") and "videograin" in module.lower(), (t, module)


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


@pytest.mark.server
@pytest.mark.parametrize("name", UI_NAMES)
def test_api_twin_is_the_same_graph(name, object_info):
    ui, api = _load(UI_WORKFLOWS, name), _load(API_WORKFLOWS, name)
    nodes = {str(n["id"]): n for n in ui["nodes"] if n["type"] not in FRONTEND_ONLY}
    assert {k: n["type"] for k, n in nodes.items()} == {k: v["class_type"] for k, v in api.items()}
    links = {link[0]: link for link in ui["links"]}
    for k, n in nodes.items():
        inputs = api[k]["inputs"]
        spec = object_info[n["type"]]["input"]
        assert set(inputs) <= set(spec.get("required", {})) | set(spec.get("optional", {})), (k, n["type"])
        wired = {i["name"]: [str(links[i["link"]][1]), links[i["link"]][2]]
                 for i in n.get("inputs", []) if i.get("link") is not None}
        assert wired == {key: v for key, v in inputs.items() if isinstance(v, list)}, (k, n["type"])
        values = n.get("widgets_values") or []
        values = list(values.values()) if isinstance(values, dict) else values
        for key, v in inputs.items():
            if not isinstance(v, list):
                assert any(_same(v, w) for w in values), (k, n["type"], key, v, values)
