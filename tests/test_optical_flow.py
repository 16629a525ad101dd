"""Optical flow of a clip (videograin_core.trajectories.flow): DIS on a real frame moved by
a known sub-pixel shift, the pair-at-a-time loop and its callback, and RAFT loading from a
user's state dict (a random-initialised model: loading, shapes and padding, not quality)."""
import datetime
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from videograin_core.trajectories import flow as flowmod
from videograin_core.trajectories.flow import clip_flows, load_raft, raft_flow, raft_padding

cv2 = pytest.importorskip("cv2")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, "example_data", "vtest_two_people.mp4")
SHIFT = (2.3, -1.6)   # pixels, (dx, dy)


def first_frame() -> np.ndarray:
    import av
    with av.open(SAMPLE) as c:
        return next(c.decode(video=0)).to_ndarray(format="rgb24")


def shifted_pair(dx: float, dy: float) -> torch.Tensor:
    """[2, H, W, 3] in 0..1: the sample clip's frame 0, and the same frame moved by (dx, dy)
    with bilinear interpolation (content at p goes to p + (dx, dy))."""
    f0 = first_frame()
    m = np.float32([[1, 0, dx], [0, 1, dy]])
    f1 = cv2.warpAffine(f0, m, (f0.shape[1], f0.shape[0]), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    return torch.from_numpy(np.stack([f0, f1])).float() / 255


def interior_median(flow: torch.Tensor, margin: int = 16) -> torch.Tensor:
    return flow[margin:-margin, margin:-margin].reshape(-1, 2).median(0).values


def test_dis_recovers_a_known_subpixel_shift_of_a_real_frame():
    frames = shifted_pair(*SHIFT)
    out = clip_flows(frames, backward=True)
    assert out.forward.shape == (1, 256, 256, 2) and out.forward.dtype == torch.float32
    fw, bw = interior_median(out.forward[0]), interior_median(out.backward[0])
    assert torch.allclose(fw, torch.tensor(SHIFT), atol=0.5), fw
    assert torch.allclose(bw, -torch.tensor(SHIFT), atol=0.5), bw
    # more than the median: most interior pixels are within half a pixel
    err = (out.forward[0, 16:-16, 16:-16] - torch.tensor(SHIFT)).norm(dim=-1)
    assert (err < 0.5).float().mean() > 0.8


def test_dis_flows_are_deterministic_and_pairwise():
    f0 = torch.from_numpy(first_frame()).float() / 255
    frames = torch.stack([f0, f0.roll(2, 1), f0.roll(3, 1), f0.roll((3, -1), (1, 0))])
    a = clip_flows(frames, backward=True)
    b = clip_flows(frames, backward=True)
    assert a.forward.shape == (3, 256, 256, 2)
    assert torch.equal(a.forward, b.forward) and torch.equal(a.backward, b.backward)
    # each pair is its own estimate: the same pair alone gives the same flow
    alone = clip_flows(frames[1:3])
    assert torch.equal(alone.forward[0], a.forward[1])
    # integer shifts of 1, 1 and (0, -1) px between the pairs, read in the interior
    for t, want in enumerate([(2.0, 0.0), (1.0, 0.0), (0.0, -1.0)]):
        assert torch.allclose(interior_median(a.forward[t]), torch.tensor(want), atol=0.3)


def test_on_pair_reports_progress_and_can_stop_the_loop():
    frames = torch.rand(4, 8, 9, 3)
    calls, seen = [], []

    def estimator(a, b):
        calls.append(1)
        return torch.zeros(8, 9, 2)

    out = clip_flows(frames, estimator, on_pair=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 3), (2, 3), (3, 3)] and len(calls) == 3 and out.backward is None

    class Stop(Exception):
        pass

    def stop_after_first(i, n):
        raise Stop

    calls.clear()
    with pytest.raises(Stop):
        clip_flows(frames, estimator, backward=True, on_pair=stop_after_first)
    assert len(calls) == 2        # the first pair, both directions; nothing after


def test_core_imports_without_opencv_torchvision_or_the_host():
    """The modules import their optional dependencies lazily: a fresh interpreter that
    imports all of them has loaded none of cv2, torchvision or ComfyUI."""
    code = ("import sys; import videograin_core.trajectories.flow, videograin_core.trajectories.chains, "
            "videograin_core.trajectories.attention, videograin_core.metrics.warp_error; "
            "print(sorted(m for m in ('cv2', 'torchvision', 'comfy', 'folder_paths') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_one_frame_has_no_flows_and_bad_inputs_are_refused():
    out = clip_flows(torch.rand(1, 6, 7, 3), backward=True)
    assert out.forward.shape == (0, 6, 7, 2) and out.backward.shape == (0, 6, 7, 2)
    with pytest.raises(ValueError, match=r"\[F, H, W, 3\]"):
        clip_flows(torch.rand(3, 6, 7))
    with pytest.raises(ValueError, match="no frames"):
        clip_flows(torch.rand(0, 6, 7, 3))
    with pytest.raises(ValueError, match=r"expected \(6, 7, 2\)"):
        clip_flows(torch.rand(2, 6, 7, 3), lambda a, b: torch.zeros(7, 6, 2))
    with pytest.raises(ValueError, match="preset"):
        flowmod.dis_flow("slow")


# ---------------------------------------------------------------- RAFT
torchvision = pytest.importorskip("torchvision")


@pytest.fixture(scope="module")
def raft_file(tmp_path_factory):
    """A random-initialised raft_large's state dict, written as safetensors."""
    from safetensors.torch import save_file
    from torchvision.models.optical_flow import raft_large
    torch.manual_seed(0)
    model = raft_large(weights=None, progress=False).train(False)
    folder = tmp_path_factory.mktemp("raft")
    path = folder / "raft_random.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path, model


def test_raft_padding_rule():
    assert raft_padding(100, 130) == (28, 6)      # to at least 128, multiples of 8
    assert raft_padding(256, 250) == (0, 6)
    assert raft_padding(128, 128) == (0, 0)


def test_raft_loads_from_a_file_or_its_folder_and_runs_padded(raft_file):
    path, reference = raft_file
    for where in (str(path), str(path.parent)):
        model = load_raft(where)
        for k, v in reference.state_dict().items():
            assert torch.equal(model.state_dict()[k], v), k
    frames = torch.rand(2, 100, 130, 3, generator=torch.Generator().manual_seed(1))
    est = raft_flow(model, iterations=2)
    out = clip_flows(frames, est, backward=True)
    assert out.forward.shape == (1, 100, 130, 2) and out.backward.shape == (1, 100, 130, 2)
    assert torch.isfinite(out.forward).all() and torch.isfinite(out.backward).all()
    # the same computation written out: [-1, 1] input, replicate-padded to 128 x 136, cropped
    pair = frames.flip(0).permute(0, 3, 1, 2) * 2 - 1          # the backward pair: 1 -> 0
    pair = F.pad(pair, (0, 6, 0, 28), mode="replicate")
    with torch.no_grad():
        want = reference(pair[:1], pair[1:], num_flow_updates=2)[-1][0, :, :100, :130].permute(1, 2, 0)
    assert torch.allclose(out.backward[0], want, atol=1e-4)


def test_raft_weights_errors_name_the_file(tmp_path, raft_file):
    missing = tmp_path / "nothere.safetensors"
    with pytest.raises(ValueError, match="nothere.safetensors"):
        load_raft(str(missing))
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty_folder.*no weights"):
        load_raft(str(empty))
    from safetensors.torch import save_file
    wrong = tmp_path / "other.safetensors"
    save_file({"conv.weight": torch.zeros(3, 3)}, str(wrong))
    with pytest.raises(ValueError, match="other.safetensors is not a torchvision raft_large"):
        load_raft(str(wrong))
    # a state dict of the right names but other shapes
    path, reference = raft_file
    sd = dict(reference.state_dict())
    name = next(k for k, v in sd.items() if v.dim() == 4)
    sd[name] = torch.zeros(1, 1, 1, 1)
    reshaped = tmp_path / "reshaped.pt"
    torch.save(sd, str(reshaped))
    with pytest.raises(ValueError, match="reshaped.pt does not fit raft_large"):
        load_raft(str(reshaped))
    # a pickle of something else: refused by weights_only loading, never unpickled
    pickled = tmp_path / "object.pth"
    torch.save({"when": datetime.date(2020, 1, 1)}, str(pickled))   # not a type weights_only allows
    with pytest.raises(ValueError, match="object.pth is not a readable state dict"):
        load_raft(str(pickled))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="garbage.safetensors is not a readable state dict"):
        load_raft(str(garbage))
    two = tmp_path / "two"
    two.mkdir()
    (two / "a.pt").write_bytes(b"x")
    (two / "b.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match="two holds 2"):
        load_raft(str(two))


def test_raft_torch_save_state_dict_with_module_prefix_loads(tmp_path, raft_file):
    _, reference = raft_file
    path = tmp_path / "raft_dp.pth"
    torch.save({"module." + k: v for k, v in reference.state_dict().items()}, str(path))
    model = load_raft(str(path))
    k = next(iter(reference.state_dict()))
    assert torch.equal(model.state_dict()[k], reference.state_dict()[k])
