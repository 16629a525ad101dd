"""VideoGrainMetrics: CLIP-T, CLIP-F, Warp-Err and Q-edit of an edit (METHOD.md section 11;
formulas in videograin_core.metrics.clip_scores), with the CLIP of VideoGrain Metrics CLIP
Loader (nodes/metrics_clip.py, which checks the file holds both projections).

Embeddings in CLIP's joint image-text space:
- image: the CLIP_VISION model's `image_embeds` (its visual projection of the pooled
  output; the host resizes the short side to 224 and centre-crops);
- text: the CLIP text encoder's pooled output (final-layer-norm EOS token, which the host
  returns with return_pooled="unprojected") times the file's `text_projection`.
"""
from __future__ import annotations

import torch
from comfy_api.latest import io, ui

from ..videograin_core.metrics.clip_scores import check_clips, score_edit
from .metrics_clip import MetricsCLIP
from .wire_types import METRICS_CLIP


def text_embedding(metrics_clip: MetricsCLIP, prompt: str) -> torch.Tensor:
    """The prompt's embedding in the joint space [D_joint]."""
    w = metrics_clip.text_projection
    clip = metrics_clip.text
    _, pooled = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled="unprojected")
    if pooled is None or pooled.shape[-1] != w.shape[1]:
        raise ValueError(f"metrics_clip: its pooled text output ({None if pooled is None else pooled.shape[-1]} "
                         f"wide) does not fit its text projection ({w.shape[1]} wide)")
    return (pooled[:1].to("cpu", torch.float32) @ w.T)[0]


class VideoGrainMetrics(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VideoGrainMetrics",
            display_name="VideoGrain Metrics",
            category="VideoGrain",
            description="Scores an edited clip as the paper does (x100, its scale): CLIP-T (prompt-frame CLIP similarity), "
                        "CLIP-F (consecutive-frame similarity), Warp-Err (edited frames warped with the SOURCE "
                        "clip's optical flow, DIS, occlusions left out by a forward-backward check; mean absolute "
                        "difference on 0..1) and Q-edit = CLIP-T / Warp-Err (a ratio). The usual numbers use CLIP "
                        "ViT-L/14.",
            inputs=[
                io.Image.Input("edited", tooltip="the edited frames (Decode's images)"),
                io.Image.Input("source", tooltip="the source frames the edit was made from (the Video Loader's "
                                                 "images): their optical flow is the reference motion"),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="the edit prompt (CLIP reads its first 75 tokens)"),
                METRICS_CLIP.Input("metrics_clip", tooltip="CLIP with both halves and their projections "
                                                           "(VideoGrain Metrics CLIP Loader; CLIP ViT-L/14 for the "
                                                           "paper's numbers)"),
            ],
            outputs=[io.Float.Output("clip_t", display_name="clip_t"),
                     io.Float.Output("clip_f", display_name="clip_f"),
                     io.Float.Output("warp_err", display_name="warp_err"),
                     io.Float.Output("q_edit", display_name="q_edit"),
                     io.String.Output("table", display_name="table")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, edited, source, prompt, metrics_clip) -> io.NodeOutput:
        import comfy.model_management
        import comfy.utils

        check_clips(edited, source)
        if not (prompt or "").strip():
            raise ValueError("prompt is empty: give the edit prompt the frames are scored against")
        if not isinstance(metrics_clip, MetricsCLIP):
            raise ValueError("metrics_clip: connect VideoGrain Metrics CLIP Loader's metrics_clip output")
        text = text_embedding(metrics_clip, prompt)
        chunk = 16
        total = -(-edited.shape[0] // chunk) + max(0, edited.shape[0] - 1)
        bar = comfy.utils.ProgressBar(total)

        def progress(_what):
            comfy.model_management.throw_exception_if_processing_interrupted()
            bar.update(1)

        def encode(images):
            return metrics_clip.vision.encode_image(images, crop=True)["image_embeds"]

        scores = score_edit(edited, source, text, encode, chunk=chunk, on_progress=progress)
        table = scores.table()
        return io.NodeOutput(scores.clip_t, scores.clip_f, scores.warp_err, scores.q_edit, table,
                             ui=ui.PreviewText(table))


NODES = [VideoGrainMetrics]
