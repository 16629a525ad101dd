"""VideoGrainVideoLoader: a video from the host's input folder -> IMAGE frames, fps, frame
count and the frame transform (which the Region Mask nodes apply to their masks)."""
from __future__ import annotations

import hashlib
import os
import re

import folder_paths
import psutil
from comfy_api.latest import io

from ..videograin_core.video import video_io
from ..videograin_core.video.input_paths import InputPathError, resolve_inside

from .wire_types import TRANSFORM as Transform

# Leave a quarter of the available RAM (and at least 512 MiB) to everything else.
MEMORY_FRACTION = 0.75
MEMORY_RESERVE = 512 << 20


def _video_files() -> list[str]:
    base = folder_paths.get_input_directory()
    try:
        names = [f for f in os.listdir(base) if os.path.isfile(os.path.join(base, f))]
    except OSError:
        return []
    names = folder_paths.filter_files_content_types(names, ["video"])
    return sorted(set(names) | {n for n in os.listdir(base) if n.lower().endswith(video_io.VIDEO_EXTENSIONS)
                                and os.path.isfile(os.path.join(base, n))})


def resolve_input_video(name) -> str:
    """The real path of `name` inside the host's input folder; anything that leads outside
    it (absolute paths, `..`, symlinks out of the folder) is refused."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError("video: no file chosen; upload a video or pick one from the list")
    rel = name[:-len(" [input]")] if name.endswith(" [input]") else name
    if re.search(r" \[(output|temp)\]$", rel):
        raise ValueError(f"video {name!r}: only files in the input folder can be loaded; copy it to the input folder")
    messages = {
        "absolute": f"video {name!r}: absolute paths are not allowed; upload the file to the input folder "
                    "and pick it by name",
        "parent": f"video {name!r}: '..' is not allowed; pick a file inside the input folder",
        "outside": f"video {name!r} resolves outside the input folder (a symlink?); "
                   "copy the file into the input folder instead",
    }
    try:
        full = resolve_inside(folder_paths.get_input_directory(), rel)
    except InputPathError as e:
        raise ValueError(messages[e.reason]) from None
    if not os.path.isfile(full):
        raise ValueError(f"video {name!r} does not exist in the input folder: upload it or pick another file")
    return full


class VideoGrainVideoLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VideoGrainVideoLoader",
            display_name="VideoGrain Video Loader",
            category="VideoGrain",
            description="Load a video from the input folder as frames resized/cropped to a multiple of 8, "
                        "with the transform the region masks must follow.",
            inputs=[
                io.Combo.Input("video", options=_video_files(), upload=io.UploadType.video,
                               tooltip="A video file in the input folder (mp4, webm, mov, avi, ...)."),
                io.Int.Input("skip_first_frames", default=0, min=0, max=1_000_000,
                             tooltip="Source frames to drop at the start."),
                io.Int.Input("select_every_nth", default=1, min=1, max=1000,
                             tooltip="Keep one frame in n (the fps output is divided by n)."),
                io.Int.Input("frame_load_cap", default=16, min=0, max=100_000,
                             tooltip="Most frames to keep (0 = all)."),
                io.Int.Input("size", default=512, min=0, max=8192, step=8,
                             tooltip="Short side in pixels after resizing (0 = keep the source size)."),
                io.Combo.Input("crop", options=["center", "center_square", "none"], default="center",
                               tooltip="center: crop the long side to a multiple of 8; center_square: crop to a "
                                       "square; none: stretch each side to the nearest multiple of 8."),
            ],
            outputs=[
                io.Image.Output(display_name="images"),
                io.Float.Output(display_name="fps"),
                io.Int.Output(display_name="frame_count"),
                Transform.Output(display_name="transform"),
            ],
        )

    @classmethod
    def validate_inputs(cls, video):
        try:
            resolve_input_video(video)
        except ValueError as e:
            return str(e)
        return True

    @classmethod
    def fingerprint_inputs(cls, video, **kwargs):
        try:
            path = resolve_input_video(video)
        except ValueError:
            return video
        st = os.stat(path)
        # mtime + size + the first and last MiB: re-uploads change it, big files stay cheap.
        h = hashlib.sha256(f"{st.st_mtime_ns}|{st.st_size}|".encode())
        with open(path, "rb") as f:
            h.update(f.read(1 << 20))
            if st.st_size > 2 << 20:
                f.seek(-(1 << 20), os.SEEK_END)
                h.update(f.read())
        return h.hexdigest()

    @classmethod
    def execute(cls, video, skip_first_frames, select_every_nth, frame_load_cap, size, crop) -> io.NodeOutput:
        path = resolve_input_video(video)
        available = psutil.virtual_memory().available
        limit = max(0, int(available * MEMORY_FRACTION) - MEMORY_RESERVE)
        frames, fps, transform = video_io.load_video(
            path, skip_first=skip_first_frames, every_nth=select_every_nth, frame_cap=frame_load_cap,
            short_side=size, crop=crop, multiple_of=8, memory_limit=limit, label=video)
        return io.NodeOutput(frames, float(fps), int(frames.shape[0]), transform)


NODES = [VideoGrainVideoLoader]
