"""VideoGrainAttentionView: the captured cross-attention maps as heatmaps over the frames
(videograin_core.capture.render), one image per word / local prompt per frame."""
from __future__ import annotations

from comfy_api.latest import io

from ..videograin_core.capture.render import heatmap_images
from .wire_types import CAPTURE


def captured_take(capture, latent):
    """The take of the run that returned `latent` (checked inputs)."""
    if not hasattr(capture, "take_for"):
        raise ValueError("capture: connect the capture output of VideoGrain Attention Capture")
    if not isinstance(latent, dict) or "samples" not in latent:
        raise ValueError("latent: connect the LATENT output of the sampler the captured model ran in")
    return capture.take_for(latent["samples"])


def check_frames(images, take) -> None:
    if images.ndim != 4 or images.shape[-1] < 3:
        raise ValueError(f"images must be an IMAGE batch [frames, height, width, 3], got {tuple(images.shape)}")
    if take.frames is not None and images.shape[0] != take.frames:
        raise ValueError(f"images has {images.shape[0]} frames but the captured run had {take.frames}: connect the "
                         f"frames of that run (the Video Loader's images, or the decoded edit)")


class VideoGrainAttentionView(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VideoGrainAttentionView",
            display_name="VideoGrain Attention View",
            category="VideoGrain",
            description="Shows each captured word's (or local prompt's) cross-attention map over the frames: one "
                        "image per word per frame (word by word, frames in order), the word written on it, the map "
                        "scaled over the whole clip (blue low, red high). Feed Preview Image or Save Image.",
            inputs=[
                CAPTURE.Input("capture", tooltip="VideoGrain Attention Capture's capture output"),
                io.Latent.Input("latent", tooltip="the LATENT the captured sampler returned (which run to show)"),
                io.Image.Input("images", tooltip="the frames to draw on (the source for an inversion, the decoded "
                                                 "edit for a Sample)"),
                io.Float.Input("opacity", default=0.6, min=0.0, max=1.0, step=0.05,
                               tooltip="heatmap opacity over the frame"),
            ],
            outputs=[io.Image.Output("heatmaps", display_name="images")],
        )

    @classmethod
    def execute(cls, capture, latent, images, opacity=0.6) -> io.NodeOutput:
        take = captured_take(capture, latent)
        check_frames(images, take)
        return io.NodeOutput(heatmap_images(take.cross_maps(), images, float(opacity)))


NODES = [VideoGrainAttentionView]
