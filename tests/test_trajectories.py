"""Trajectories from flow (videograin_core.trajectories.chains): hand-written chains on a
3x5 grid with exits, collisions and a tie; the flow -> grid rule by hand; F = 1; and a
random case against a plain loop reference."""
import pytest
import torch

from videograin_core.trajectories.chains import (Trajectories, build_trajectories, build_trajectories_for_grids,
                                                 flow_at_grid, links)

H, W = 3, 5   # the hand case's grid


def hand_flows() -> torch.Tensor:
    """Cell flows [2, 3, 5, 2] (dx, dy) of the hand case, one pixel per cell."""
    f = torch.zeros(2, H, W, 2)
    f[0, ..., 0] = 1                       # 0 -> 1: everything one cell right (column 4 leaves)
    f[1, 0, 0] = torch.tensor([1., 0.])    # 1 -> 2: onto (0,1), which stays: (0,1) keeps the link
    f[1, 2, 0] = torch.tensor([1., 0.])    # onto (2,1) ...
    f[1, 2, 2] = torch.tensor([-1., 0.])   # ... as does (2,2), same |flow|: raster order, (2,0) wins
    f[1, 2, 1] = torch.tensor([2., 0.])    # onto (2,3), which stays: (2,3) wins (smaller |flow|)
    f[1, 1, 4] = torch.tensor([0., 1.])    # (1,4) and (2,4) swap places
    f[1, 2, 4] = torch.tensor([0., -1.])
    f[1, 0, 4] = torch.tensor([0., -1.])   # leaves the grid upwards
    return f


# Every chain of the hand case as (frame, y, x), in the documented trajectory order:
# start frame, then raster order of the first cell.
HAND_CHAINS = [
    [(0, 0, 0), (1, 0, 1), (2, 0, 1)], [(0, 0, 1), (1, 0, 2), (2, 0, 2)], [(0, 0, 2), (1, 0, 3), (2, 0, 3)],
    [(0, 0, 3), (1, 0, 4)], [(0, 0, 4)],
    [(0, 1, 0), (1, 1, 1), (2, 1, 1)], [(0, 1, 1), (1, 1, 2), (2, 1, 2)], [(0, 1, 2), (1, 1, 3), (2, 1, 3)],
    [(0, 1, 3), (1, 1, 4), (2, 2, 4)], [(0, 1, 4)],
    [(0, 2, 0), (1, 2, 1)], [(0, 2, 1), (1, 2, 2)], [(0, 2, 2), (1, 2, 3), (2, 2, 3)],
    [(0, 2, 3), (1, 2, 4), (2, 1, 4)], [(0, 2, 4)],
    [(1, 0, 0)], [(1, 1, 0), (2, 1, 0)], [(1, 2, 0), (2, 2, 1)],
    [(2, 0, 0)], [(2, 0, 4)], [(2, 2, 0)], [(2, 2, 2)],
]


def token(t, y, x, h=H, w=W):
    return t * h * w + y * w + x


def chains_of(traj: Trajectories) -> list[list[int]]:
    return [traj.tokens[a:b].tolist() for a, b in zip(traj.offsets[:-1].tolist(), traj.offsets[1:].tolist())]


def check_partition(traj: Trajectories) -> None:
    """Every token in exactly one trajectory; the three views agree; chains are runs of
    consecutive frames with one cell per frame."""
    n = traj.frames * traj.grid[0] * traj.grid[1]
    hw = traj.grid[0] * traj.grid[1]
    assert traj.token_count == n
    assert sorted(traj.tokens.tolist()) == list(range(n))
    for j, chain in enumerate(chains_of(traj)):
        assert 1 <= len(chain) <= traj.frames
        frames = [c // hw for c in chain]
        assert frames == list(range(frames[0], frames[0] + len(chain)))
        assert frames[0] == traj.starts[j]
        assert all(traj.token_trajectory[c] == j for c in chain)


def test_hand_case_chains_exits_collisions_and_tie():
    traj = build_trajectories(hand_flows(), (H, W), (H, W))
    assert traj.frames == 3 and traj.grid == (3, 5) and traj.count == len(HAND_CHAINS)
    assert chains_of(traj) == [[token(*c) for c in chain] for chain in HAND_CHAINS]
    check_partition(traj)
    # the padded table, row by row
    table = traj.cells()
    assert table.shape == (len(HAND_CHAINS), 3)
    for row, chain in zip(table.tolist(), HAND_CHAINS):
        want = [-1, -1, -1]
        for t, y, x in chain:
            want[t] = token(t, y, x)
        assert row == want


def test_flow_is_averaged_over_cells_and_scaled_per_axis():
    # the hand case on 6 x 20 pixel frames: cells of 2 rows x 4 columns, flow in pixels
    cell = hand_flows()
    pixels = cell.repeat_interleave(2, 1).repeat_interleave(4, 2) * torch.tensor([4.0, 2.0])
    traj = build_trajectories(pixels, (H, W), (6, 20))
    assert chains_of(traj) == [[token(*c) for c in chain] for chain in HAND_CHAINS]
    # area average by hand: a 5 x 2 frame to a 2 x 1 grid (cell rows cover pixel rows
    # 0-2 and 2-4), then x scaled by 1/2 and y by 2/5
    flow = torch.zeros(5, 2, 2)
    flow[..., 0] = torch.tensor([[0., 1.], [2., 3.], [4., 5.], [6., 7.], [8., 9.]])
    flow[..., 1] = 10.0
    got = flow_at_grid(flow, (2, 1))
    assert got.shape == (2, 1, 2)
    assert torch.allclose(got[:, 0, 0], torch.tensor([(0 + 1 + 2 + 3 + 4 + 5) / 6 / 2, (4 + 5 + 6 + 7 + 8 + 9) / 6 / 2],
                                                     dtype=torch.float64))
    assert torch.allclose(got[:, 0, 1], torch.tensor([4.0, 4.0], dtype=torch.float64))


def test_rounding_is_to_nearest_with_halves_to_even():
    cell_flow = torch.zeros(1, 6, 2, dtype=torch.float64)
    cell_flow[0, :, 0] = torch.tensor([0.5, 0.6, 1.5, -0.5, -0.6, 0.49])
    # cell x moves by round(dx): 0, 1, 2, 0, -1, 0 -> targets 0, 2, 4, 3, 3, 5
    # cell 3 (|0.5|) beats cell 4 (|0.6|) at target 3
    assert links(cell_flow).tolist() == [0, 2, 4, 3, -1, 5]


@pytest.mark.parametrize("flows", [None, torch.zeros(0, 6, 10, 2)])
def test_one_frame_every_cell_its_own_trajectory(flows):
    traj = build_trajectories(flows, (H, W), (6, 10))
    assert traj.frames == 1 and traj.count == 15
    assert chains_of(traj) == [[i] for i in range(15)]
    assert traj.cells().tolist() == [[i] for i in range(15)]
    assert traj.starts.tolist() == [0] * 15
    assert [(length, idx.tolist()) for length, idx in traj.groups()] == [(1, [[i] for i in range(15)])]


def test_worst_case_every_chain_one_cell():
    flows = torch.full((3, H, W, 2), 7.0)     # more than the grid each frame: all links leave
    traj = build_trajectories(flows, (H, W), (H, W))
    assert traj.count == 4 * 15 and (traj.lengths == 1).all()
    assert traj.cells().shape == (60, 4)      # the padded table's worst case: F x tokens
    check_partition(traj)


def reference_chains(cell_flows: torch.Tensor, h: int, w: int) -> list[list[int]]:
    """Plain loops: links per frame pair (collision: smallest |flow|, then raster order),
    then chains followed from every cell no link reaches, in (frame, raster) order."""
    frames = cell_flows.shape[0] + 1
    nxt = {}
    for t in range(frames - 1):
        best = {}
        for y in range(h):
            for x in range(w):
                dx, dy = float(cell_flows[t, y, x, 0]), float(cell_flows[t, y, x, 1])
                ty, tx = y + round(dy), x + round(dx)      # Python round: halves to even
                if 0 <= ty < h and 0 <= tx < w:
                    key = (dx * dx + dy * dy, y * w + x)
                    if (ty, tx) not in best or key < best[(ty, tx)][0]:
                        best[(ty, tx)] = (key, (y, x))
        for (ty, tx), (_, (y, x)) in best.items():
            nxt[(t, y, x)] = (t + 1, ty, tx)
    reached = set(nxt.values())
    chains = []
    for t in range(frames):
        for y in range(h):
            for x in range(w):
                if (t, y, x) in reached:
                    continue
                cell, chain = (t, y, x), []
                while cell is not None:
                    chain.append(cell[0] * h * w + cell[1] * w + cell[2])
                    cell = nxt.get(cell)
                chains.append(chain)
    return chains


@pytest.mark.parametrize("frames,h,w,seed", [(5, 4, 6, 0), (6, 7, 3, 1), (2, 1, 9, 2), (16, 3, 5, 3)])
def test_random_flows_match_the_loop_reference(frames, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    # integer motions of -2..2 cells, half the components jittered by up to 0.3: many
    # collisions and exits, and exact |flow| ties where neither cell is jittered
    cell = torch.randint(-2, 3, (frames - 1, h, w, 2), generator=g).double()
    jitter = (torch.rand(cell.shape, generator=g, dtype=torch.float64) - 0.5) * 0.6
    cell += jitter * (torch.rand(cell.shape, generator=g) < 0.5)
    traj = build_trajectories(cell, (h, w), (h, w))
    assert chains_of(traj) == reference_chains(cell, h, w)
    check_partition(traj)
    # groups: every token once, rows are the chains of that length
    seen = []
    for length, idx in traj.groups():
        assert idx.shape[1] == length
        seen += idx.reshape(-1).tolist()
        assert sorted(map(tuple, idx.tolist())) == sorted(tuple(c) for c in chains_of(traj) if len(c) == length)
    assert sorted(seen) == list(range(frames * h * w))


def test_deterministic_digest_and_equality():
    g = torch.Generator().manual_seed(5)
    flows = torch.randn(4, 12, 20, 2, generator=g) * 6
    a = build_trajectories(flows, (3, 5), (12, 20))
    b = build_trajectories(flows.clone(), (3, 5), (12, 20))
    assert a == b and hash(a) == hash(b) and a.digest() == b.digest()
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.offsets, b.offsets)
    other = flows.clone()
    other[0] += 8.0                                   # two cells right in frame 0: other links
    c = build_trajectories(other, (3, 5), (12, 20))
    assert c != a and c.digest() != a.digest()
    d = build_trajectories(flows[:2], (3, 5), (12, 20))
    assert d != a and d.digest() != a.digest()        # fewer frames
    grids = build_trajectories_for_grids(flows, [(3, 5), (6, 10), (3, 5)], (12, 20))
    assert list(grids) == [(3, 5), (6, 10)] and grids[(3, 5)] == a
    assert grids[(6, 10)] == build_trajectories(flows, (6, 10), (12, 20))


def test_bad_flows_are_refused():
    with pytest.raises(ValueError, match="frame size"):
        build_trajectories(torch.zeros(2, 6, 10, 2), (3, 5), (6, 11))
    with pytest.raises(ValueError, match=r"\[F-1, 6, 10, 2\]"):
        build_trajectories(torch.zeros(2, 6, 10, 3), (3, 5), (6, 10))
    bad = torch.zeros(2, 6, 10, 2)
    bad[1, 2, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        build_trajectories(bad, (3, 5), (6, 10))
