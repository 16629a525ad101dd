"""VideoGrain T2S Tune and VideoGrain T2S Load: Video-P2P's optional tuning stage
(VIDEO_P2P.md sections 2 and 3) as host glue around videograin_core.tuning.

Tune: the clip's latents and the source prompt tune the query projections of self- and
cross-attention (attn1.to_q, attn2.to_q) and a zero-initialised temporal attention module
per transformer block, with frame attention to frame 0 during tuning. The result goes on
a clone of the model as patches the host manages: the q deltas as weight patches
(`add_patches`, so LoRAs, low-VRAM loading and unloading keep working), the temporal
modules as object patches on each transformer block's `forward` (the only public point
that reaches the block's output after its feed-forward; see docs/DESIGN.md). The tuned
weights are saved as a safetensors file under the host's output folder, which T2S Load
puts back on a model.

Gradients: nodes run under torch.inference_mode(); the loop runs inside
torch.inference_mode(False) + torch.enable_grad(), on clones of the inputs and of the
UNet's inference-tensor weights (videograin_core.tuning.tune.inference_escape).
"""
from __future__ import annotations

import logging
import os
import re

import comfy.model_management
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io

from ..videograin_core.attention.batch_layout import PUBLISHED_KEY, BatchLayout
from ..videograin_core.attention.frame_attention import FrameAttentionStage
from ..videograin_core.attention.runtime import STLayoutRuntime, with_stage
from ..videograin_core.tuning.temporal import TemporalBlockPatch
from ..videograin_core.tuning.tune import TuneConfig, clip_loss, inference_escape, tune
from ..videograin_core.tuning.weights import BlockSpec, T2SWeights
from .host_glue import has_context_windows
from .st_layout_patch import _check_sd15, _host_attention, install_runtime, pack_runtime

log = logging.getLogger(__name__)

T2S_FOLDER = "videograin_t2s"   # under the host's output folder
_BLOCK_PATH = re.compile(r"(^|\.)transformer_blocks\.\d+$")
# Rough bytes of autograd activations per latent pixel per frame and per model channel
# (calibrated loosely on SD1.5; bench/tune.py prints the measured peak beside it).
ACTIVATION_FACTOR = 600


# ---------------------------------------------------------------- the model's blocks
def block_specs(diffusion_model) -> list[BlockSpec]:
    """Every transformer block with self- and cross-attention, by module path."""
    out = []
    for name, m in diffusion_model.named_modules():
        if not _BLOCK_PATH.search(name):
            continue
        a1, a2 = getattr(m, "attn1", None), getattr(m, "attn2", None)
        if a1 is None or a2 is None or not hasattr(a1, "to_q") or not hasattr(a2, "to_q"):
            continue
        heads, dim_head = int(m.n_heads), int(m.d_head)
        out.append(BlockSpec(name, int(a1.to_q.weight.shape[1]), heads, dim_head,
                             (tuple(a1.to_q.weight.shape), tuple(a2.to_q.weight.shape))))
    return out


def apply_t2s(model, weights: T2SWeights, q_patches: bool = True):
    """A clone of `model` carrying the tuned weights: q deltas as weight patches (unless
    q_patches is False: the tuning loop adds them itself) and the temporal modules as
    object patches on each transformer block's forward, chaining the forward (or another
    pack's object patch) that was there; a T2S patch already there is replaced."""
    m = model.clone()
    if q_patches:
        m.add_patches({f"diffusion_model.{k}.weight": (d,) for k, d in weights.q_deltas.items()}, 1.0)
    for name, module in weights.temporal.items():
        key = f"diffusion_model.{name}.forward"
        current = m.get_model_object(key)
        if isinstance(current, TemporalBlockPatch):
            current = current.forward
        m.add_object_patch(key, TemporalBlockPatch(current, module, name))
    return m


def training_model(model, weights: T2SWeights):
    """The T2S model the loop runs: temporal modules as object patches, the pack's attention
    runtime (chaining what the model had) with frame attention to frame 0."""
    tm = apply_t2s(model, weights, q_patches=False)
    if pack_runtime(model) is None:
        install_runtime(tm, STLayoutRuntime.unmodulated(_host_attention, full_frame_attention=False),
                        model.model_options)
    with_stage(tm.model_options.setdefault("transformer_options", {}),
               FrameAttentionStage("first frame", _host_attention))
    return tm


# ---------------------------------------------------------------- checks
def check_inputs(model, latent, conditioning, steps, learning_rate) -> tuple[torch.Tensor, torch.Tensor]:
    """Every refusal before tuning, each naming its input. Returns (latent samples, text)."""
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps: must be a whole number >= 0 (0 returns the untuned T2S model), got {steps}")
    if not (isinstance(learning_rate, (int, float)) and 0 < learning_rate < float("inf")):
        raise ValueError(f"learning_rate: must be a positive number (the reference uses 3e-5), got {learning_rate}")
    _check_sd15(model)
    if has_context_windows(model):
        raise ValueError("model: context windows (another pack's context options) cannot be used with T2S Tune: "
                         "the temporal attention needs the whole clip in one batch. Remove them from the model")
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4:
        raise ValueError(f"latent: expected the clip's encoded frames, a LATENT [frames, 4, h, w] (VAE Encode of the "
                         f"Video Loader's images), got {tuple(getattr(samples, 'shape', ())) or type(samples).__name__}")
    frames, channels = int(samples.shape[0]), int(samples.shape[1])
    want = int(getattr(model.model.latent_format, "latent_channels", 4))
    if channels != want:
        raise ValueError(f"latent: it has {channels} channels but the model's latents have {want}: encode the frames "
                         f"with the model's VAE")
    if frames < 1 or samples.shape[2] < 1 or samples.shape[3] < 1:
        raise ValueError(f"latent: it is empty {tuple(samples.shape)}")
    if not torch.isfinite(samples).all():
        raise ValueError("latent: it holds NaN or infinite values")
    if not isinstance(conditioning, list) or len(conditioning) != 1 or not isinstance(conditioning[0], (list, tuple)):
        n = len(conditioning) if isinstance(conditioning, list) else type(conditioning).__name__
        raise ValueError(f"conditioning: expected the source prompt encoded once (one entry), got {n} entries: wire "
                         f"CLIP Text Encode (or P2P Control's source) directly")
    ca = conditioning[0][0]
    if not isinstance(ca, torch.Tensor) or ca.ndim != 3 or ca.shape[-1] != 768:
        raise ValueError(f"conditioning: expected an SD1.5 prompt [1, tokens, 768], got "
                         f"{tuple(getattr(ca, 'shape', ()))}")
    if ca.shape[0] not in (1, frames):
        raise ValueError(f"conditioning: it holds {ca.shape[0]} prompts but the latent has {frames} frames: give one "
                         f"prompt (the source prompt) for the whole clip")
    return samples, ca


def estimate_bytes(model, shape, weights: T2SWeights) -> int:
    """Rough memory the tuning needs beyond what is free now: the UNet (what of it is not
    loaded yet) plus one trainable copy of its weights, the tuned parameters with their
    gradients and AdamW state (4 x float32), and the autograd activations."""
    size = int(model.model_size())
    loaded = int(getattr(model, "loaded_size", lambda: 0)() or 0)
    frames, _, h, w = (int(s) for s in shape)
    channels = int((getattr(model.model, "model_config", None).unet_config or {}).get("model_channels", 320))
    dtype_size = comfy.model_management.dtype_size(model.model.get_dtype())
    activations = frames * h * w * channels * ACTIVATION_FACTOR * max(dtype_size, 2)
    return (size - loaded) + size + 16 * weights.parameter_count() + activations


def check_memory(model, shape, weights: T2SWeights) -> None:
    device = model.load_device
    need = estimate_bytes(model, shape, weights)
    free = comfy.model_management.get_free_memory(device)
    if need > free:
        frames, _, h, w = shape
        raise ValueError(f"latent: tuning {frames} frames of {w * 8}x{h * 8} needs about {need / 2**30:.1f} GiB on "
                         f"{device} but {free / 2**30:.1f} GiB are free: use fewer or smaller frames (the reference "
                         f"tunes 8 frames at 512x512 on a 40 GB GPU)")


# ---------------------------------------------------------------- the run
def _eps_fn(tm, text: torch.Tensor, frames: int):
    import comfy.patcher_extension
    base = dict(tm.model_options.get("transformer_options", {}))
    # the model's wrappers run as in sampling (the pack's batch layout publisher among them,
    # which the frame-pooled norms of an ST-Layout patched model read)
    base["wrappers"] = comfy.patcher_extension.copy_nested_dicts(tm.wrappers)
    ctx = text.expand(frames, -1, -1) if text.shape[0] == 1 else text

    def eps(x, sigma):
        s = sigma.reshape(1).expand(frames).to(x.device, torch.float32)
        to = dict(base)
        to.update({"cond_or_uncond": [0], "sigmas": s, PUBLISHED_KEY: BatchLayout((0,), frames, 1)})
        denoised = tm.model.apply_model(x, s, c_crossattn=ctx.to(x.device), transformer_options=to)
        return (x - denoised.float()) / sigma
    return eps


class _Session:
    """One tuning session's setup: the T2S model loaded for training, the q-delta hooks,
    the inference escape. Used as a context manager (everything undone on exit)."""

    def __init__(self, model, weights: T2SWeights, samples: torch.Tensor, text: torch.Tensor):
        self.model, self.weights = model, weights
        self.samples, self.text = samples, text
        self.hooks = []

    def __enter__(self):
        try:
            return self._enter()
        except BaseException:
            self.__exit__(None, None, None)  # undo what was set up before the failure
            raise

    def _enter(self):
        self._escape = None
        tm = self.tm = training_model(self.model, self.weights)
        comfy.model_management.load_models_gpu([tm], memory_required=0, force_full_load=True)
        device = self.device = tm.load_device
        self.weights.trainable(device)
        dm = tm.model.diffusion_model
        for key in self.weights.q_deltas:
            mod = dm.get_submodule(key)
            self.hooks.append(mod.register_forward_hook(self._q_hook(key)))
        escape = inference_escape(dm)
        escape.__enter__()
        self._escape = escape
        frames = self.samples.shape[0]
        self.latent = tm.model.process_latent_in(self.samples.to(device, torch.float32)).float()
        self.sigma_table = tm.get_model_object("model_sampling").sigmas.detach().float().clone()
        self.eps_fn = _eps_fn(tm, self.text.to(device), frames)
        return self

    def _q_hook(self, key):
        weights = self.weights

        def hook(module, args, out):
            d = weights.q_deltas[key]
            return out + torch.nn.functional.linear(args[0], d.to(args[0].dtype))
        return hook

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()
        self.hooks = []
        try:
            if getattr(self, "_escape", None) is not None:
                self._escape.__exit__(*exc)
                self._escape = None
        finally:
            self.weights.frozen()
        return False


def run_tuning(model, samples: torch.Tensor, text: torch.Tensor, config: TuneConfig, weights: T2SWeights,
               eval_timesteps=None, on_step=None) -> dict:
    """Tune `weights` in place on the clip. Returns {"losses": per step, "before"/"after":
    clip_loss at eval_timesteps when given}."""
    out = {"losses": []}
    with torch.inference_mode(False), torch.enable_grad():
        samples = samples.detach().clone()
        text = text.detach().clone()
        with _Session(model, weights, samples, text) as s:
            grad_scaling = s.device.type == "cuda" and s.tm.model.get_dtype() == torch.float16
            if eval_timesteps is not None:
                out["before"] = clip_loss(s.eps_fn, s.latent, s.sigma_table, eval_timesteps, seed=config.seed + 1)
            out["losses"] = tune(s.eps_fn, s.latent, s.sigma_table, weights.parameters(), config, on_step=on_step,
                                 grad_scaling=grad_scaling)
            if eval_timesteps is not None:
                out["after"] = clip_loss(s.eps_fn, s.latent, s.sigma_table, eval_timesteps, seed=config.seed + 1)
    return out


# ---------------------------------------------------------------- files
def t2s_folder() -> str:
    return os.path.join(folder_paths.get_output_directory(), T2S_FOLDER)


def t2s_files() -> list[str]:
    root = t2s_folder()
    out = []
    if os.path.isdir(root):
        for dirpath, _, files in os.walk(root, followlinks=False):
            for f in files:
                if f.endswith(".safetensors"):
                    out.append(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/"))
    return sorted(out)


def save_path(filename_prefix: str) -> str:
    """The next free file for `filename_prefix` under <output>/videograin_t2s/ (the host's
    counter scheme); refuses prefixes that leave that folder."""
    root = t2s_folder()
    try:
        full_folder, filename, counter, _, _ = folder_paths.get_save_image_path(filename_prefix, root)
    except Exception as e:
        raise ValueError(f"filename_prefix: {filename_prefix!r} does not name a file inside the output folder's "
                         f"{T2S_FOLDER}/ ({e})") from e
    return os.path.join(full_folder, f"{filename}_{counter:05}_.safetensors")


def save_weights(weights: T2SWeights, filename_prefix: str) -> str:
    """Write the weights under <output>/videograin_t2s/; returns the name T2S Load lists."""
    from safetensors.torch import save_file
    root = t2s_folder()
    path = save_path(filename_prefix)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".partial"
    save_file(weights.state_dict(), tmp, metadata=weights.metadata())
    os.replace(tmp, path)
    return os.path.relpath(path, root).replace(os.sep, "/")


def resolve_file(name: str) -> str:
    """The path of a T2S file named relative to <output>/videograin_t2s/, refusing names
    that leave it."""
    root = os.path.realpath(t2s_folder())
    if not isinstance(name, str) or not name or os.path.isabs(name):
        raise ValueError(f"tuned: give a file name listed under the output folder's {T2S_FOLDER}/, got {name!r}")
    path = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, path]) != root or not path.endswith(".safetensors"):
        raise ValueError(f"tuned: {name!r} is not a .safetensors file inside the output folder's {T2S_FOLDER}/")
    if not os.path.isfile(path):
        raise ValueError(f"tuned: {name!r} was not found in the output folder's {T2S_FOLDER}/ (tune and save one "
                         f"with VideoGrain T2S Tune)")
    return path


def load_weights(model, name: str) -> T2SWeights:
    from safetensors import safe_open
    path = resolve_file(name)
    try:
        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"tuned: {name!r} is not a readable safetensors file ({e})") from e
    return T2SWeights.from_state_dict(sd, metadata, block_specs(model.model.diffusion_model), what="tuned")


# ---------------------------------------------------------------- nodes
class VideoGrainT2STune(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VideoGrainT2STune",
            display_name="VideoGrain T2S Tune",
            category="VideoGrain",
            description="Video-P2P's optional tuning stage: tunes the query projections of self- and "
                        "cross-attention and a zero-initialised temporal attention per transformer block on the "
                        "clip (its encoded frames and the source prompt), with frame attention to frame 0, AdamW "
                        "at a constant rate. Returns the model carrying the result as patches (use it with P2P "
                        "Sample's frame_attention 'first frame') and saves it under the output folder's "
                        "videograin_t2s/ for VideoGrain T2S Load.",
            inputs=[
                io.Model.Input("model", tooltip="SD1.5 model (the one the edit will use)"),
                io.Latent.Input("latent", tooltip="the clip's frames encoded with the model's VAE (VAE Encode of the "
                                                  "Video Loader's images), one latent per frame"),
                io.Conditioning.Input("conditioning", tooltip="the source prompt (CLIP Text Encode, or P2P Control's "
                                                              "source output)"),
                io.Int.Input("steps", default=300, min=0, max=100000,
                             tooltip="tuning steps (the reference: 300-500); 0 returns the untuned T2S model, "
                                     "which samples exactly like the input"),
                io.Float.Input("learning_rate", default=3e-5, min=1e-8, max=1.0, step=1e-6, round=1e-8,
                               tooltip="AdamW learning rate, constant (the reference: 3e-5)"),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff,
                             tooltip="seeds the temporal modules' initial weights, the timesteps and the noise"),
                io.String.Input("filename_prefix", default="tuned",
                                tooltip="saved as <output>/videograin_t2s/<prefix>_NNNNN_.safetensors; empty: "
                                        "do not save"),
            ],
            outputs=[io.Model.Output("tuned_model", display_name="model")],
        )

    @classmethod
    def execute(cls, model, latent, conditioning, steps=300, learning_rate=3e-5, seed=0,
                filename_prefix="tuned") -> io.NodeOutput:
        samples, text = check_inputs(model, latent, conditioning, steps, learning_rate)
        if filename_prefix:
            save_path(filename_prefix)  # a bad prefix is refused before tuning, not after
        config = TuneConfig(steps=int(steps), learning_rate=float(learning_rate), seed=int(seed))
        specs = block_specs(model.model.diffusion_model)
        with torch.inference_mode(False):  # tensors the tuning will train (and the MODEL keeps)
            weights = T2SWeights(specs, seed=int(seed))
        if steps > 0:
            check_memory(model, tuple(samples.shape), weights)
            comfy.model_management.throw_exception_if_processing_interrupted()
            pbar = comfy.utils.ProgressBar(int(steps))

            def on_step(step, loss):
                pbar.update(1)
                comfy.model_management.throw_exception_if_processing_interrupted()

            result = run_tuning(model, samples, text, config, weights, on_step=on_step)
            losses = result["losses"]
            log.info("VideoGrain T2S Tune: %d steps, loss %.5f (first) -> %.5f (mean of the last 10)", steps,
                     losses[0], sum(losses[-10:]) / len(losses[-10:]))
        weights.info = {"steps": int(steps), "learning_rate": float(learning_rate), "seed": int(seed),
                        "frames": int(samples.shape[0]), "latent_size": f"{samples.shape[3]}x{samples.shape[2]}"}
        if filename_prefix:
            name = save_weights(weights, filename_prefix)
            log.info("VideoGrain T2S Tune: saved %s/%s", T2S_FOLDER, name)
        return io.NodeOutput(apply_t2s(model, weights))


class VideoGrainT2SLoad(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VideoGrainT2SLoad",
            display_name="VideoGrain T2S Load",
            category="VideoGrain",
            description="Puts a T2S tuning saved by VideoGrain T2S Tune (under the output folder's videograin_t2s/) "
                        "back on a model: the same model the tuning ran on.",
            inputs=[
                io.Model.Input("model", tooltip="the SD1.5 model the file was tuned on"),
                io.Combo.Input("tuned", options=t2s_files(),
                               tooltip="a file under <output>/videograin_t2s/ written by VideoGrain T2S Tune"),
            ],
            outputs=[io.Model.Output("tuned_model", display_name="model")],
        )

    @classmethod
    def execute(cls, model, tuned) -> io.NodeOutput:
        _check_sd15(model)
        return io.NodeOutput(apply_t2s(model, load_weights(model, tuned)))


NODES = [VideoGrainT2STune, VideoGrainT2SLoad]
