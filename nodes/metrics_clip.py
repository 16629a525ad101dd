"""VideoGrainMetricsCLIPLoader: the CLIP model the Metrics node scores with, read from one
file that holds both halves and both projections (openai's clip-vit-large-patch14
`model.safetensors` layout), checked by its key names before anything is loaded.

Why a loader of its own rather than the host's CLIP Loader: a CLIP text encoder whose
file has no `text_projection` (every SD1.5 checkpoint's CLIP-L) still loads in the host,
with the projection weight left as whatever memory it was allocated in. Nothing on the
loaded object tells the two apart, so the only reliable check is the file's own keys;
the projections the scores use are then read from the file itself.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from comfy_api.latest import io

from .wire_types import METRICS_CLIP

FOLDERS = ("clip_vision", "text_encoders")
# openai's file layout: the text and vision towers side by side, each with its projection
REQUIRED_KEYS = ("text_projection.weight", "visual_projection.weight",
                 "text_model.final_layer_norm.weight", "vision_model.post_layernorm.weight")
USUAL = "openai clip-vit-large-patch14's model.safetensors (text and vision halves with their projections)"


@dataclass
class MetricsCLIP:
    """The two halves, loaded by the host, and the projections read from the file."""
    name: str
    vision: object            # the host's CLIP_VISION (image_embeds = projected pooled output)
    text: object              # the host's CLIP (pooled output returned unprojected)
    text_projection: torch.Tensor    # [D_joint, D_text] from the file
    visual_projection: torch.Tensor  # [D_joint, D_vision] from the file

    @property
    def dims(self) -> int:
        return int(self.text_projection.shape[0])


def choices() -> list[str]:
    import folder_paths
    names: list[str] = []
    for folder in FOLDERS:
        try:
            names.extend(n for n in folder_paths.get_filename_list(folder) if n.endswith(".safetensors"))
        except KeyError:  # a host without that folder kind
            pass
    return sorted(set(names))


def resolve(clip_name: str) -> str:
    """The file's path inside the host's clip_vision or text_encoders folders."""
    import folder_paths
    for folder in FOLDERS:
        try:
            path = folder_paths.get_full_path(folder, clip_name)
        except KeyError:
            path = None
        if path and os.path.isfile(path):
            return path
    raise ValueError(f"clip_name: '{clip_name}' is not in models/clip_vision or models/text_encoders: put "
                     f"{USUAL} in one of them (refresh the page to see it)")


def check_keys(path: str, clip_name: str) -> None:
    """Refuse, naming the input, a file that lacks a half or a projection (no tensor read)."""
    from safetensors import safe_open
    if not path.endswith(".safetensors"):
        raise ValueError(f"clip_name: '{clip_name}' is not a .safetensors file; use {USUAL}")
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
    missing = [k for k in REQUIRED_KEYS if k not in keys]
    if missing:
        hint = (" (an SD1.5 checkpoint's CLIP-L and text-only encoders have no text projection)"
                if "text_projection.weight" in missing else "")
        raise ValueError(f"clip_name: '{clip_name}' lacks {', '.join(missing)}{hint}: the scores need both "
                         f"halves of one CLIP with their projections into the joint space; use {USUAL}")


def load_metrics_clip(clip_name: str) -> MetricsCLIP:
    import comfy.clip_vision
    import comfy.sd
    import folder_paths
    from safetensors import safe_open

    path = resolve(clip_name)
    check_keys(path, clip_name)
    with safe_open(path, "pt") as f:
        text_projection = f.get_tensor("text_projection.weight").to(torch.float32)
        visual_projection = f.get_tensor("visual_projection.weight").to(torch.float32)
    for what, w in (("text_projection.weight", text_projection), ("visual_projection.weight", visual_projection)):
        if not bool(torch.isfinite(w).all()) or not bool(w.abs().max() > 0):
            raise ValueError(f"clip_name: '{clip_name}' holds a {what} that is all zeros or not finite; use {USUAL}")
    if text_projection.shape[0] != visual_projection.shape[0]:
        raise ValueError(f"clip_name: '{clip_name}' projects text to {text_projection.shape[0]} dimensions but "
                         f"images to {visual_projection.shape[0]}: not one CLIP model; use {USUAL}")
    vision = comfy.clip_vision.load(path)
    if vision is None:
        raise ValueError(f"clip_name: the host does not recognise the vision half of '{clip_name}'; use {USUAL}")
    text = comfy.sd.load_clip(ckpt_paths=[path], embedding_directory=folder_paths.get_folder_paths("embeddings"),
                              clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)
    return MetricsCLIP(clip_name, vision, text, text_projection, visual_projection)


class VideoGrainMetricsCLIPLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VideoGrainMetricsCLIPLoader",
            display_name="VideoGrain Metrics CLIP Loader",
            category="VideoGrain",
            description="Loads the CLIP that VideoGrain Metrics scores with from one file holding both halves and "
                        "both projections (openai clip-vit-large-patch14 model.safetensors, in models/clip_vision "
                        "or models/text_encoders). The file's keys are checked before loading: an SD1.5 "
                        "checkpoint's CLIP has no text projection and cannot score.",
            inputs=[io.Combo.Input("clip_name", options=choices(),
                                   tooltip="a CLIP file with text and vision halves and their projections")],
            outputs=[METRICS_CLIP.Output("metrics_clip", display_name="metrics_clip"),
                     io.ClipVision.Output("clip_vision", display_name="clip_vision")],
        )

    @classmethod
    def validate_inputs(cls, clip_name) -> bool | str:
        # before the queue runs anything: the host shows this next to the input
        try:
            check_keys(resolve(clip_name), clip_name)
        except ValueError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, clip_name) -> io.NodeOutput:
        m = load_metrics_clip(clip_name)
        return io.NodeOutput(m, m.vision)


NODES = [VideoGrainMetricsCLIPLoader]
