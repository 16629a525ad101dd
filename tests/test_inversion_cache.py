"""Fingerprints of the inversion cache key, without the host."""
from __future__ import annotations

import torch

from videograin_core.sampling.inversion_cache import tensor_digest


def test_sampled_digest_of_a_large_tensor_stays_in_bounds():
    # SD1.5 has weights of 29,491,200 elements: a float32 linspace of sample positions
    # rounds its last position past the end there.
    t = torch.zeros(29_491_200, dtype=torch.float16)
    a = tensor_digest(t, sample=True)
    t[-1] = 1.0  # the last element is always sampled
    assert tensor_digest(t, sample=True) != a
    t[0] = 1.0
    assert tensor_digest(t, sample=True) != tensor_digest(torch.zeros_like(t), sample=True)


def test_digest_follows_values_shape_and_dtype():
    x = torch.arange(12, dtype=torch.float32)
    assert tensor_digest(x) == tensor_digest(x.clone())
    assert tensor_digest(x) != tensor_digest(x.reshape(3, 4))
    assert tensor_digest(x) != tensor_digest(x.double())
    y = x.clone()
    y[5] += 1
    assert tensor_digest(x) != tensor_digest(y)


def _plain_digest(t: torch.Tensor, sample: bool) -> str:
    """The same digest the plain way: every byte at once (a whole copy of the values)."""
    import hashlib
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|{'s' if sample else 'f'}|".encode())
    c = t.contiguous()
    h.update((c.view(torch.int16) if c.dtype == torch.bfloat16 else c).numpy().tobytes())
    return h.hexdigest()


def test_digest_hashes_pieces_like_the_whole(monkeypatch):
    """Pieces (here 7 values; a row at a time for non-contiguous tensors) give the digest of
    all bytes at once, so keys of entries written before stay valid."""
    import videograin_core.sampling.inversion_cache as ic
    monkeypatch.setattr(ic, "_HASH_PIECE_ELEMENTS", 7)
    g = torch.Generator().manual_seed(0)
    frames = torch.rand(3, 5, 4, 3, generator=g)                 # an IMAGE batch
    cases = [frames, frames.transpose(1, 2), frames[:, ::2], torch.rand(50, generator=g).bfloat16(),
             torch.rand(2, 9, generator=g) > 0.5, torch.arange(7.0), torch.zeros(0)]
    for t in cases:
        assert tensor_digest(t, sample=False) == _plain_digest(t, False), (t.dtype, tuple(t.shape), t.stride())
    assert tensor_digest(frames.transpose(1, 2), sample=False) != tensor_digest(frames, sample=False)


def test_digest_and_checksum_hold_no_copy_of_the_values():
    """Hashing a clip's pixels (64 MiB here) allocates no bytes copy of them (tracemalloc
    sees every Python-level allocation, a `tobytes()` copy included)."""
    import tracemalloc

    import videograin_core.sampling.inversion_cache as ic
    frames = torch.rand(16, 512, 512, 4)  # 64 MiB of float32
    tracemalloc.start()
    try:
        tensor_digest(frames, sample=False)
        ic._checksum({name: frames for name in ic._TENSORS})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20, f"{peak / 2**20:.1f} MiB allocated while hashing 64 MiB"


def test_digest_of_dtypes_numpy_lacks():
    """bfloat16 and float8 weights (fp8 UNets) are hashed by their bits: no error, and a
    changed value changes the digest."""
    x = torch.linspace(-2, 2, 64)
    for dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
        t = x.to(dtype)
        d = tensor_digest(t, sample=False)
        assert d == _plain_digest_bits(t) == tensor_digest(t.clone())
        u = t.clone()
        u[3] = 1.5
        assert tensor_digest(u) != d, dtype
        assert d != tensor_digest(x.half()), dtype


def _plain_digest_bits(t: torch.Tensor) -> str:
    import hashlib
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|f|".encode())
    h.update(t.contiguous().view({1: torch.uint8, 2: torch.int16}[t.element_size()]).numpy().tobytes())
    return h.hexdigest()


def _entry(steps=2, frames=1, seed=0):
    from videograin_core.sampling.ddim import Inversion
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(frames, 4, 8, 8, generator=g)
    return Inversion(latent=lat, trajectory=torch.randn(steps + 1, frames, 4, 8, 8, generator=g),
                     sigmas=torch.linspace(0, 14, steps + 1), steps=steps, source=lat.clone())


def test_cache_stays_within_its_bound_least_recently_used_first(tmp_path):
    """Entries beyond max_bytes go oldest-use first; a hit counts as a use; the entry just
    written is kept even if it alone is over; stale .partial files and foreign files."""
    import os
    import time

    from videograin_core.sampling.inversion_cache import InversionCache
    keys = [f"{i:064x}" for i in range(4)]
    probe = InversionCache(str(tmp_path / "probe"))
    size = os.path.getsize(probe.save(keys[0], _entry()))
    cache = InversionCache(str(tmp_path / "c"), max_bytes=int(size * 2.5))  # room for two entries
    for i, k in enumerate(keys[:2]):
        cache.save(k, _entry(seed=i))
        os.utime(cache.path(k), (time.time() - 100 + i, time.time() - 100 + i))  # key 0 older than key 1
    assert cache.load(keys[0])[1] == "hit"  # key 0 is now the recently used one
    cache.save(keys[2], _entry(seed=2))     # three entries: one must go, key 1 (least recently used)
    assert [os.path.exists(cache.path(k)) for k in keys[:3]] == [True, False, True]
    (tmp_path / "c" / "notes.txt").write_text("mine")                  # not the cache's: kept
    stale = tmp_path / "c" / f".{keys[3]}.dead.partial"
    stale.write_bytes(b"x" * 10)
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    fresh = tmp_path / "c" / f".{keys[3]}.live.partial"                 # a write in progress: kept
    fresh.write_bytes(b"x" * 10)
    tiny = InversionCache(str(tmp_path / "c"), max_bytes=1)
    tiny.save(keys[3], _entry(seed=3))
    assert sorted(os.listdir(tmp_path / "c")) == sorted([f"{keys[3]}.safetensors", "notes.txt", fresh.name])


def test_a_second_server_pruning_the_same_folder_is_no_harm(tmp_path, monkeypatch):
    """An entry another server removed first counts as removed (no extra deletions), and an
    entry that vanishes between the existence check and the read is a miss, not 'damaged'."""
    import os

    import videograin_core.sampling.inversion_cache as ic
    keys = [f"{i:064x}" for i in range(3)]
    cache = ic.InversionCache(str(tmp_path), max_bytes=1 << 40)
    for i, k in enumerate(keys):
        cache.save(k, _entry(seed=i))
        os.utime(cache.path(k), (1000.0 + i, 1000.0 + i))
    size = os.path.getsize(cache.path(keys[0]))
    real_remove = os.remove

    def raced(path):  # the other server deleted the oldest entry a moment ago
        real_remove(path)
        if path.endswith(keys[0] + ".safetensors"):
            raise FileNotFoundError(path)
    monkeypatch.setattr(ic.os, "remove", raced)
    cache.max_bytes = int(size * 2.5)  # one entry must go: the oldest, and only it
    assert cache.prune() == [f"{keys[0]}.safetensors"]
    assert os.path.exists(cache.path(keys[1])) and os.path.exists(cache.path(keys[2]))
    monkeypatch.setattr(ic.os, "remove", real_remove)
    real_remove(cache.path(keys[1]))
    monkeypatch.setattr(ic.os.path, "exists", lambda p: True)  # checked before the other server removed it
    assert cache.load(keys[1]) == (None, "miss")
