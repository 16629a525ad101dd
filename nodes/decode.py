"""VideoGrainDecode: VAE decode of a video latent in frame chunks sized to free memory."""
from __future__ import annotations

import comfy.model_management
import comfy.utils
import torch
from comfy_api.latest import io

MAX_CHUNK = 16  # a cap even when memory is plentiful: keeps the progress bar moving


def chunk_frames(vae, latent: torch.Tensor, cap: int = MAX_CHUNK) -> int:
    """Frames per decode call: the host's per-sample estimate of VAE decode memory for one
    frame against the decode device's free memory (80% of it), at most `cap`."""
    one = (1,) + tuple(latent.shape[1:])
    try:
        per_frame = float(vae.memory_used_decode(one, vae.vae_dtype))
    except Exception:  # VAEs without an estimate: a conservative guess from the latent size
        per_frame = float(latent[0].numel()) * 64 * 2178 * 4 / latent.shape[1]
    free = comfy.model_management.get_free_memory(vae.device)
    return max(1, min(cap, latent.shape[0], int(free * 0.8 // max(per_frame, 1.0))))


class VideoGrainDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VideoGrainDecode",
            display_name="VideoGrain Decode",
            category="VideoGrain",
            description="VAE decode of all frames, a memory-sized chunk of frames at a time.",
            inputs=[
                io.Latent.Input("samples"),
                io.Vae.Input("vae"),
                io.Int.Input("max_frames_per_chunk", default=MAX_CHUNK, min=1, max=256,
                             tooltip="Upper bound on frames decoded together (fewer when memory is short)."),
            ],
            outputs=[io.Image.Output(display_name="images")],
        )

    @classmethod
    def execute(cls, samples, vae, max_frames_per_chunk=MAX_CHUNK) -> io.NodeOutput:
        latent = samples["samples"]
        if latent.ndim != 4:
            raise ValueError(f"samples must be a latent of [frames, channels, height, width], got shape "
                             f"{tuple(latent.shape)}")
        n = latent.shape[0]
        chunk = chunk_frames(vae, latent, max_frames_per_chunk)
        pbar = comfy.utils.ProgressBar(n)
        out = None
        for i in range(0, n, chunk):
            comfy.model_management.throw_exception_if_processing_interrupted()
            images = vae.decode(latent[i:i + chunk])
            if images.ndim == 5:  # video VAEs return [B, T, H, W, C]
                images = images.reshape(-1, *images.shape[-3:])
            if out is None:
                out = torch.empty((n,) + tuple(images.shape[1:]), dtype=torch.float32)
            out[i:i + images.shape[0]] = images.float().cpu()
            pbar.update_absolute(min(n, i + chunk), n)
        return io.NodeOutput(out)


NODES = [VideoGrainDecode]
