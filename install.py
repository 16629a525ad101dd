"""Run by ComfyUI-Manager (and comfy-cli) after `pip install -r requirements.txt`.

VideoGrain Flow Trajectories computes optical flow with OpenCV (DIS). OpenCV comes in
several mutually exclusive pip distributions (opencv-python, -headless, -contrib, ...)
that all provide the same `cv2` module: installing a second one over a user's first
breaks both. So OpenCV is not in requirements.txt; this script installs the headless
build only when no `cv2` imports in ComfyUI's Python, and leaves any existing build alone.
"""
import importlib.util
import subprocess
import sys


def main() -> int:
    if importlib.util.find_spec("cv2") is not None:
        print("[ComfyUI-VideoGrain] OpenCV already installed: kept as it is")
        return 0
    print("[ComfyUI-VideoGrain] installing opencv-python-headless (optical flow for trajectory attention)")
    return subprocess.call([sys.executable, "-m", "pip", "install", "opencv-python-headless>=4.8"])


if __name__ == "__main__":
    sys.exit(main())
