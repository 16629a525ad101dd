"""Load and faults on a server of its own: ten edits queued back to back all complete
without the server's memory growing; an interrupt mid-inversion leaves no cache entry
and the next edit works; SIGKILL mid-run and a restart on the same folders leave the
inversion cache usable (the next edit of a cached source is a hit)."""
from __future__ import annotations

import os
import re
import signal
import time

import pytest
import torch
from test_bad_inputs import _mask, _png, base_prompt, run_case, saved_latent
from test_video_loader import make_video
from vg_testlib import file_identity, start_server, stop_server

pytestmark = pytest.mark.server


def _vm(pid: int, field: str) -> int:
    """A /proc/<pid>/status field in KiB (VmHWM: peak RSS, VmRSS: now)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _cache_dir(workdir) -> str:
    return os.path.join(str(workdir), "user", "__videograin_cache")


def _cache_files(workdir) -> set:
    d = _cache_dir(workdir)
    return set(os.listdir(d)) if os.path.isdir(d) else set()


def _prompt(ckpt, tag, skip=0, steps=2, **inv):
    p = base_prompt(ckpt, tag, steps=steps)
    p["load"]["inputs"].update(video="lf_src.mp4", skip_first_frames=skip)
    p["inv"]["inputs"].update(inv)
    return p


@pytest.fixture(scope="module")
def server(tmp_path_factory, test_models):
    workdir = tmp_path_factory.mktemp("loadsrv")
    client = start_server(str(workdir))
    make_video(os.path.join(client.input_dir, "lf_src.mp4"), n=16, w=64, h=64, fps=12)
    _png(os.path.join(client.input_dir, "bad_left.png"), _mask())
    state = {"client": client, "workdir": workdir, "ckpt": test_models.small_name}
    yield state
    stop_server(state["client"])


def test_ten_edits_back_to_back_complete_without_growing_memory(server):
    client, ckpt = server["client"], server["ckpt"]
    ids = []
    for i in range(10):  # each differs (global prompt, seed, prefix): the host cache skips none of them
        p = _prompt(ckpt, f"load{i}")
        p["cond"]["inputs"]["global_prompt"] = f"a red fox in the snow, take {i}"
        p["sample"]["inputs"]["seed"] = i
        ids.append(client.queue(p))
    pid = client.proc.pid
    peaks, rss = [], []
    for pid_ in ids:
        entry = client.wait(pid_, timeout=600)
        assert entry["status"]["status_str"] == "success", entry["status"]
        peaks.append(_vm(pid, "VmHWM"))
        rss.append(_vm(pid, "VmRSS"))
    outs = [saved_latent(client, client.get(f"/history/{i}")[i]) for i in ids]
    assert all(o.shape == (2, 4, 8, 8) for o in outs)
    assert not torch.allclose(outs[0], outs[1]), "the prompts differ, so do the edits"
    print("VmHWM KiB per run:", peaks, "VmRSS KiB:", rss)
    assert peaks[-1] <= 1.10 * peaks[0], f"peak RSS grew from {peaks[0]} KiB to {peaks[-1]} KiB: {peaks}"
    assert rss[-1] <= 1.10 * rss[0], f"RSS grew from {rss[0]} KiB to {rss[-1]} KiB: {rss}"
    assert client.get("/queue")["queue_pending"] == [] and client.alive()


def test_interrupt_mid_inversion_leaves_no_cache_entry(server):
    client, ckpt, workdir = server["client"], server["ckpt"], server["workdir"]
    before = _cache_files(workdir)
    # a source of its own, and an inversion long enough that the interrupt lands inside it
    # even on a loaded machine (it stops within a step of the interrupt, so it costs no time)
    p = _prompt(ckpt, "interrupted", skip=1, steps=400)
    state = {"sent": False, "values": []}

    def report(ev, d):
        if ev == "progress" and d.get("node") == "inv":
            state["values"].append(d.get("value"))
            if not state["sent"] and d.get("value", 0) >= 2:
                state["sent"] = True
                client.post("/interrupt", {})

    with pytest.raises(Exception) as e:
        client.run_with_progress(p, report, timeout=600)
    print("inversion progress seen before the interrupt:", state["values"])
    assert state["sent"] and max(state["values"]) < 400, state["values"]
    status = e.value.entry["status"]
    assert any(m[0] == "execution_interrupted" for m in status["messages"]), status
    assert _cache_files(workdir) == before, "no entry (and no partial file) for the interrupted inversion"
    # The next edit (the same prompt, shorter) succeeds and caches normally.
    p = _prompt(ckpt, "after_interrupt", skip=1, steps=3)
    r = run_case(client, p)
    assert r.status == "success" and "inv" in r.sampled, r.text[:3000]
    new = _cache_files(workdir) - before
    assert len(new) == 1 and all(re.fullmatch(r"[0-9a-f]{64}\.safetensors", n) for n in new), new


def test_sigkill_mid_run_then_restart_keeps_the_cache_usable(server):
    client, ckpt, workdir = server["client"], server["ckpt"], server["workdir"]
    cached = _prompt(ckpt, "kill_a", skip=2)
    first = run_case(client, cached)
    assert first.status == "success", first.text[:3000]
    entries = _cache_files(workdir)
    def identity(n):  # a rewrite makes a new inode; a hit only touches the entry's time
        return file_identity(os.path.join(_cache_dir(workdir), n))
    stored = {n: identity(n) for n in entries}
    # A long edit of another source, killed while it inverts.
    long_prompt = _prompt(ckpt, "kill_b", skip=3, steps=400)
    killed = {"done": False}

    def report(ev, d):
        if ev == "progress" and d.get("node") == "inv" and not killed["done"]:
            killed["done"] = True
            client.proc.send_signal(signal.SIGKILL)

    with pytest.raises(Exception):
        client.run_with_progress(long_prompt, report, timeout=600)
    client.proc.wait(timeout=30)
    assert killed["done"] and client.proc.returncode == -signal.SIGKILL
    # Restart on the same folders: the cache is intact and the cached source is a hit.
    restarted = start_server(str(workdir))
    server["client"] = restarted
    assert {n for n in _cache_files(workdir) if n.endswith(".safetensors") and not n.startswith(".")} == entries
    for n in entries:
        assert identity(n) == stored[n]
    t0 = time.time()
    again = run_case(restarted, _prompt(ckpt, "kill_a_again", skip=2))
    assert again.status == "success", again.text[:3000]
    assert "inv" not in again.sampled and "sample" in again.sampled, "the inversion came from the cache"
    assert torch.equal(saved_latent(restarted, again.entry), saved_latent(client, first.entry))
    for n in entries:  # read, not rewritten
        assert identity(n) == stored[n]
    assert time.time() - t0 < 600
