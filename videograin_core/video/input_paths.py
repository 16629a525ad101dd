"""Paths that must stay inside a host input folder (video files, mask files and folders).

One check for every file input of the pack; callers word the error for their input.
"""
from __future__ import annotations

import os
import re


class InputPathError(ValueError):
    """`reason`: "absolute", "parent" (a `..` part) or "outside" (resolves out of the
    folder, e.g. through a symlink)."""

    def __init__(self, reason: str, relative: str):
        super().__init__(f"{relative!r}: {reason}")
        self.reason = reason


def is_inside(base_dir: str, path: str) -> bool:
    """Whether `path`, with every link resolved, lies in `base_dir`."""
    base = os.path.realpath(base_dir)
    return os.path.commonpath([base, os.path.realpath(path)]) == base


def resolve_inside(base_dir: str, relative: str) -> str:
    """The real path of `relative` under `base_dir`; raises InputPathError for absolute
    paths, `..` parts, and anything whose real path leaves the folder."""
    if os.path.isabs(relative) or relative.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", relative):
        raise InputPathError("absolute", relative)
    parts = re.split(r"[\\/]+", relative)
    if ".." in parts:
        raise InputPathError("parent", relative)
    full = os.path.realpath(os.path.join(os.path.realpath(base_dir), *parts))
    if not is_inside(base_dir, full):
        raise InputPathError("outside", relative)
    return full
