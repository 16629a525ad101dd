"""Write randomly initialised SD1.5-architecture checkpoints for tests and benchmarks.

The weights are random: the models exercise every code path of the pack (UNet attention
at several resolutions, CLIP-L text encoding, VAE, ControlNet) but produce noise, never
pictures. The key names are those of the original SD1.5 checkpoints
(`model.diffusion_model.*`, `cond_stage_model.transformer.text_model.*`,
`first_stage_model.*`, `control_model.*`), so the host's CheckpointLoaderSimple and
ControlNetLoader take them exactly as they take a user's real file.

Models (`--which`):
  small        4-level UNet (320 channels at every level, one res block per level, attention at
               the top three levels and in the middle block: token grids 1, 1/2, 1/4, 1/8 of
               the latent), full CLIP-L, TAESD-style VAE. Fast on CPU.
  small_cnet   SD1.5-format ControlNet matching `small`.
  small_smooth `small` with the UNet output conv scaled by 0.05 (smooth eps, for inversion checks).
  full         the full SD1.5 UNet, CLIP-L and the full KL VAE (for benchmarks; ~2 GiB).
And `write_clip_pair`: a random CLIP ViT-L/14 (text and vision halves with their
projections, openai's file layout; ~0.85 GiB) for the metrics node's tests and bench.

Deterministic: every tensor is drawn from a generator seeded by (seed, tensor name), so
the same seed writes the same bytes. A file whose embedded recipe matches is reused.

Shared store: when `VIDEOGRAIN_TEST_MODEL_STORE` names a folder (`make test` sets it to
`.host/test-models`), each model is written there once, under its recipe's hash, and
hard-linked (copied where links fail) into the host's models folder, so the test hosts
of every ComfyUI version share one copy of each file on disk.

Run with the host's python and ComfyUI importable:
    python scripts/make_test_models.py --comfyui PATH [--which small small_cnet full]
Prints one line per model: `<which> <path>`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

RECIPE_VERSION = 2  # bump when the way weights are drawn changes

SD15_UNET = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
    channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
    transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], num_heads=8, context_dim=768,
    use_spatial_transformer=True, legacy=False, use_linear_in_transformer=False, adm_in_channels=None,
)
# Same family, fewer weights: SD1.5 detection only needs model_channels=320, context_dim=768
# and conv (not linear) projections in the transformers.
SMALL_UNET = dict(SD15_UNET, num_res_blocks=[1, 1, 1, 1], channel_mult=[1, 1, 1, 1],
                  transformer_depth=[1, 1, 1, 0], transformer_depth_output=[1, 1, 1, 1, 1, 1, 0, 0])

SD15_VAE = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
                ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0)

MODELS = {
    "small": dict(file=("checkpoints", "videograin_test_small.safetensors"), unet=SMALL_UNET, vae="taesd"),
    "small_cnet": dict(file=("controlnet", "videograin_test_small_controlnet.safetensors"), cnet=SMALL_UNET),
    "full": dict(file=("checkpoints", "videograin_test_sd15_full.safetensors"), unet=SD15_UNET, vae="kl"),
    # `small` with the UNet's output conv scaled down: the noise prediction becomes a small,
    # smooth function of x, so DDIM inversion + sampling must reconstruct the input and
    # converge as steps grow (the plain random UNet is too rough for that check).
    "small_smooth": dict(file=("checkpoints", "videograin_test_small_smooth.safetensors"), unet=SMALL_UNET,
                         vae="taesd", scale={"model.diffusion_model.out.2.weight": 0.05}),
}


def _draw(name: str, shape, seed: int):
    """One tensor, drawn from a generator seeded by (seed, name): order independent."""
    import torch
    g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little"))
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias" or name.endswith("vae_shift"):
        return torch.zeros(shape)
    if len(shape) <= 1:
        # norm gains, vae_scale and the like
        return torch.ones(shape)
    if "embedding" in name:
        return torch.randn(shape, generator=g) * 0.02
    fan_in = 1
    for s in shape[1:]:
        fan_in *= s
    return torch.randn(shape, generator=g) / fan_in ** 0.5


def _fill(module_sd: dict, prefix: str, seed: int) -> dict:
    import torch
    out = {}
    for k in sorted(module_sd):
        t = module_sd[k]
        if not torch.is_floating_point(t):
            out[prefix + k] = t.clone()  # e.g. position ids
        else:
            out[prefix + k] = _draw(prefix + k, tuple(t.shape), seed).to(torch.float16)
    return out


def _unet_sd(cfg: dict, seed: int) -> dict:
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    m = UNetModel(**cfg, operations=comfy.ops.disable_weight_init, device="meta")
    return _fill(m.state_dict(), "model.diffusion_model.", seed)


def _cnet_sd(cfg: dict, seed: int) -> dict:
    import comfy.ops
    from comfy.cldm.cldm import ControlNet
    m = ControlNet(hint_channels=3, **cfg, operations=comfy.ops.disable_weight_init, device="meta")
    return _fill(m.state_dict(), "control_model.", seed)


def _clip_sd(seed: int) -> dict:
    import comfy.ops
    import comfy.sd1_clip
    from comfy.clip_model import CLIPTextModel
    with open(os.path.join(os.path.dirname(comfy.sd1_clip.__file__), "sd1_clip_config.json")) as f:
        cfg = json.load(f)
    import torch
    m = CLIPTextModel(cfg, dtype=torch.float32, device="meta", operations=comfy.ops.disable_weight_init)
    sd = {k: v for k, v in m.state_dict().items() if k.startswith("text_model.")}
    return _fill(sd, "cond_stage_model.transformer.", seed)


def _vae_sd(kind: str, seed: int) -> dict:
    import torch
    if kind == "taesd":
        from comfy.taesd.taesd import TAESD
        with torch.device("meta"):
            m = TAESD()
    else:
        from comfy.ldm.models.autoencoder import AutoencodingEngine
        with torch.device("meta"):
            m = AutoencodingEngine(
                regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
                encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": SD15_VAE},
                decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": SD15_VAE},
            )
    sd = {k: v for k, v in m.state_dict().items()}
    if kind == "kl":
        # The original SD checkpoints name the 1x1 convs around the latent quant_conv and
        # post_quant_conv; the host maps both spellings.
        sd = {k: v for k, v in sd.items() if not k.startswith("regularization")}
    return _fill(sd, "first_stage_model.", seed)


CLIP_FILE = "videograin_test_clip_vitl14.safetensors"


def _clip_pair_sd(seed: int) -> dict:
    """A random CLIP ViT-L/14 in the layout of openai's clip-vit-large-patch14
    model.safetensors: text_model.*, text_projection.weight, vision_model.*,
    visual_projection.weight (the host's CLIP Vision Loader takes the vision half and its
    CLIP Loader the text half of the same file)."""
    import torch
    import comfy.clip_vision
    import comfy.ops
    import comfy.sd1_clip
    from comfy.clip_model import CLIPTextModel, CLIPVisionModelProjection
    with open(os.path.join(os.path.dirname(comfy.sd1_clip.__file__), "sd1_clip_config.json")) as f:
        text_cfg = json.load(f)
    with open(os.path.join(os.path.dirname(comfy.clip_vision.__file__), "clip_vision_config_vitl.json")) as f:
        vision_cfg = json.load(f)
    text = CLIPTextModel(text_cfg, dtype=torch.float32, device="meta", operations=comfy.ops.disable_weight_init)
    with torch.device("meta"):  # its visual projection is built without a device argument
        vision = CLIPVisionModelProjection(vision_cfg, torch.float32, "meta", comfy.ops.disable_weight_init)
    sd = _fill(text.state_dict(), "", seed)
    sd.update(_fill(vision.state_dict(), "", seed))
    return sd


def write_clip_pair(models_dir: str, seed: int = 0) -> str:
    """Write (or reuse) the random CLIP ViT-L/14 into models/clip_vision and hard-link it
    (a copy where links fail) into models/text_encoders; returns the file name."""
    from safetensors.torch import save_file

    want = json.dumps({"which": "clip_vitl14", "seed": seed, "version": RECIPE_VERSION,
                       "note": "random weights for tests: the scores are meaningless"}, sort_keys=True)

    def build(dest):
        save_file(_clip_pair_sd(seed), dest + ".partial", metadata={"videograin_test_recipe": want})
        os.replace(dest + ".partial", dest)

    path = _place(os.path.join(models_dir, "clip_vision", CLIP_FILE), want, build)
    link = os.path.join(models_dir, "text_encoders", CLIP_FILE)
    if not os.path.exists(link) or not os.path.samefile(path, link):
        if not _has_recipe(link, want):
            _link_or_copy(path, link)
    return CLIP_FILE


def recipe(which: str, seed: int) -> str:
    spec = MODELS[which]
    return json.dumps({"which": which, "seed": seed, "version": RECIPE_VERSION,
                       "note": "random weights for tests: the output is noise",
                       **{k: v for k, v in spec.items() if k != "file"}}, sort_keys=True)


def model_path(models_dir: str, which: str) -> str:
    sub, name = MODELS[which]["file"]
    return os.path.join(models_dir, sub, name)


STORE_ENV = "VIDEOGRAIN_TEST_MODEL_STORE"


def _has_recipe(path: str, want: str) -> bool:
    from safetensors import safe_open
    if not os.path.exists(path):
        return False
    try:
        with safe_open(path, "pt") as f:
            return (f.metadata() or {}).get("videograin_test_recipe") == want
    except Exception:
        return False  # unreadable: rewrite it


def _link_or_copy(src: str, dst: str) -> None:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = dst + ".partial"
    if os.path.lexists(tmp):
        os.remove(tmp)
    try:
        os.link(src, tmp)
    except OSError:  # another file system, or links not allowed
        import shutil
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _place(path: str, want: str, build) -> str:
    """Make `path` a file with recipe `want`: reuse it, link it from the shared store, or
    build it (`build(dest)` writes the file) into the store (when set) and link it."""
    if _has_recipe(path, want):
        return path
    store = os.environ.get(STORE_ENV)
    if not store:
        build(path)
        return path
    key = hashlib.sha256(want.encode()).hexdigest()[:16]
    stored = os.path.join(os.path.abspath(store), f"{key}-{os.path.basename(path)}")
    if not _has_recipe(stored, want):
        os.makedirs(os.path.dirname(stored), exist_ok=True)
        build(stored)
    _link_or_copy(stored, path)
    return path


def write_model(models_dir: str, which: str, seed: int = 0) -> str:
    """Write (or reuse) one test model; returns its path."""
    path = model_path(models_dir, which)
    return _place(path, recipe(which, seed), lambda dest: _build_model(dest, which, seed))


def _build_model(path: str, which: str, seed: int) -> None:
    from safetensors.torch import save_file

    want = recipe(which, seed)
    spec = MODELS[which]
    sd = {}
    if "unet" in spec:
        sd.update(_unet_sd(spec["unet"], seed))
        sd.update(_clip_sd(seed))
        sd.update(_vae_sd(spec["vae"], seed))
    if "cnet" in spec:
        sd.update(_cnet_sd(spec["cnet"], seed))
    for name, factor in spec.get("scale", {}).items():
        sd[name] = (sd[name].float() * factor).to(sd[name].dtype)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".partial"
    # One metadata entry only: safetensors writes several in no fixed order, which would
    # make the bytes differ between identical runs (the recipe says what the file is).
    save_file(sd, tmp, metadata={"videograin_test_recipe": want})
    os.replace(tmp, path)  # never leave a half-written model where the host looks


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfyui", required=True, help="ComfyUI folder (models are written to its models/)")
    ap.add_argument("--which", nargs="+", default=["small", "small_cnet"], choices=sorted(MODELS))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    sys.path.insert(0, os.path.abspath(a.comfyui))
    from comfy.cli_args import args as comfy_args
    comfy_args.cpu = True
    for which in a.which:
        print(which, write_model(os.path.join(os.path.abspath(a.comfyui), "models"), which, a.seed), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
