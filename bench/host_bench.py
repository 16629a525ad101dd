"""The host imported in a bench's own process, as main.py starts it, with this pack loaded."""
from __future__ import annotations

import asyncio
import sys


def load_host(comfyui: str, cpu: bool = True):
    """(the host's `nodes` module, the pack's package name) for a ComfyUI folder."""
    sys.path.insert(0, comfyui)
    from comfy.cli_args import args
    args.cpu = cpu
    import utils.extra_config  # noqa: F401  (the host's `utils` first, as main.py does)
    import server  # noqa: F401
    import nodes
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    pack = next(m for n, m in sys.modules.items() if n.endswith("ComfyUI-VideoGrain") and hasattr(m, "comfy_entrypoint"))
    return nodes, pack.__name__
