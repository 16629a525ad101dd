"""Local Prompt: one region (mask + the text that edits it) appended to a layout."""
from __future__ import annotations

from comfy_api.latest import io

from ..videograin_core.prompts.layout import Layout

from .wire_types import LAYOUT


class VideoGrainLocalPrompt(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VideoGrainLocalPrompt",
            display_name="VideoGrain Local Prompt",
            category="VideoGrain",
            description="Adds a region to the layout: its mask and its local prompt. Chain one per region. The "
                        "global prompt given to Layout Conditioning must contain every local prompt verbatim. "
                        "An empty local prompt keeps the region apart in self-attention without text.",
            inputs=[
                io.Mask.Input("mask", tooltip="the region's mask, one per frame or one for all frames "
                                              "(use a Region Mask node to line it up with the frames)"),
                io.String.Input("local_prompt", default="", multiline=True,
                                tooltip="the words of the global prompt that describe this region"),
                LAYOUT.Input("layout", optional=True, tooltip="regions so far"),
            ],
            outputs=[LAYOUT.Output("layout_out", display_name="layout")],
        )

    @classmethod
    def execute(cls, mask, local_prompt="", layout=None) -> io.NodeOutput:
        layout = layout if layout is not None else Layout()
        return io.NodeOutput(layout.add(mask, local_prompt.strip()))


NODES = [VideoGrainLocalPrompt]
