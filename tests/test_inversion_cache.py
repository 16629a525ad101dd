"""Fingerprints of the inversion cache key, without the host."""
from __future__ import annotations

import torch

from videograin_core.inversion_cache import tensor_digest


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
