"""Helpers shared by the tests: host location, server process control, HTTP client."""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import uuid

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTIFACTS = os.path.join(REPO, "test-artifacts")
PACK_NAME = "ComfyUI-VideoGrain"
# The example workflows: UI format where ComfyUI looks for a custom node's templates, their
# API-format twins (headless runs, these tests, the demo) in a subfolder it does not list.
UI_WORKFLOWS = os.path.join(REPO, "example_workflows")
API_WORKFLOWS = os.path.join(UI_WORKFLOWS, "api")


def workflow_names(folder: str) -> list[str]:
    """The workflows (*.json, without the extension) directly in `folder`, sorted."""
    return sorted(os.path.splitext(n)[0] for n in os.listdir(folder) if n.endswith(".json"))


def pack_template_key(listing: dict) -> str:
    """This pack's category in the host's template listing (GET /workflow_templates: custom
    node folder name -> workflow names). The folder name depends on how the pack was installed
    (git clone: ComfyUI-VideoGrain; the Registry: comfyui-videograin), so match it loosely and
    require exactly one."""
    keys = [k for k in listing if "videograin" in k.lower().replace("-", "").replace("_", "")]
    assert len(keys) == 1, f"expected one VideoGrain template category, got {keys} in {sorted(listing)}"
    return keys[0]


@contextlib.contextmanager
def warnings_logged(logger_name: str = ""):
    """The messages of WARNING and above that `logger_name` (default: the root logger) gets
    inside the block; works with pytest's logging plugin off (-p no:logging)."""
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger(logger_name or None)
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def file_identity(path: str) -> tuple[int, str]:
    """(inode, sha256 of the bytes): a rewrite by temp file + rename makes a new inode, while
    touching the file's times changes neither."""
    with open(path, "rb") as f:
        return os.stat(path).st_ino, hashlib.sha256(f.read()).hexdigest()


def comfyui_path() -> str:
    """The host under test: COMFYUI_PATH, else the default one scripts/setup_host.sh builds."""
    path = _runner.default_comfyui(REPO)
    if not os.path.isfile(os.path.join(path, "main.py")):
        pytest.exit(f"no ComfyUI host at {path}: run scripts/setup_host.sh (or `make test`)", returncode=3)
    return path


def pack_modules(comfy_host, **paths):
    """The pack's modules as the host imported them: pack_modules(host, cache="videograin_core.
    inversion_cache").cache. (The host imports the pack under its folder name.)"""
    from importlib import import_module
    from types import SimpleNamespace
    name = comfy_host.pack.__name__
    return SimpleNamespace(**{k: import_module(f"{name}.{v}") for k, v in paths.items()})


def load_script(name: str, folder: str = "scripts"):
    """Import <folder>/<name>.py (scripts/ and bench/ are not packages)."""
    spec = importlib.util.spec_from_file_location(f"videograin_{folder}_{name}", os.path.join(REPO, folder, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------- server subprocess
_runner = load_script("comfy_runner")
ComfyClient = _runner.ComfyClient
PromptRejected = _runner.PromptRejected
ExecutionFailed = _runner.ExecutionFailed
stop_server = _runner.stop_server
in_process_executor = _runner.in_process_executor


def start_server(workdir, extra_args=(), timeout: float = 300) -> ComfyClient:
    """Start the test host's server (CPU) with its folders under `workdir`; the log goes
    to test-artifacts/."""
    os.makedirs(ARTIFACTS, exist_ok=True)
    log_path = os.path.join(ARTIFACTS, f"server-{os.path.basename(str(workdir))}-{uuid.uuid4().hex[:6]}.log")
    return _runner.start_server(comfyui_path(), str(workdir), log_path, sys.executable, ("--cpu", *extra_args), timeout)


def copy_to_input(client_or_dir, src: str, name: str | None = None) -> str:
    """Copy a file into a host input folder; returns the name to use in a prompt."""
    d = client_or_dir.input_dir if isinstance(client_or_dir, ComfyClient) else str(client_or_dir)
    name = name or os.path.basename(src)
    dst = os.path.join(d, name)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if os.path.isdir(src):
        shutil.copytree(src, dst, dirs_exist_ok=True)
    else:
        shutil.copyfile(src, dst)
    return name


def edit_prompt(ckpt: str, video: str, mask_png: str, *, steps: int = 3, end_percent: float = 0.3,
                prefix: str = "vg_edit/edit", source: bool = False, **loader) -> dict:
    """API prompt of a small one-region edit through every node of the pack: loader ->
    region mask (a mask image in the input folder) -> local prompt -> layout conditioning
    -> patch -> invert -> sample -> decode -> save. Loader options default to 4 frames
    (every 2nd) at 64 px."""
    li = dict(video=video, skip_first_frames=0, select_every_nth=2, frame_load_cap=4, size=64, crop="center")
    li.update(loader)
    save = {"images": ["dec", 0], "fps": ["load", 1], "filename_prefix": prefix, "crf": 19}
    if source:
        save["source"] = ["load", 0]
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "load": {"class_type": "VideoGrainVideoLoader", "inputs": li},
        "mask": {"class_type": "LoadImageMask", "inputs": {"image": mask_png, "channel": "red"}},
        "region": {"class_type": "VideoGrainRegionMask", "inputs": {"mask": ["mask", 0], "transform": ["load", 3],
                                                                    "threshold": 0.5}},
        "local": {"class_type": "VideoGrainLocalPrompt", "inputs": {"mask": ["region", 0], "local_prompt": "red fox"}},
        "cond": {"class_type": "VideoGrainLayoutConditioning", "inputs": {
            "clip": ["ckpt", 1], "global_prompt": "a red fox in the snow", "layout": ["local", 0]}},
        "patch": {"class_type": "VideoGrainSTLayoutPatch", "inputs": {
            "model": ["ckpt", 0], "layout": ["cond", 1], "full_frame_attention": True, "self_strength": 0.3,
            "cross_strength": 1.0, "end_percent": end_percent, "self_branch": "uncond", "size_term": "reference",
            "modulate_full_resolution": False}},
        "empty": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}},
        "enc": {"class_type": "VAEEncode", "inputs": {"pixels": ["load", 0], "vae": ["ckpt", 2]}},
        "inv": {"class_type": "VideoGrainDDIMInvert", "inputs": {
            "model": ["patch", 0], "conditioning": ["empty", 0], "latent": ["enc", 0], "steps": steps, "cfg": 1.0,
            "use_cache": True}},
        "sample": {"class_type": "VideoGrainSample", "inputs": {
            "model": ["patch", 0], "positive": ["cond", 0], "negative": ["empty", 0], "inversion": ["inv", 1],
            "cfg": 7.5, "layout": ["cond", 1], "blend": "inversion trajectory", "seed": 0}},
        "dec": {"class_type": "VideoGrainDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2],
                                                             "max_frames_per_chunk": 2}},
        "save": {"class_type": "VideoGrainSaveVideo", "inputs": save},
    }
