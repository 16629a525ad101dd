"""VideoGrainSaveVideo: IMAGE frames + fps -> h264 mp4 in the host's output folder, optionally
a side-by-side (source | edit) mp4 as well."""
from __future__ import annotations

import json
import os

import folder_paths
import torch
import torch.nn.functional as F
from comfy.cli_args import args
from comfy_api.latest import io, ui

from ..videograin_core.video import video_io


def side_by_side(source: torch.Tensor, edit: torch.Tensor):
    """source | edit, a frame [H, W_src + W, 3] at a time (never the whole clip twice); the
    source is resized to the edit's height if they differ."""
    if source.shape[0] != edit.shape[0]:
        raise ValueError(f"source has {source.shape[0]} frames but images has {edit.shape[0]}: connect the frames "
                         "the edit was made from (the Video Loader's images)")

    def frames():
        for src, out in zip(source, edit):
            src = src[..., :3]
            if src.shape[0] != out.shape[0]:
                w = max(1, round(src.shape[1] * out.shape[0] / src.shape[0]))
                src = F.interpolate(src.movedim(-1, 0)[None].float(), size=(out.shape[0], w), mode="bilinear",
                                    align_corners=False, antialias=True)[0].movedim(0, -1).clamp(0, 1)
            yield torch.cat([src.cpu().float(), out[..., :3].cpu().float()], dim=1)

    return frames()


class VideoGrainSaveVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VideoGrainSaveVideo",
            display_name="VideoGrain Save Video",
            category="VideoGrain",
            description="Save frames as an h264 mp4 in the output folder; with `source`, also a side-by-side "
                        "(source | edit) mp4.",
            inputs=[
                io.Image.Input("images"),
                io.Float.Input("fps", default=8.0, min=0.01, max=1000.0, step=0.01),
                io.String.Input("filename_prefix", default="videograin/VideoGrain",
                                tooltip="Name prefix inside the output folder (the host picks the number)."),
                io.Int.Input("crf", default=19, min=0, max=51, tooltip="h264 quality: lower is better and bigger."),
                io.Image.Input("source", optional=True, tooltip="The source frames: also save source | edit."),
            ],
            outputs=[],
            hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, images, fps, filename_prefix, crf=19, source=None) -> io.NodeOutput:
        if images.ndim != 4 or images.shape[0] == 0:
            raise ValueError(f"images must be [frames, height, width, 3] with at least one frame, got "
                             f"{tuple(images.shape)}")
        if not fps or fps <= 0:
            raise ValueError(f"fps must be > 0, got {fps}: connect the Video Loader's fps")
        sbs = side_by_side(source, images) if source is not None else None
        metadata = {}
        hidden = cls.hidden  # None when called outside an execution
        if not args.disable_metadata and hidden is not None:
            if hidden.prompt is not None:
                metadata["prompt"] = json.dumps(hidden.prompt)
            if hidden.extra_pnginfo is not None:
                for k, v in hidden.extra_pnginfo.items():
                    metadata[k] = json.dumps(v)
        output_dir = folder_paths.get_output_directory()
        # The host compares plain paths, and creates missing folders before it returns: a
        # symlinked folder inside output/ could lead out, so the real path is checked first.
        real_out = os.path.realpath(output_dir)
        target = os.path.realpath(os.path.join(output_dir, os.path.dirname(os.path.normpath(filename_prefix))))
        if os.path.commonpath([real_out, target]) != real_out and not os.path.isabs(filename_prefix) \
                and ".." not in os.path.normpath(filename_prefix).split(os.sep):
            raise ValueError(f"filename_prefix {filename_prefix!r} leads out of the output folder through a "
                             f"symbolic link: choose a prefix whose folders are inside the output folder")
        folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, output_dir, images.shape[2], images.shape[1])
        results = []
        for suffix, frames in (("", images), ("sbs", sbs)):
            if frames is None:
                continue
            name = f"{filename}_{counter:05}_{suffix}.mp4"
            video_io.write_video(os.path.join(folder, name), frames, float(fps), crf=crf, metadata=metadata)
            results.append(ui.SavedResult(name, subfolder, io.FolderType.output))
        return io.NodeOutput(ui=ui.PreviewVideo(results))


NODES = [VideoGrainSaveVideo]
