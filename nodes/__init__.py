"""The pack's nodes: thin adapters between ComfyUI types and `videograin_core`.

Each module below defines its node classes and lists them in a module-level `NODES`.
Adding a node: write it in its own module here, add the module's name to `_MODULES`, and
add one test. Node ids start with `VideoGrain` and never change (saved workflows store them).
"""
from __future__ import annotations

import importlib

from comfy_api.latest import ComfyExtension, io

_MODULES = (
    "video_loader",         # VideoGrainVideoLoader
    "region_mask",          # region masks from host MASKs, mask videos, image sequences
    "local_prompt",         # VideoGrainLocalPrompt
    "layout_conditioning",  # global prompt + layout -> spliced positive CONDITIONING
    "st_layout_patch",      # VideoGrainSTLayoutPatch
    "flow_trajectories",    # VideoGrainFlowTrajectories
    "trajectory_attention", # VideoGrainTrajectoryAttention
    "ddim_invert",          # VideoGrainDDIMInvert
    "sample",               # VideoGrainSample
    "decode",               # VideoGrainDecode
    "save_video",           # VideoGrainSaveVideo
    "p2p_control",          # VideoGrainP2PControl (Video-P2P prompt pair -> conditionings + control)
    "p2p_sample",           # VideoGrainP2PSample (the Video-P2P edit: source and target in one run)
    "t2s_tune",             # VideoGrainT2STune, VideoGrainT2SLoad (Video-P2P's optional tuning stage)
    "metrics_clip",         # VideoGrainMetricsCLIPLoader: the CLIP the metrics score with
    "metrics",              # VideoGrainMetrics: CLIP-T, CLIP-F, Warp-Err, Q-edit
    "attention_capture",    # VideoGrainAttentionCapture
    "attention_view",       # VideoGrainAttentionView
    "auto_regions",         # VideoGrainAutoRegions: masks by k-means of captured features
)

NODE_CLASSES: list[type[io.ComfyNode]] = []
for _name in _MODULES:
    NODE_CLASSES.extend(importlib.import_module(f".{_name}", __name__).NODES)


class VideoGrainExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODE_CLASSES)


async def comfy_entrypoint() -> VideoGrainExtension:
    return VideoGrainExtension()
