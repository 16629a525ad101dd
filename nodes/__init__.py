"""The pack's nodes: thin adapters between ComfyUI types and `videograin_core`.

Adding a node: write it in its own module here and list its class in `NODE_CLASSES`.
Node ids start with `VideoGrain` and never change (saved workflows store them).
"""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

NODE_CLASSES: list[type[io.ComfyNode]] = []


class VideoGrainExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODE_CLASSES)


async def comfy_entrypoint() -> VideoGrainExtension:
    return VideoGrainExtension()
