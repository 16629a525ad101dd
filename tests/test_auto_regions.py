"""Mask-free regions (videograin_core.capture.clusters): k-means over the features of all
frames recovers planted clusters exactly, with a numbering that depends on the partition
only; masks at frame resolution partition every frame; names come from the maps."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from videograin_core.capture.clusters import canonical, cluster_masks, kmeans, name_clusters, preview

F_, H_, W_, DIM = 4, 12, 16, 24


def planted(k=4, noise=0.15, seed=0):
    """Labels [F, h, w] of k regions that move between frames, and features = a unit
    centre per region plus noise."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((F_, H_, W_), np.int64)
    for f in range(F_):
        truth[f, :, 4 + f:10 + f] = 1                  # a band moving right
        truth[f, 8:, :] = 2                            # the ground
        truth[f, :3, 12 - f:] = 3 if k > 3 else 0      # a corner that shrinks
    centres = rng.normal(size=(k, DIM))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[truth] + noise * rng.normal(size=(F_, H_, W_, DIM)) / np.sqrt(DIM)
    return truth, x.astype(np.float32)


def same_partition(a, b):
    """Equal up to renaming the labels."""
    pairs = set(zip(a.reshape(-1).tolist(), b.reshape(-1).tolist()))
    return len(pairs) == len(np.unique(a)) == len(np.unique(b))


def test_planted_clusters_are_recovered_exactly_with_canonical_numbers():
    truth, x = planted()
    labels = kmeans(x.reshape(-1, DIM), 4, seed=0).reshape(truth.shape)
    assert same_partition(labels, truth)
    assert np.array_equal(labels, canonical(truth))      # the numbering: order of first pixel
    assert labels.reshape(-1)[0] == 0
    # another seed draws other initial centres, same clusters, same numbers
    assert np.array_equal(kmeans(x.reshape(-1, DIM), 4, seed=5).reshape(truth.shape), labels)
    # deterministic
    assert np.array_equal(kmeans(x.reshape(-1, DIM), 4, seed=0).reshape(truth.shape), labels)


def test_clusters_span_frames():
    """All frames are clustered jointly: a region is one label in every frame."""
    truth, x = planted(k=3, seed=1)
    labels = kmeans(torch.from_numpy(x).reshape(-1, DIM), 3).reshape(truth.shape)
    for f in range(F_):
        assert same_partition(labels[f], truth[f])
    assert same_partition(labels, truth)


def test_canonical_numbering():
    a = np.array([[2, 2, 0], [1, 0, 2]])
    assert canonical(a).tolist() == [[0, 0, 1], [2, 1, 0]]


def test_bad_k():
    _, x = planted()
    with pytest.raises(ValueError, match="regions: 5 clusters asked for but the features have 2 distinct points"):
        kmeans(np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]), 5)
    with pytest.raises(ValueError, match="NaN"):
        kmeans(np.full((4, 2), np.nan), 2)


def test_masks_partition_each_frame_at_frame_resolution():
    truth, _ = planted()
    masks = cluster_masks(canonical(truth), 4, (H_ * 8, W_ * 8))
    assert masks.shape == (4, F_, H_ * 8, W_ * 8) and masks.dtype == torch.bool
    assert torch.equal(masks.sum(0), torch.ones(F_, H_ * 8, W_ * 8, dtype=torch.long))
    # away from borders a pixel keeps its token's cluster
    lab = torch.from_numpy(canonical(truth))
    assert bool(masks[lab[0, 10, 0], 0, 10 * 8 + 4, 4])
    assert bool(masks[lab[2, 1, 7], 2, 1 * 8 + 4, 7 * 8 + 4])


def test_clusters_are_named_by_the_word_they_attend_to():
    truth, _ = planted()
    lab = canonical(truth)
    ground = torch.from_numpy(truth == 2).float() * 0.05 + 0.01    # probabilities: small numbers
    band = torch.from_numpy(truth == 1).float() * 0.2
    names = name_clusters(lab, {"street": ground, "person": band}, threshold=0.5)
    by_truth = {int(truth.reshape(-1)[np.argmax(lab.reshape(-1) == c)]): names[c] for c in range(4)}
    assert by_truth[2][0] == "street" and by_truth[2][1] > 0.9
    assert by_truth[1][0] == "person"
    assert by_truth[0][0] == "" and by_truth[3][0] == ""            # below the threshold: unnamed
    # maps at another grid are resampled to the labels' grid
    coarse = torch.nn.functional.avg_pool2d(band[:, None], 2)[:, 0]
    assert name_clusters(lab, {"person": coarse}, 0.3)[int(lab[0, 0, 6])][0] == "person"


def test_preview_tints_each_region():
    truth, _ = planted()
    masks = cluster_masks(canonical(truth), 4, (H_, W_))
    frames = torch.zeros(F_, H_, W_, 3)
    view = preview(frames, masks, opacity=1.0)
    assert view.shape == (F_, H_, W_, 3)
    colours = {tuple(view[f, y, x].tolist()) for f in range(F_) for y in range(H_) for x in range(W_)}
    assert len(colours) == 4
