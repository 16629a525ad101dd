"""Memory model: peak GPU memory of a 512x512 fp16 edit, this pack vs the reference's
materialised attention. Arithmetic with stated assumptions (no GPU needed):

    python bench/gpu_memory.py [--frames 16 64] [--chunk-budget-mib 256]

Assumptions (each line of the output names the term it adds):
- SD1.5 fp16 weights: UNet 859.5 M params, ControlNet 361 M (only if used), VAE 83.7 M,
  CLIP-L 123 M (the host offloads CLIP before sampling, so it is not counted at the peak).
- UNet activations: the host's own per-sample estimate for SD1.5
  (comfy.model_base: area * dtype_size * 0.01 * memory_usage_factor MiB, area = latent
  h*w, factor 1.0) -> 80 MiB per sample at 64x64 latent; classifier-free guidance runs
  cond and uncond together, so a step holds 2*F samples.
- This pack's ST-Layout attention keeps one query chunk of logits (fp32) within its
  budget, plus K and V of all frames of the layer (fp16) and the region membership of the
  keys (1 byte per key and region).
- The reference materialises, per attention call of a modulated layer, the full
  (F*h*w)^2 logits for every head (fp16), a boolean positive map of the same size and the
  softmax output; its authors report ~23 GB at 16 and ~38 GB at 30 frames.
- VAE decode runs after sampling (UNet activations freed) in chunks of 1 frame; the
  host estimates 2178 * latent_area * 64 * dtype_size bytes per decoded frame.
"""
from __future__ import annotations

import argparse

GiB = 1024 ** 3
MiB = 1024 ** 2

UNET_PARAMS = 859.52e6
CNET_PARAMS = 361.3e6
VAE_PARAMS = 83.65e6
FP16 = 2

# SD1.5 attention layers at 512x512: (tokens per frame, channels, heads, count of layers)
SD15_LAYERS = [(64 * 64, 320, 8, 5), (32 * 32, 640, 8, 5), (16 * 16, 1280, 8, 5), (8 * 8, 1280, 8, 1)]


def unet_activations(frames: int, latent_hw: int = 64 * 64) -> float:
    per_sample = latent_hw * FP16 * 0.01 * 1.0 * MiB
    return 2 * frames * per_sample


def pack_attention_working_set(frames: int, regions: int = 3, chunk_budget: float = 256 * MiB) -> float:
    # the largest layer's K and V over all frames, the chunk's logits, the key regions
    tokens, ch, _, _ = SD15_LAYERS[0]
    kv = 2 * frames * tokens * ch * FP16
    return kv + chunk_budget + frames * tokens * regions


def reference_attention_working_set(frames: int) -> float:
    # modulated layers only (32x32 and smaller); the largest dominates
    tokens, _, heads, _ = SD15_LAYERS[1]
    n = frames * tokens
    logits = heads * n * n * FP16
    positive = n * n  # bool
    softmax = heads * n * n * FP16
    return logits + positive + softmax


def vae_decode_chunk(frames_per_chunk: int = 1, latent_hw: int = 64 * 64) -> float:
    return 2178 * latent_hw * 64 * FP16 * frames_per_chunk


def estimate(frames: int, controlnet: bool = False, chunk_budget: float = 256 * MiB) -> dict:
    weights = (UNET_PARAMS + (CNET_PARAMS if controlnet else 0)) * FP16
    sampling_pack = weights + unet_activations(frames) + pack_attention_working_set(frames, chunk_budget=chunk_budget)
    sampling_ref = weights + unet_activations(frames) + reference_attention_working_set(frames)
    decode = VAE_PARAMS * FP16 + vae_decode_chunk()
    return {
        "frames": frames,
        "weights": weights,
        "activations": unet_activations(frames),
        "pack_attention": pack_attention_working_set(frames, chunk_budget=chunk_budget),
        "reference_attention": reference_attention_working_set(frames),
        "pack_peak": max(sampling_pack, decode),
        "reference_peak": max(sampling_ref, decode),
    }


def table(frames_list=(16, 64), controlnet: bool = False, chunk_budget: float = 256 * MiB) -> str:
    rows = ["| frames | weights | UNet activations | pack attention | pack peak | reference attention | reference peak |",
            "|---:|---:|---:|---:|---:|---:|---:|"]
    for f in frames_list:
        e = estimate(f, controlnet, chunk_budget)
        rows.append(f"| {f} | {e['weights'] / GiB:.2f} GB | {e['activations'] / GiB:.2f} GB | "
                    f"{e['pack_attention'] / GiB:.2f} GB | **{e['pack_peak'] / GiB:.1f} GB** | "
                    f"{e['reference_attention'] / GiB:.1f} GB | {e['reference_peak'] / GiB:.1f} GB |")
    return "\n".join(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--controlnet", action="store_true")
    ap.add_argument("--chunk-budget-mib", type=float, default=256)
    a = ap.parse_args(argv)
    print("Estimated peak GPU memory, 512x512, fp16, cfg (cond+uncond batched)"
          + (", with ControlNet" if a.controlnet else ""))
    print(table(a.frames, a.controlnet, a.chunk_budget_mib * MiB))


if __name__ == "__main__":
    main()
