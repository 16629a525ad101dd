"""Region Mask nodes: one region's mask per frame, lined up with the loaded frames.

Both nodes take the Video Loader's VIDEOGRAIN_TRANSFORM and put the mask through the same
frame selection, resize and crop as the frames (videograin_core.video.region_masks.align_mask_frames),
one frame at a time.
"""
from __future__ import annotations

import os

import torch
from comfy_api.latest import io

from ..videograin_core.video.region_masks import CHANNELS, align_mask_frames, align_masks, open_mask_source, safe_input_path

from .wire_types import TRANSFORM

_THRESHOLD = dict(default=0.5, min=0.0, max=1.0, step=0.01,
                  tooltip="mask values above this are inside the region")


def _out(mask: torch.Tensor) -> io.NodeOutput:
    return io.NodeOutput(mask.float())


class VideoGrainRegionMask(io.ComfyNode):
    """Any host MASK (SAM2, the mask editor, core mask ops, LoadImageMask) as a region mask."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VideoGrainRegionMask",
            display_name="VideoGrain Region Mask",
            category="VideoGrain",
            description="Binarises a MASK and lines it up with the Video Loader's frames: masks at the source "
                        "size/frame count get the loader's frame selection, resize and crop; masks at the loaded "
                        "size pass through; a single mask applies to every frame.",
            inputs=[
                io.Mask.Input("mask", tooltip="one mask per source frame, per loaded frame, or one for all frames"),
                TRANSFORM.Input("transform", tooltip="the Video Loader's transform output"),
                io.Float.Input("threshold", **_THRESHOLD),
            ],
            outputs=[io.Mask.Output("region_mask", display_name="mask", tooltip="binary mask [frames, height, width] at the frames' size")],
        )

    @classmethod
    def execute(cls, mask, transform, threshold=0.5) -> io.NodeOutput:
        return _out(align_masks(mask, transform, threshold, what="mask"))


class VideoGrainRegionMaskFromFile(io.ComfyNode):
    """A region mask from the input folder: a mask video, a folder of per-frame images, or
    one image for all frames."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VideoGrainRegionMaskFromFile",
            display_name="VideoGrain Region Mask (file)",
            category="VideoGrain",
            description="Reads a region mask from the input folder (a mask video, a folder of per-frame mask "
                        "images in name order, or a single image for every frame) and lines it up with the "
                        "Video Loader's frames. From a folder only the images of the frames the clip uses are read.",
            inputs=[
                io.String.Input("path", default="",
                                tooltip="video, image or folder of images, relative to the input folder"),
                TRANSFORM.Input("transform", tooltip="the Video Loader's transform output"),
                io.Float.Input("threshold", **_THRESHOLD),
                io.Combo.Input("channel", options=list(CHANNELS), default="luminance",
                               tooltip="which channel holds the mask (white = inside)"),
            ],
            outputs=[io.Mask.Output("region_mask", display_name="mask", tooltip="binary mask [frames, height, width] at the frames' size")],
        )

    @classmethod
    def _resolve(cls, path: str) -> str:
        import folder_paths
        return safe_input_path(folder_paths.get_input_directory(), path, what="path")

    @classmethod
    def fingerprint_inputs(cls, path, **kwargs):
        # Re-run when the files change on disk, not only when the path string does.
        try:
            full = cls._resolve(path)
        except ValueError:
            return path
        if os.path.isdir(full):
            return tuple((n, os.path.getmtime(os.path.join(full, n))) for n in sorted(os.listdir(full)))
        return os.path.getmtime(full)

    @classmethod
    def execute(cls, path, transform, threshold=0.5, channel="luminance") -> io.NodeOutput:
        import folder_paths
        full = cls._resolve(path)
        count, frames = open_mask_source(full, folder_paths.get_input_directory(), channel)
        return _out(align_mask_frames(frames, transform, threshold, what=f"mask {path!r}", count=count))


NODES = [VideoGrainRegionMask, VideoGrainRegionMaskFromFile]
