"""On-disk cache of inversion results: safetensors files named by a sha256 key.

The key is a digest of everything the result depends on (see `fingerprint`); the caller
chooses the folder (never from user input). Entries are written to a temporary file and
moved into place, so an interrupted run never leaves a partial entry; a damaged entry
(unreadable, wrong shapes, checksum mismatch) is deleted and reported as a miss.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import time
import types
import uuid

import numpy as np

import torch

from ..pnp.bank import FeatureBank
from .ddim import Inversion

CACHE_VERSION = "videograin-inversion-3"  # 3: the inversion scheme is stored
_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
_FULL_HASH_ELEMENTS = 1 << 22   # tensors up to this size are hashed whole, larger ones sampled
_SAMPLE_ELEMENTS = 4096


# ---------------------------------------------------------------- fingerprints
_HASH_PIECE_ELEMENTS = 1 << 22  # values hashed per piece: the extra memory of a digest is bounded


_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)
_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _hash_values(h, t: torch.Tensor) -> None:
    """Feed t's values to the hash in row-major order, a bounded piece at a time. The
    pieces go in as buffers (no bytes copy), so hashing a clip's frames never holds a
    second copy of them; the digest equals hashing all bytes at once."""
    if t.dim() > 1 and not t.is_contiguous():
        for row in t:  # a non-contiguous tensor's flat copy would be whole: go a row at a time
            _hash_values(h, row)
        return
    flat = t.reshape(-1)  # a view of a contiguous tensor
    for i in range(0, flat.numel(), _HASH_PIECE_ELEMENTS):
        piece = flat[i:i + _HASH_PIECE_ELEMENTS].to("cpu").contiguous()
        if piece.is_floating_point() and piece.dtype not in _NUMPY_FLOATS:
            # numpy has no bfloat16 or float8 (fp8 UNets): the bits are what count
            piece = piece.view(_SAME_SIZE_INT[piece.element_size()])
        h.update(memoryview(piece.numpy()).cast("B"))


def tensor_digest(t: torch.Tensor, sample: bool | None = None) -> str:
    """sha256 of dtype, shape and values; a strided sample of the values when the tensor is
    large (or `sample=True`): model weights are fingerprinted that way, cheaply."""
    t = t.detach()
    n = t.numel()
    if sample is None:
        sample = n > _FULL_HASH_ELEMENTS
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|{'s' if sample else 'f'}|".encode())
    if n and sample and n > _SAMPLE_ELEMENTS:
        # integer positions 0 .. n-1 (a float linspace rounds past the end for large n)
        idx = torch.arange(_SAMPLE_ELEMENTS, dtype=torch.int64, device=t.device) * (n - 1) // (_SAMPLE_ELEMENTS - 1)
        _hash_values(h, t.reshape(-1)[idx])
    elif n:
        _hash_values(h, t)
    return h.hexdigest()


def fingerprint(obj, hook=None, _depth: int = 0, _seen: frozenset = frozenset()):
    """A JSON-able description of `obj` that changes when anything that matters changes:
    tensors by digest, containers recursively, callables by name (and their partial
    arguments, bound object and closure), other objects by type and public attributes
    (`_private` ones are caches by convention), or by their own `videograin_fingerprint()`.
    `hook(obj)` may return a description to use instead (host types), or None."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return repr(obj)
    if _depth > 16:  # patch functions sit ~9 levels down (model_options -> ... -> closure)
        return f"<deep {type(obj).__qualname__}>"
    if hook is not None:
        d = hook(obj)
        if d is not None:  # a host object described by plain parts: fingerprint those
            return fingerprint(d, hook=hook, _depth=_depth + 1, _seen=_seen | {id(obj)})
    if isinstance(obj, torch.Tensor):
        return {"tensor": tensor_digest(obj)}
    if isinstance(obj, np.ndarray):
        return {"tensor": tensor_digest(torch.from_numpy(np.ascontiguousarray(obj)))}
    if id(obj) in _seen:
        return f"<cycle {type(obj).__qualname__}>"
    seen = _seen | {id(obj)}
    rec = functools.partial(fingerprint, hook=hook, _depth=_depth + 1, _seen=seen)
    if isinstance(obj, dict):
        return {"dict": sorted(([str(k), rec(v)] for k, v in obj.items()), key=lambda kv: kv[0])}
    if isinstance(obj, (list, tuple)):
        return [rec(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return {"set": sorted(json.dumps(rec(v), sort_keys=True) for v in obj)}
    if isinstance(obj, torch.nn.Module):
        # Its bases too: the host builds classes such as ModelSamplingAdvanced(sampling base,
        # prediction type) whose own name is the same for eps and v-prediction.
        return {"module": type(obj).__qualname__,
                "bases": [_type_name(c) for c in type(obj).__mro__[1:] if c not in (torch.nn.Module, object)],
                "weights": [[k, tensor_digest(v, sample=True)] for k, v in sorted(obj.state_dict().items())]}
    if isinstance(obj, functools.partial):
        return {"partial": rec(obj.func), "args": rec(obj.args), "kw": rec(obj.keywords)}
    if isinstance(obj, types.ModuleType):  # never walk into modules (their state is the world)
        return {"module": _module_name(obj) or obj.__name__}
    try:  # some objects make attributes up on access (ctypes libraries, proxies)
        own = getattr(obj, "videograin_fingerprint", None)
    except Exception:
        own = None
    if callable(own) and not isinstance(obj, type):  # objects may say what identifies them
        return {"object": _type_name(type(obj)), "own": rec(own())}
    if isinstance(obj, type):  # a class: its name (its attributes are descriptors, not state)
        return {"type": _type_name(obj)}
    if callable(obj) and hasattr(obj, "__qualname__"):
        d = {"fn": f"{_module_name(obj)}.{obj.__qualname__}"}
        if getattr(obj, "__self__", None) is not None and not isinstance(obj.__self__, type(json)):
            d["self"] = rec(obj.__self__)
        if isinstance(getattr(obj, "__closure__", None), tuple):
            cells = []
            for c in obj.__closure__:
                try:
                    cells.append(rec(c.cell_contents))
                except ValueError:  # empty cell
                    cells.append(None)
            d["closure"] = cells
        return d
    state = getattr(obj, "__dict__", None)
    d = {"object": _type_name(type(obj))}
    if state is not None:
        # `_private` attributes are caches by convention (e.g. per-grid terms filled while
        # sampling): leaving them out keeps the key of an object the same after it ran.
        d["state"] = rec({k: v for k, v in state.items() if not k.startswith("_")})
    elif hasattr(obj, "__slots__"):
        d["state"] = rec({s: getattr(obj, s, None) for s in obj.__slots__})
    else:
        d["repr"] = re.sub(r" at 0x[0-9a-fA-F]+", "", repr(obj))[:200]  # no addresses: keys survive restarts
    return d


def _module_name(obj) -> str:
    # Hosts import packs under their folder path: keep the dotted tail only, so a key does
    # not depend on where the pack is installed.
    return re.sub(r"^.*[\\/]", "", str(getattr(obj, "__module__", "") or ""))


def _type_name(t: type) -> str:
    return f"{_module_name(t)}.{t.__qualname__}"


def make_key(parts: dict, hook=None) -> str:
    """sha256 key of the parts (with the cache version)."""
    desc = fingerprint({"version": CACHE_VERSION, **parts}, hook=hook)
    return hashlib.sha256(json.dumps(desc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ---------------------------------------------------------------- the store
_TENSORS = ("latent", "trajectory", "sigmas", "source")
_PNP = "pnp/"   # PnP feature records: extra tensors "pnp/<step>/<layer>/<branch>", their bank in metadata "pnp"


def _checksum(tensors: dict, pnp_meta: str | None = None) -> str:
    """Over the inversion's tensors, then the PnP records in name order and their bank's
    description (an entry without them has the checksum it had before PnP existed)."""
    h = hashlib.sha256()
    if pnp_meta is not None:
        h.update(f"pnp|{pnp_meta}|".encode())
    for name in list(_TENSORS) + sorted(n for n in tensors if n.startswith(_PNP)):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        _hash_values(h, t)
    return h.hexdigest()


def _tensors_checksum(tensors: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        _hash_values(h, t)
    return h.hexdigest()


DEFAULT_MAX_BYTES = 10 * 2**30   # the folder's bound when the caller gives none
_STALE_PARTIAL_SECONDS = 3600    # a .partial file this old belongs to a run that was killed


class InversionCache:
    """Entries `<key>.safetensors` in `folder`, at most `max_bytes` in all: after a write the
    least recently used entries (by modification time; a hit touches its entry) go first."""

    def __init__(self, folder: str, max_bytes: int | None = None):
        self.folder = folder
        self.max_bytes = DEFAULT_MAX_BYTES if max_bytes is None else int(max_bytes)

    def path(self, key: str) -> str:
        if not _KEY_RE.match(key):
            raise ValueError("cache keys are sha256 hex digests")
        return os.path.join(self.folder, f"{key}.safetensors")

    def _read(self, key: str, parse):
        """(parse(metadata, file), "hit") or (None, "miss") or (None, "damaged: why") after
        deleting the entry; `parse` raises on anything that is not a whole, valid entry."""
        from safetensors import safe_open
        path = self.path(key)
        if not os.path.exists(path):
            return None, "miss"
        try:
            with safe_open(path, "pt", device="cpu") as f:
                meta = f.metadata() or {}
                if meta.get("version") != CACHE_VERSION or meta.get("key") != key:
                    raise ValueError("written by another version or for another key")
                value = parse(meta, f)
        except FileNotFoundError:
            return None, "miss"  # pruned meanwhile by another server sharing the folder
        except Exception as e:  # truncated or garbled files raise all sorts of errors
            try:
                os.remove(path)
            except OSError:
                pass
            return None, f"damaged: {e.__class__.__name__}: {e}"
        try:
            os.utime(path)  # recently used: the last to be pruned
        except OSError:
            pass
        return value, "hit"

    def _write(self, key: str, tensors: dict, meta: dict) -> str:
        from safetensors.torch import save_file
        path = self.path(key)
        os.makedirs(self.folder, exist_ok=True)
        tmp = os.path.join(self.folder, f".{key}.{uuid.uuid4().hex}.partial")
        try:
            save_file(tensors, tmp, metadata={"version": CACHE_VERSION, "key": key, **meta})
            os.replace(tmp, path)  # atomic: readers see the old state or the whole entry
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        self.prune(keep=path)
        return path

    def load(self, key: str) -> tuple[Inversion | None, str]:
        """(inversion, "hit") or (None, "miss") or (None, "damaged: why") after deleting it."""
        def parse(meta, f):
            names = list(_TENSORS) + [n for n in f.keys() if n.startswith(_PNP)]
            tensors = {name: f.get_tensor(name) for name in names}
            if meta.get("checksum") != _checksum(tensors, meta.get("pnp")):
                raise ValueError("checksum mismatch")
            features = None
            if "pnp" in meta:
                features = FeatureBank.from_saved(meta["pnp"], tensors["sigmas"],
                                                  {n[len(_PNP):]: t for n, t in tensors.items() if n.startswith(_PNP)})
            return Inversion(latent=tensors["latent"], trajectory=tensors["trajectory"], sigmas=tensors["sigmas"],
                             steps=int(meta["steps"]), source=tensors["source"], scheme=meta["scheme"],
                             features=features)
        return self._read(key, parse)

    def save(self, key: str, inv: Inversion) -> str:
        tensors = {name: getattr(inv, name).detach().to("cpu", torch.float32).contiguous() for name in _TENSORS}
        if inv.features is not None:  # stored as recorded (half precision)
            tensors.update({_PNP + n: t.contiguous() for n, t in inv.features.records.items()})
        pnp_meta = None if inv.features is None else inv.features.to_json()
        meta = {"steps": str(inv.steps), "scheme": inv.scheme, "checksum": _checksum(tensors, pnp_meta)}
        if pnp_meta is not None:
            meta["pnp"] = pnp_meta
        return self._write(key, tensors, meta)

    def save_tensors(self, key: str, kind: str, tensors: dict) -> str:
        """Another kind of entry in the same folder (same atomic write, checksum and bound):
        named float32 tensors, e.g. P2P Sample's null-text embeddings. `kind` is stored and
        checked on load."""
        tensors = {n: t.detach().to("cpu", torch.float32).contiguous() for n, t in tensors.items()}
        return self._write(key, tensors, {"kind": kind, "checksum": _tensors_checksum(tensors)})

    def load_tensors(self, key: str, kind: str) -> tuple[dict | None, str]:
        """(tensors, "hit") or (None, "miss") or (None, "damaged: why") after deleting it."""
        def parse(meta, f):
            if meta.get("kind") != kind:
                raise ValueError(f"an entry of another kind ({meta.get('kind')!r}, not {kind!r})")
            tensors = {name: f.get_tensor(name) for name in f.keys()}
            if meta.get("checksum") != _tensors_checksum(tensors):
                raise ValueError("checksum mismatch")
            return tensors
        return self._read(key, parse)

    def prune(self, keep: str | None = None) -> list[str]:
        """Delete the least recently used entries until the folder holds at most max_bytes
        (never `keep`, the entry just written), and .partial files left by killed runs.
        Returns the names deleted."""
        entries, now, gone = [], time.time(), []
        try:
            names = os.listdir(self.folder)
        except OSError:
            return gone
        for name in names:
            full = os.path.join(self.folder, name)
            try:
                st = os.stat(full)
            except OSError:
                continue  # removed meanwhile (another server on the same folder)
            if name.endswith(".partial"):
                if now - st.st_mtime > _STALE_PARTIAL_SECONDS:
                    entries.append((0.0, 0, full, name))  # first to go, whatever the total
            elif name.endswith(".safetensors") and _KEY_RE.match(name[:-len(".safetensors")]):
                entries.append((st.st_mtime, st.st_size, full, name))
            # anything else in the folder is not ours: left alone
        total = sum(size for _, size, _, _ in entries)
        for _, size, full, name in sorted(entries):  # oldest first
            if name.endswith(".safetensors") and (total <= self.max_bytes or full == keep):
                continue
            try:
                os.remove(full)
            except FileNotFoundError:
                pass  # another server sharing the folder removed it first: gone all the same
            except OSError:
                continue
            gone.append(name)
            total -= size
        return gone
