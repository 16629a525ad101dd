"""VideoGrainMetrics: CLIP-T, CLIP-F, Warp-Err and Q-edit of an edit (METHOD.md section 11;
formulas in videograin_core.metrics.clip_scores), with the host's CLIP models.

Embeddings in CLIP's joint image-text space:
- image: the CLIP_VISION model's `image_embeds` (its visual projection of the pooled
  output; the host resizes the short side to 224 and centre-crops);
- text: the CLIP text encoder's pooled output (final-layer-norm EOS token, which the host
  returns with return_pooled="unprojected") times that encoder's `text_projection`. The
  host's SD1.5 text model returns the pooled output unprojected by default, and an SD1.5
  checkpoint has no text projection at all: the host leaves the weight unset (zeros in
  practice), which is reported here as an error naming `clip`.
"""
from __future__ import annotations

import torch
from comfy_api.latest import io, ui

from ..videograin_core.metrics.clip_scores import check_clips, score_edit

USUAL = ("openai clip-vit-large-patch14 (its model.safetensors holds both halves: put it in models/clip_vision for "
         "CLIP Vision Loader and in models/text_encoders for CLIP Loader, type stable_diffusion)")


def _projection_weight(module, what: str, name: str) -> torch.Tensor:
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"{what}: this model has no {name} into CLIP's joint image-text space, so its embeddings "
                         f"cannot be compared with the other model's; use {USUAL}")
    w = w.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(w).all()) or not bool(w.abs().max() > 0):
        raise ValueError(f"{what}: the model's {name} is missing from its file (the weight is unset: "
                         f"{'zeros' if bool(torch.isfinite(w).all()) else 'not finite'}); SD1.5 checkpoints ship "
                         f"CLIP-L without one. Use {USUAL}")
    return w


def text_projection(clip) -> torch.Tensor:
    """The weight [D_out, D_in] of the CLIP text encoder's projection (checked)."""
    if clip is None:
        raise ValueError("clip: the CLIP input is empty (the checkpoint has no text encoder)")
    model = getattr(clip, "cond_stage_model", None)
    found = [m for n, m in model.named_modules() if n.split(".")[-1] == "text_projection"] if model is not None else []
    if len(found) != 1:
        raise ValueError(f"clip: expected one CLIP text encoder with a text projection, found {len(found)} "
                         f"(SDXL-style CLIPs hold two); use {USUAL}")
    return _projection_weight(found[0], "clip", "text projection")


def text_embedding(clip, prompt: str) -> torch.Tensor:
    w = text_projection(clip)
    tokens = clip.tokenize(prompt)
    _, pooled = clip.encode_from_tokens(tokens, return_pooled="unprojected")
    if pooled is None or pooled.shape[-1] != w.shape[1]:
        raise ValueError(f"clip: its pooled output ({None if pooled is None else pooled.shape[-1]} wide) does not "
                         f"fit its text projection ({w.shape[1]} wide)")
    return (pooled[:1].to("cpu", torch.float32) @ w.T)[0]


def vision_projection(clip_vision) -> torch.Tensor:
    """The weight [D_out, D_in] of the CLIP image encoder's projection (checked)."""
    if clip_vision is None or not hasattr(clip_vision, "encode_image"):
        raise ValueError("clip_vision: connect a CLIP Vision Loader's model")
    model = getattr(clip_vision, "model", None)
    return _projection_weight(getattr(model, "visual_projection", None), "clip_vision", "visual projection")


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
                io.ClipVision.Input("clip_vision", tooltip="CLIP image encoder with its visual projection (CLIP "
                                                           "Vision Loader; e.g. openai clip-vit-large-patch14)"),
                io.Clip.Input("clip", tooltip="the text encoder of the same CLIP, with its text projection (CLIP "
                                              "Loader, type stable_diffusion); an SD1.5 checkpoint's CLIP has none"),
            ],
            outputs=[io.Float.Output("clip_t", display_name="clip_t"),
                     io.Float.Output("clip_f", display_name="clip_f"),
                     io.Float.Output("warp_err", display_name="warp_err"),
                     io.Float.Output("q_edit", display_name="q_edit"),
                     io.String.Output("table", display_name="table")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, edited, source, prompt, clip_vision, clip) -> io.NodeOutput:
        import comfy.model_management
        import comfy.utils

        check_clips(edited, source)
        if not (prompt or "").strip():
            raise ValueError("prompt is empty: give the edit prompt the frames are scored against")
        image_dims = vision_projection(clip_vision).shape[0]
        text = text_embedding(clip, prompt)
        if text.shape[-1] != image_dims:
            raise ValueError(f"clip: its text embeddings have {text.shape[-1]} dimensions but clip_vision's image "
                             f"embeddings {image_dims}: use the two halves of one CLIP model ({USUAL})")
        chunk = 16
        total = -(-edited.shape[0] // chunk) + max(0, edited.shape[0] - 1)
        bar = comfy.utils.ProgressBar(total)

        def progress(_what):
            comfy.model_management.throw_exception_if_processing_interrupted()
            bar.update(1)

        def encode(images):
            return clip_vision.encode_image(images, crop=True)["image_embeds"]

        scores = score_edit(edited, source, text, encode, chunk=chunk, on_progress=progress)
        table = scores.table()
        return io.NodeOutput(scores.clip_t, scores.clip_f, scores.warp_err, scores.q_edit, table,
                             ui=ui.PreviewText(table))


NODES = [VideoGrainMetrics]
