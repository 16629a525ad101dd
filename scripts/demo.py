"""The main job: edit the sample clip with the instance-level workflow, headless, through
a real ComfyUI server, and write the edited mp4 and a side-by-side comparison to output/.

    make demo                                   # random test model: the output is noise
    make demo DEMO_ARGS="--checkpoint ~/models/v1-5-pruned-emaonly.safetensors"
    make demo DEMO_ARGS="--checkpoint SD15 --controlnet control_v11p_sd15_canny.safetensors"

With --controlnet the ControlNet workflow (core Canny preprocessor) runs instead; --workflow NAME
runs any example (e.g. make demo DEMO_ARGS="--workflow video_p2p_word_swap").
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import comfy_runner  # noqa: E402

SAMPLE_VIDEO = os.path.join(REPO, "example_data", "vtest_two_people.mp4")
SAMPLE_MASKS = os.path.join(REPO, "example_data", "masks")
BANNER = """
################################################################################
#  NO CHECKPOINT GIVEN: using a RANDOMLY INITIALISED SD1.5 test model.          #
#  The pipeline runs for real, but the edited video WILL BE NOISE.              #
#  For a real edit:  make demo DEMO_ARGS="--checkpoint /path/to/sd15.safetensors"
################################################################################
"""


def log(msg: str):
    print(f"[demo] {msg}", flush=True)


def install_model(comfy: str, kind: str, path: str) -> str:
    """Link a user's model file into the host's models folder; returns its name there."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise SystemExit(f"--{'checkpoint' if kind == 'checkpoints' else 'controlnet'}: no such file: {path}")
    dst = os.path.join(comfy, "models", kind, os.path.basename(path))
    if os.path.realpath(dst) != os.path.realpath(path):
        if os.path.lexists(dst):
            os.remove(dst)
        os.symlink(path, dst)
    return os.path.basename(path)


def prepare_inputs(input_dir: str):
    """The sample clip and its masks, where the workflows expect them."""
    shutil.copyfile(SAMPLE_VIDEO, os.path.join(input_dir, "vtest_two_people.mp4"))
    shutil.copytree(SAMPLE_MASKS, os.path.join(input_dir, "vtest_two_people_masks"), dirs_exist_ok=True)


def load_workflow(name: str) -> dict:
    with open(os.path.join(REPO, "example_workflows", "api", name + ".json")) as f:
        return json.load(f)


def configure(prompt: dict, ckpt: str, cnet: str | None, frames: int, size: int, steps: int) -> dict:
    for node in prompt.values():
        t, inp = node["class_type"], node["inputs"]
        if t == "CheckpointLoaderSimple":
            inp["ckpt_name"] = ckpt
        elif t == "ControlNetLoader" and cnet:
            inp["control_net_name"] = cnet
        elif t == "VideoGrainVideoLoader":
            inp["frame_load_cap"], inp["size"] = frames, size
        elif t == "VideoGrainDDIMInvert":
            inp["steps"] = steps
        elif t == "VideoGrainSaveVideo":
            inp["filename_prefix"] = "videograin/demo"
    return prompt


class Progress:
    """Prints the node being run and its progress bar from the server's events."""

    def __init__(self, prompt: dict):
        self.prompt, self.t0, self.last = prompt, time.time(), ""

    def __call__(self, event: str, data: dict):
        if event == "executing" and data.get("node"):
            node = self.prompt.get(str(data["node"]), {}).get("class_type", data["node"])
            log(f"{time.time() - self.t0:7.1f}s  running {node}")
        elif event == "progress":
            line = f"{data.get('value')}/{data.get('max')}"
            if line != self.last:
                self.last = line
                print(f"\r           step {line}   ", end="" if data.get("value") != data.get("max") else "\n", flush=True)


def run(args) -> list[str]:
    comfy = os.path.abspath(args.comfyui)
    work = os.path.join(REPO, ".host", "demo")
    out_dir = os.path.abspath(args.output)
    os.makedirs(out_dir, exist_ok=True)
    if args.checkpoint:
        ckpt = install_model(comfy, "checkpoints", args.checkpoint)
        cnet = install_model(comfy, "controlnet", args.controlnet) if args.controlnet else None
    else:
        print(BANNER, flush=True)
        sys.path.insert(0, comfy)
        from comfy.cli_args import args as comfy_args
        comfy_args.cpu = True
        import importlib.util
        spec = importlib.util.spec_from_file_location("make_test_models", os.path.join(HERE, "make_test_models.py"))
        maker = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(maker)
        log("writing the random test model (once)")
        ckpt = os.path.basename(maker.write_model(os.path.join(comfy, "models"), "small"))
        cnet = os.path.basename(maker.write_model(os.path.join(comfy, "models"), "small_cnet")) if args.controlnet else None
    frames = args.frames or (16 if args.checkpoint else 8)
    size = args.size or (512 if args.checkpoint else 128)
    steps = args.steps or (50 if args.checkpoint else 10)
    name = args.workflow or ("controlnet_canny_edit" if args.controlnet else "instance_level_edit")
    if not os.path.isfile(os.path.join(REPO, "example_workflows", "api", name + ".json")):
        raise SystemExit(f"--workflow: no example_workflows/api/{name}.json")
    prompt = configure(load_workflow(name), ckpt, cnet, frames, size, steps)

    log(f"starting ComfyUI ({'CPU' if args.cpu else 'default device'}); log in {os.path.join(work, 'server.log')}")
    extra = ["--cpu"] if args.cpu else []
    client = comfy_runner.start_server(comfy, work, os.path.join(work, "server.log"), args.python, extra,
                                       dirs={"output": out_dir})
    try:
        prepare_inputs(client.input_dir)
        log(f"workflow {name}: {frames} frames, short side {size}px, {steps} steps, checkpoint {ckpt}")
        entry = client.run_with_progress(prompt, Progress(prompt), timeout=args.timeout)
    finally:
        comfy_runner.stop_server(client)
    written = []
    for out in entry["outputs"].values():
        for item in out.get("images", []) + out.get("videos", []) + out.get("gifs", []):
            written.append(os.path.join(out_dir, item.get("subfolder", ""), item["filename"]))
    for p in written:
        log(f"wrote {os.path.relpath(p, os.getcwd()) if p.startswith(os.getcwd()) else p}")
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="an SD1.5 checkpoint file (.safetensors)")
    ap.add_argument("--controlnet", help="an SD1.5 ControlNet file: runs the ControlNet (Canny) workflow")
    ap.add_argument("--workflow", default="",
                    help="an example workflow by name (example_workflows/api/<name>.json), e.g. video_p2p_word_swap")
    ap.add_argument("--frames", type=int, default=0, help="frames to edit (default 16; 8 with the test model)")
    ap.add_argument("--size", type=int, default=0, help="short side in pixels (default 512; 128 with the test model)")
    ap.add_argument("--steps", type=int, default=0, help="DDIM steps (default 50; 10 with the test model)")
    ap.add_argument("--output", default=os.path.join(REPO, "output"))
    ap.add_argument("--comfyui", default=comfy_runner.default_comfyui(REPO))
    ap.add_argument("--python", default=os.environ.get("HOST_PYTHON", sys.executable))
    ap.add_argument("--cpu", action=argparse.BooleanOptionalAction, default=None,
                    help="run ComfyUI on the CPU (default: only when no CUDA device is present)")
    ap.add_argument("--timeout", type=float, default=6 * 3600)
    args = ap.parse_args(argv)
    if args.cpu is None:
        import torch
        args.cpu = not torch.cuda.is_available()
    written = run(args)
    return 0 if written else 1


if __name__ == "__main__":
    raise SystemExit(main())
