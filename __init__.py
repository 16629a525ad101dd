"""ComfyUI-VideoGrain: zero-shot multi-grained video editing (VideoGrain, ICLR 2025) as ComfyUI nodes.

ComfyUI imports this package from `custom_nodes/`; the nodes are registered through the
v3 node API (`comfy_entrypoint`). Host-independent code lives in `videograin_core/`.
"""
from .nodes import comfy_entrypoint

__all__ = ["comfy_entrypoint"]
