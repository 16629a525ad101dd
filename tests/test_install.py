"""install.py (run by ComfyUI-Manager / comfy-cli): OpenCV is installed only where no cv2 exists."""
from __future__ import annotations

import os
import subprocess
import sys

from vg_testlib import REPO

PROBE = """
import importlib.util, runpy, subprocess, sys
real = importlib.util.find_spec
if {hide}:
    importlib.util.find_spec = lambda name, *a: None if name == "cv2" else real(name, *a)
subprocess.call = lambda args, **kw: print("PIP", " ".join(args[1:])) or 0
try:
    runpy.run_path({path!r}, run_name="__main__")
except SystemExit as e:
    print("EXIT", e.code)
"""


def _run(hide: bool) -> str:
    code = PROBE.format(hide=hide, path=os.path.join(REPO, "install.py"))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout


def test_an_existing_opencv_is_left_alone():
    out = _run(hide=False)
    assert "kept as it is" in out and "PIP" not in out and "EXIT 0" in out


def test_without_opencv_the_headless_build_is_installed():
    out = _run(hide=True)
    assert "PIP -m pip install opencv-python-headless>=4.8" in out and "EXIT 0" in out
