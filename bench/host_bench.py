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


def private_folders(workdir: str) -> None:
    """The host's input, output, temp and user folders under `workdir` (made if missing)."""
    import os

    import folder_paths
    for kind, setter in (("input", folder_paths.set_input_directory), ("output", folder_paths.set_output_directory),
                         ("temp", folder_paths.set_temp_directory), ("user", folder_paths.set_user_directory)):
        os.makedirs(os.path.join(workdir, kind), exist_ok=True)
        setter(os.path.join(workdir, kind))


class NullServer:
    """What the host's PromptExecutor reports progress to, for runs with no server."""
    client_id = None
    last_node_id = None

    def send_sync(self, *args, **kwargs):
        pass


def time_executes(nodes, names, timings: dict, on_call=None) -> None:
    """Wrap the `execute` of each named node class so that `timings[name]` sums its wall
    time; `on_call(name, kwargs)` (optional) sees each call's inputs first."""
    import time
    for name in names:
        cls = nodes.NODE_CLASS_MAPPINGS[name]
        orig = cls.__dict__["execute"].__func__

        def timed(c, *args, __orig=orig, __name=name, **kw):
            if on_call is not None:
                on_call(__name, kw)
            t0 = time.perf_counter()
            try:
                return __orig(c, *args, **kw)
            finally:
                timings[__name] = timings.get(__name, 0.0) + time.perf_counter() - t0
        cls.execute = classmethod(timed)
