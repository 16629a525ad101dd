"""Helpers shared by the tests: host location, server process control, HTTP client."""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import uuid

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTIFACTS = os.path.join(REPO, "test-artifacts")
PACK_NAME = "ComfyUI-VideoGrain"


def comfyui_path() -> str:
    path = os.environ.get("COMFYUI_PATH") or os.path.join(REPO, ".host", "ComfyUI")
    if not os.path.isfile(os.path.join(path, "main.py")):
        pytest.exit(f"no ComfyUI host at {path}: run scripts/setup_host.sh (or `make test`)", returncode=3)
    return path


def load_script(name: str):
    """Import scripts/<name>.py (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(f"videograin_scripts_{name}", os.path.join(REPO, "scripts", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------- server subprocess
_runner = load_script("comfy_runner")
ComfyClient = _runner.ComfyClient
PromptRejected = _runner.PromptRejected
ExecutionFailed = _runner.ExecutionFailed
stop_server = _runner.stop_server


def start_server(workdir, extra_args=(), timeout: float = 120) -> ComfyClient:
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
