"""VideoGrainFlowTrajectories: optical flow of the source frames -> the trajectories that
trajectory attention follows (METHOD.md section 8). DIS (OpenCV, no weights) by default;
RAFT-Large (torchvision) from a weights file the user puts in models/optical_flow/."""
from __future__ import annotations

import os

import comfy.model_management
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io

from ..videograin_core.trajectories.flow import RAFT_FILE_EXTENSIONS, clip_flows, dis_flow, raft_flow
from ..videograin_core.trajectories.stage import ClipTrajectories
from .wire_types import TRAJECTORIES

FLOW_FOLDER = "optical_flow"
METHOD_DIS = "DIS (OpenCV)"
METHOD_RAFT = "RAFT (torchvision)"
NO_WEIGHTS = "none"


# models/optical_flow/ (extra_model_paths.yaml may add more folders under this name)
folder_paths.add_model_folder_path(FLOW_FOLDER, os.path.join(folder_paths.models_dir, FLOW_FOLDER), is_default=True)


def _raft_files() -> list[str]:
    return [NO_WEIGHTS] + [f for f in folder_paths.get_filename_list(FLOW_FOLDER)
                           if f.lower().endswith(RAFT_FILE_EXTENSIONS)]


def _estimator(method: str, raft_weights: str):
    if method == METHOD_DIS:
        try:
            import cv2  # noqa: F401
        except ImportError:
            raise ValueError("method: DIS optical flow needs OpenCV, which is not installed in ComfyUI's Python: "
                             "install it with `python -m pip install opencv-python-headless` (or keep the OpenCV "
                             "build you have), or choose RAFT with a weights file") from None
        return dis_flow("medium")
    if method != METHOD_RAFT:
        raise ValueError(f"method must be {METHOD_DIS!r} or {METHOD_RAFT!r}, got {method!r}")
    folder = os.path.join(folder_paths.models_dir, FLOW_FOLDER)
    path = folder_paths.get_full_path(FLOW_FOLDER, raft_weights) if raft_weights and raft_weights != NO_WEIGHTS else None
    if path is None:
        raise ValueError(f"raft_weights: RAFT needs its weights file (torchvision's raft_large state dict as "
                         f".safetensors or .pth) in {folder}; put it there and pick it here, or use {METHOD_DIS}")
    return raft_flow(path, device=comfy.model_management.get_torch_device())


class VideoGrainFlowTrajectories(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VideoGrainFlowTrajectories",
            display_name="VideoGrain Flow Trajectories",
            category="VideoGrain",
            description="Dense optical flow between consecutive source frames, one pair at a time, and the "
                        "flow paths (trajectories) through the clip that VideoGrain Trajectory Attention follows.",
            inputs=[
                io.Image.Input("images", tooltip="The source frames (the Video Loader's images), as the latent "
                                                 "is made from them"),
                io.Combo.Input("method", options=[METHOD_DIS, METHOD_RAFT], default=METHOD_DIS,
                               tooltip="DIS: OpenCV, no weights, deterministic (the offline default). RAFT-Large: "
                                       "the reference's flow; needs its weights in models/optical_flow/"),
                io.Combo.Input("raft_weights", options=_raft_files(), default=NO_WEIGHTS, optional=True,
                               tooltip="RAFT-Large weights (torchvision raft_large state dict) in "
                                       "models/optical_flow/; only for the RAFT method"),
            ],
            outputs=[TRAJECTORIES.Output(display_name="trajectories")],
        )

    @classmethod
    def execute(cls, images, method=METHOD_DIS, raft_weights=NO_WEIGHTS) -> io.NodeOutput:
        if images.ndim != 4 or images.shape[-1] < 3:
            raise ValueError(f"images must be an IMAGE batch [frames, height, width, channels], got "
                             f"{tuple(images.shape)}")
        frames, h, w = images.shape[:3]
        if h % 8 or w % 8:
            raise ValueError(f"images are {w}x{h}: trajectories follow the latent's token grids, so the frames "
                             "must be multiples of 8 on both sides (the Video Loader makes them so)")
        estimator = _estimator(method, raft_weights)
        pbar = comfy.utils.ProgressBar(max(1, frames - 1))

        def on_pair(done, total):
            comfy.model_management.throw_exception_if_processing_interrupted()
            pbar.update_absolute(done, total)

        flows = clip_flows(images[..., :3].float().cpu(), estimator, on_pair=on_pair).forward
        return io.NodeOutput(ClipTrajectories(flows=flows.to(torch.float32).contiguous(), frames=int(frames),
                                              frame_hw=(int(h), int(w)), method=method))


NODES = [VideoGrainFlowTrajectories]
