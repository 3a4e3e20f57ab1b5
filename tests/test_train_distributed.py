"""torch.distributed: 2 gloo processes on the CPU train exactly like 1 process on the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import polars as pl
import pytest
import torch
from ccclip_testkit import make_shape_posts

from ccclip_widgets.models import load_model
from ccclip_widgets.posts import read_posts
from ccclip_widgets.train import FineTuneConfig, fine_tune

WORKER = Path(__file__).with_name("train_dist_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tiny_arch, tmp_path):
    posts_csv = tmp_path / "posts.csv"
    pl.DataFrame(make_shape_posts(tmp_path / "imgs")).write_csv(posts_csv)
    # augmentation and duplicate masking on: both must be rank-independent
    cfg = FineTuneConfig(
        max_steps=3, batch_size=8, lr=1e-3, warmup_steps=1, show_progress=False, checkpoint_every_steps=0
    )
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": "2",
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "OMP_NUM_THREADS": "1",
            "CUDA_VISIBLE_DEVICES": "",
        }
        args = [sys.executable, str(WORKER), str(posts_csv), str(tmp_path / "imgs"), str(tmp_path / "ddp")]
        procs.append(
            subprocess.Popen(
                [*args, str(tmp_path / "cfg.json")], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        )
    outputs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outputs.append(out.decode(errors="replace"))
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)

    # one process, same global batch
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        clip = load_model(f"{tiny_arch}:random", device="cpu", allow_random=True)
    init = {k: v.clone() for k, v in clip.model.state_dict().items()}
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = fine_tune(clip, read_posts(posts_csv, image_root=tmp_path / "imgs"), cfg)
    finally:
        torch.set_num_threads(n)

    report = json.loads((tmp_path / "ddp" / "dist_report.json").read_text())
    assert report["world_size"] == 2 and report["steps"] == 3
    torch.testing.assert_close(
        torch.tensor(report["losses"]),
        torch.tensor([h["loss"] for h in single.history]),
        rtol=1e-5,
        atol=1e-6,
    )
    from safetensors.torch import load_file

    ddp_weights = load_file(str(tmp_path / "ddp" / "final" / "open_clip_model.safetensors"))
    ours = clip.model.state_dict()
    assert set(ddp_weights) == set(ours)
    for key, value in ours.items():
        torch.testing.assert_close(ddp_weights[key], value, rtol=1e-4, atol=1e-5, msg=f"{key} differs")
    # and the weights did move (the comparison would be void otherwise)
    moved = max(float((ours[k] - init[k]).abs().max()) for k in ours)
    assert moved > 1e-3
