"""Write the node reference (docs/NODES.md) from the nodes' own schemas, so the docs say
exactly what the host shows.

    python scripts/node_reference.py [--comfyui PATH] [--check]
--check: fail if docs/NODES.md differs from what the schemas give.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
from importlib import import_module

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "docs", "NODES.md")


def node_classes(comfy: str):
    sys.path.insert(0, comfy)
    from comfy.cli_args import args
    args.cpu = True
    import utils.extra_config  # noqa: F401  (the host's `utils` first, as main.py does)
    import server  # noqa: F401
    import nodes
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    pack = next(m for n, m in sys.modules.items() if n.endswith("ComfyUI-VideoGrain") and hasattr(m, "comfy_entrypoint"))
    return import_module(pack.__name__ + ".nodes").NODE_CLASSES


def _cell(text) -> str:
    return " ".join(str(text or "").split()).replace("|", "\\|")


# Combos listing files of a models folder: what they hold depends on the machine the docs
# are made on, so the reference names the folder instead of the files found there.
FILE_LISTS = {
    ("VideoGrainMetricsCLIPLoader", "clip_name"): "a .safetensors file in models/clip_vision or models/text_encoders",
    ("VideoGrainFlowTrajectories", "raft_weights"): "none, or a file in models/optical_flow",
    ("VideoGrainT2SLoad", "tuned"): "a file in <output>/videograin_t2s/ (saved by VideoGrain T2S Tune)",
}


def _range(i, node_id: str = "") -> str:
    """min..max (and step) of a number input, the choices of a combo (not a file list: it
    depends on what the input folder holds where the docs are made)."""
    if getattr(i, "upload", None) is not None:
        return "a file in the input folder (with upload)"
    if (node_id, i.id) in FILE_LISTS:
        return FILE_LISTS[(node_id, i.id)]
    options = getattr(i, "options", None)
    if options:
        return ", ".join(str(o) for o in options)
    lo, hi, step = (getattr(i, k, None) for k in ("min", "max", "step"))
    if lo is None and hi is None:
        return ""
    return f"{lo if lo is not None else ''}..{hi if hi is not None else ''}" + (f", step {step}" if step else "")


def render(classes) -> str:
    lines = ["# Node reference", "",
             "Generated from the nodes' schemas by `scripts/node_reference.py`; the tooltips in the UI say the same.", ""]
    for cls in classes:
        s = cls.GET_SCHEMA()
        lines += [f"## {s.display_name or s.node_id}", "", f"Node id `{s.node_id}`, category `{s.category}`.", "",
                  _cell(s.description), "", "| input | type | default | range | what it does |", "|---|---|---|---|---|"]
        for i in s.inputs:
            d = getattr(i, "default", None)
            lines.append(f"| `{i.id}`{' (optional)' if i.optional else ''} | {i.io_type} | "
                         f"{'' if d is None else _cell(repr(d))} | {_cell(_range(i, s.node_id))} | {_cell(i.tooltip)} |")
        outputs = ", ".join(f"`{o.display_name or o.id}` ({o.io_type})" for o in s.outputs)
        lines += ["", "Outputs: " + (outputs or "none (an output node: it writes files)"), ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH") or os.path.join(REPO, ".host", "0.3.75", "ComfyUI"))
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args()
    text = render(node_classes(os.path.abspath(a.comfyui)))
    if a.check:
        with open(OUT) as f:
            if f.read() != text:
                print("docs/NODES.md is stale: run scripts/node_reference.py", file=sys.stderr)
                return 1
        return 0
    with open(OUT, "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
