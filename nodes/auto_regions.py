"""VideoGrainAutoRegions: region masks without drawing any (METHOD.md section 10), by
k-means over the captured self-attention features of all frames at once
(videograin_core.capture.clusters: deterministic k-means++, canonical numbering)."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..videograin_core.capture.clusters import cluster_masks, kmeans, name_clusters, preview
from .attention_view import captured_take, check_frames
from .wire_types import CAPTURE

MAX_REGIONS = 8


class VideoGrainAutoRegions(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VideoGrainAutoRegions",
            display_name="VideoGrain Auto Regions",
            category="VideoGrain",
            description="Splits the clip into K regions by k-means over the captured self-attention features of "
                        "all frames together (a region is the same in every frame), deterministic. Region k comes "
                        "out as mask_k, one mask per frame at the frames' size, ready for Local Prompt (or Region "
                        "Mask); masks past K are empty. Regions are numbered in reading order of where they first "
                        "appear (frame 0 first) and named by the captured word they attend to most.",
            inputs=[
                CAPTURE.Input("capture", tooltip="VideoGrain Attention Capture's capture output (with a self_grid)"),
                io.Latent.Input("latent", tooltip="the LATENT the captured sampler returned (usually DDIM Invert's "
                                                  "inverted latent: the reference clusters during inversion)"),
                io.Image.Input("images", tooltip="the frames of that run (the masks come at their size)"),
                io.Int.Input("regions", default=3, min=2, max=MAX_REGIONS, tooltip="K, the number of regions"),
                io.Float.Input("name_threshold", default=0.4, min=0.0, max=1.0, step=0.01,
                               tooltip="a region takes a word's name when its mean of that word's map (scaled to "
                                       "0..1 over the clip) reaches this"),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="seed of the k-means++ initialisation"),
            ],
            outputs=[*[io.Mask.Output(f"mask_{i + 1}", display_name=f"mask_{i + 1}") for i in range(MAX_REGIONS)],
                     io.Image.Output("preview", display_name="preview"),
                     io.String.Output("names", display_name="names")],
        )

    @classmethod
    def execute(cls, capture, latent, images, regions=3, name_threshold=0.4, seed=0) -> io.NodeOutput:
        if not 2 <= regions <= MAX_REGIONS:
            raise ValueError(f"regions must be 2..{MAX_REGIONS}, got {regions}")
        take = captured_take(capture, latent)
        check_frames(images, take)
        feats = take.self_features()                                   # [F, h, w, D]
        # names when words were captured (a capture whose words could not be recorded is an error)
        maps = take.cross_maps() if take.cross or take.problems else None
        fr, h, w, _ = feats.shape
        H, W = images.shape[1:3]
        if abs(h * W - w * H) > max(h, w) * max(H, W) * 0.1:
            raise ValueError(f"images are {W}x{H} but the captured grid is {w}x{h} (another shape): connect the "
                             f"frames of the captured run")
        labels = torch.from_numpy(kmeans(feats.reshape(-1, feats.shape[-1]), regions, seed=seed)).reshape(fr, h, w)
        masks = cluster_masks(labels, regions, (H, W))                 # bool [K, F, H, W]
        named = name_clusters(labels, maps, float(name_threshold)) if maps else []
        tags = [f"{i + 1}: {named[i][0]}" if named and named[i][0] else f"{i + 1}" for i in range(regions)]
        lines = [f"mask_{i + 1}: " + (f"{named[i][0] or '-'} ({named[i][1]:.2f})" if named else "-")
                 for i in range(regions)]
        view = preview(images, masks, labels=tags)
        empty = torch.zeros(fr, H, W)
        outs = [masks[i].float() if i < regions else empty for i in range(MAX_REGIONS)]
        return io.NodeOutput(*outs, view, "\n".join(lines))


NODES = [VideoGrainAutoRegions]
