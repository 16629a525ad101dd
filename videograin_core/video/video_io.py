"""Video files in and out with PyAV: probing, streaming decode through the frame
transform, memory estimates, and h264 mp4 writing.

Decoding is streaming: each kept frame is resized/cropped as soon as it is decoded and
stored as uint8; frames that are not kept are never converted to pixels. So the peak
memory is the kept frames (uint8) plus the final float IMAGE, never the whole source.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, replace
from fractions import Fraction

import numpy as np
import torch

from .frame_transform import FrameTransform, kept_frames, plan_transform

__all__ = ["FrameTransform", "VideoInfo", "probe_video", "estimate_load_bytes", "load_video", "write_video",
           "VIDEO_EXTENSIONS", "format_bytes"]

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi", ".gif", ".mpg", ".mpeg", ".wmv", ".flv")

# Bytes per kept output value while loading: the uint8 copy held during decoding plus the
# float32 IMAGE it becomes at the end.
_BYTES_PER_VALUE_LOADING = 1 + 4


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    frame_count: int | None   # from the container's metadata; None when it does not say
    fps: float
    codec: str


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def open_video(path: str, label: str, what: str = "video"):
    """The container, or a ValueError naming `what` `label` that says what to do."""
    import av
    if not os.path.isfile(path):
        raise ValueError(f"{what} {label!r} does not exist: upload it to the input folder or pick another file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{what} {label!r} is empty (0 bytes): upload the file again")
    try:
        # Tags in another encoding than UTF-8 (old cameras, Windows taggers) must not make a
        # playable file unreadable.
        container = av.open(path, metadata_errors="replace")
    except av.error.FFmpegError as e:
        raise ValueError(f"{what} {label!r} could not be read as a video ({e.__class__.__name__}: {e}): "
                         "the file is damaged or not a video; re-encode it (e.g. to h264 mp4) or pick another file") from None
    if not container.streams.video:
        container.close()
        raise ValueError(f"{what} {label!r} has no video stream: pick a file that contains video")
    return container


def _stream_info(path: str, label: str, stream) -> VideoInfo:
    cc = stream.codec_context
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 0.0
    count = int(stream.frames or 0)
    if count <= 0:
        # webm/mkv store no frame count, and a count from the duration is a guess (the
        # container's duration covers its audio too; variable frame rates miss it by far):
        # count the packets instead, one per frame, reading the file without decoding it.
        count, mean_fps = _count_frames(path, label)
        if mean_fps and (not fps or abs(mean_fps - fps) > 0.01 * fps):
            # the nominal rate is not the real one (variable frame rate); within 1 % it is
            # and the difference is the timestamps' rounding (webm counts milliseconds)
            fps = mean_fps
    return VideoInfo(int(cc.width), int(cc.height), count or None, fps, cc.name)


def _count_frames(path: str, label: str) -> tuple[int, float | None]:
    """Frames of the first video stream by demuxing its packets, and their mean rate from
    the first and last timestamps (None when the timestamps do not tell)."""
    container = open_video(path, label)
    try:
        stream = container.streams.video[0]
        n, first, last = 0, None, None
        for packet in container.demux(stream):
            if packet.size == 0:
                continue  # the demuxer's end-of-stream marker
            n += 1
            if packet.pts is not None:
                first = packet.pts if first is None else min(first, packet.pts)
                last = packet.pts if last is None else max(last, packet.pts)
        span = float((last - first) * stream.time_base) if first is not None and stream.time_base else 0.0
    except Exception:  # a damaged file: decoding will say what is wrong
        return 0, None
    finally:
        container.close()
    return n, ((n - 1) / span if n > 1 and span > 0 else None)


def _pixel_aspect(stream) -> float:
    """Width/height of one stored pixel (the sample aspect ratio; 1 when unset)."""
    for owner in (stream, stream.codec_context):
        sar = getattr(owner, "sample_aspect_ratio", None)
        if sar and float(sar) > 0:
            return float(sar)
    return 1.0


def quarter_turns(frame) -> int:
    """Counter-clockwise quarter turns that make a decoded frame upright: phone videos are
    stored sideways with a display rotation in their metadata, which the decoder reports
    but does not apply."""
    return round(float(getattr(frame, "rotation", 0) or 0) / 90) % 4


def upright_pixels(frame, fmt: str, turns: int | None = None) -> np.ndarray:
    """The frame as an [H, W, C] array in `fmt`, turned upright."""
    a = frame.to_ndarray(format=fmt)
    turns = quarter_turns(frame) if turns is None else turns
    return np.ascontiguousarray(np.rot90(a, k=turns)) if turns else a


def probe_video(path: str, label: str | None = None) -> VideoInfo:
    """Size, frame count and rate from the container's metadata (nothing is decoded)."""
    label = label or os.path.basename(path)
    container = open_video(path, label)
    try:
        info = _stream_info(path, label, container.streams.video[0])
    finally:
        container.close()
    if info.width <= 0 or info.height <= 0:
        raise ValueError(f"video {label!r} reports no frame size: the file is damaged; re-encode it")
    return info


def estimate_load_bytes(transform: FrameTransform, kept_frames: int | None = None) -> int:
    """Peak memory of loading: kept frames at output size (uint8 while decoding + float32
    IMAGE at the end) plus one source frame being converted."""
    w, h = transform.size
    kept = transform.frame_count if kept_frames is None else kept_frames
    sw, sh = transform.source_size
    return kept * w * h * 3 * _BYTES_PER_VALUE_LOADING + sw * sh * 3 * (1 + 4 + 4)


def _too_big(label, need, available):
    return ValueError(
        f"video {label!r}: the requested frames need about {format_bytes(need)} of memory but only "
        f"{format_bytes(available)} can be used (available RAM minus a safety margin): lower frame_load_cap, "
        "raise select_every_nth, or choose a smaller size")


def load_video(path: str, *, skip_first: int = 0, every_nth: int = 1, frame_cap: int = 0, short_side: int = 0,
               crop: str = "center", multiple_of: int = 8, memory_limit: int | None = None,
               label: str | None = None):
    """Decode a video into IMAGE frames [F, H, W, 3] float 0..1.

    Returns (frames, fps of the kept frames, FrameTransform). `memory_limit` (bytes): a
    request whose estimate exceeds it is refused before anything is decoded (and again
    while decoding, when the container did not tell the frame count).
    """
    import av
    label = label or os.path.basename(path)
    container = open_video(path, label)
    try:
        stream = container.streams.video[0]
        info = _stream_info(path, label, stream)
        if info.width <= 0 or info.height <= 0:
            raise ValueError(f"video {label!r} reports no frame size: the file is damaged; re-encode it")
        # Plan with the metadata count; unknown counts plan with a cap-sized guess and the
        # real indices are recorded while decoding.
        meta_count = info.frame_count
        plan_count = meta_count if meta_count else skip_first + max(frame_cap, 1) * every_nth
        pixel_aspect = _pixel_aspect(stream)
        plan = dict(skip_first=skip_first, every_nth=every_nth, frame_cap=frame_cap, short_side=short_side, crop=crop,
                    multiple_of=multiple_of, pixel_aspect=pixel_aspect)
        sizes = plan_transform((info.width, info.height), 0, **plan)  # the sizes alone, no frame list yet
        kept_count = len(kept_frames(plan_count, skip_first, every_nth, frame_cap))
        if meta_count is not None and kept_count == 0:
            raise ValueError(f"video {label!r} has {meta_count} frames: skip_first_frames={skip_first} leaves none; "
                             "lower skip_first_frames")
        if memory_limit is not None and (meta_count or frame_cap):
            # checked before the frame list is built: a damaged header claiming a billion
            # frames is refused here, not after building a billion indices
            need = estimate_load_bytes(sizes, kept_count)
            if need > memory_limit:
                raise _too_big(label, need, memory_limit)
        transform = plan_transform((info.width, info.height), plan_count, **plan)

        stream.thread_type = "AUTO"
        kept: list[torch.Tensor] = []
        indices: list[int] = []
        decoded = 0
        try:
            for i, frame in enumerate(container.decode(stream)):
                decoded = i + 1
                if i < skip_first or (i - skip_first) % every_nth:
                    continue  # not kept: never converted to pixels
                turns = quarter_turns(frame)
                upright = (frame.height, frame.width) if turns % 2 else (frame.width, frame.height)
                if upright != transform.source_size:
                    if kept:
                        raise ValueError(f"video {label!r} changes frame size mid-stream "
                                         f"({transform.source_size} -> {upright}): re-encode it")
                    # a turned frame turns its pixels too: their width/height ratio inverts
                    transform = plan_transform(upright, plan_count, **{
                        **plan, "pixel_aspect": 1.0 / pixel_aspect if turns % 2 else pixel_aspect})
                rgb = torch.from_numpy(upright_pixels(frame, "rgb24", turns)).permute(2, 0, 1)[None]
                out = transform.apply_spatial(rgb)
                if out.dtype != torch.uint8:
                    out = out.round_().clamp_(0, 255).to(torch.uint8)
                kept.append(out[0].permute(1, 2, 0).contiguous())  # contiguous: drop the uncropped frame
                indices.append(i)
                if memory_limit is not None and not meta_count:
                    need = estimate_load_bytes(transform, len(kept))
                    if need > memory_limit:
                        raise _too_big(label, need, memory_limit)
                if frame_cap and len(kept) >= frame_cap:
                    break
        except av.error.FFmpegError as e:  # broken bitstreams (our own ValueErrors pass through)
            if not kept:
                raise ValueError(f"video {label!r} could not be decoded ({e.__class__.__name__}: {e}): the file is "
                                 "damaged; re-encode it or pick another file") from None
            # A damaged tail: keep what decoded cleanly (players do the same).
    finally:
        container.close()

    if not kept:
        if decoded == 0:
            raise ValueError(f"video {label!r} contains no decodable frames: the file is damaged or empty; "
                             "re-encode it or pick another file")
        raise ValueError(f"video {label!r} has {decoded} frames: skip_first_frames={skip_first} leaves none; "
                         "lower skip_first_frames")

    source_count = max(decoded, meta_count or 0) if frame_cap and len(kept) >= frame_cap else decoded
    transform = replace(transform, source_frame_count=source_count, frame_indices=tuple(indices))
    w, h = transform.size
    frames = torch.empty((len(kept), h, w, 3), dtype=torch.float32)
    for j in range(len(kept)):
        frames[j] = kept[j].to(torch.float32).div_(255.0)
        kept[j] = None  # free as we go: peak stays at uint8 + float
    fps = info.fps / every_nth if info.fps else 0.0
    return frames, fps, transform


def write_video(path: str, frames, fps: float, *, codec: str = "libx264", crf: int = 19,
                pix_fmt: str = "yuv420p", metadata: dict | None = None) -> None:
    """Encode IMAGE frames (float 0..1) to a video file (h264 mp4 by default): a tensor
    [F, H, W, 3], or any iterable of [H, W, 3] frames, which is read one frame at a time.

    yuv420p needs even sizes: odd sizes are padded by repeating the last row/column.
    Written to `path + ".partial"` first and moved into place, so no half file is left.
    """
    import av
    if isinstance(frames, torch.Tensor) and (frames.ndim != 4 or frames.shape[-1] < 3):
        raise ValueError(f"expected IMAGE frames [frames, height, width, 3], got shape {tuple(frames.shape)}")
    if not fps or fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        raise ValueError("no frames to write")
    if first.ndim != 3 or first.shape[-1] < 3:
        raise ValueError(f"expected frames [height, width, 3], got shape {tuple(first.shape)}")
    h, w = int(first.shape[0]), int(first.shape[1])
    ph, pw = h + (h % 2), w + (w % 2)
    tmp = path + ".partial"
    ext = os.path.splitext(path)[1].lstrip(".") or "mp4"
    fmt = {"mkv": "matroska"}.get(ext, ext)
    # mp4/mov muxers keep only the tags they know unless told to write all of them: without
    # this the workflow and prompt JSON would silently not be in the file
    options = {"movflags": "use_metadata_tags"} if fmt in ("mp4", "mov") and metadata else None
    container = av.open(tmp, mode="w", format=fmt, options=options)
    try:
        for k, v in (metadata or {}).items():
            container.metadata[k] = v
        stream = container.add_stream(codec, rate=Fraction(round(fps * 1000), 1000))
        stream.width, stream.height = pw, ph
        stream.pix_fmt = pix_fmt
        if codec in ("libx264", "h264"):
            stream.options = {"crf": str(crf)}
        for i, f in enumerate(itertools.chain([first], frames)):
            if tuple(f.shape[:2]) != (h, w):
                raise ValueError(f"frame {i} is {f.shape[1]}x{f.shape[0]} but frame 0 is {w}x{h}: every frame "
                                 f"of a video has the same size")
            a = (f[..., :3].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
            if (ph, pw) != (h, w):
                a = np.pad(a, ((0, ph - h), (0, pw - w), (0, 0)), mode="edge")
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(a), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    except BaseException:
        container.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    container.close()
    os.replace(tmp, path)
