"""One rank of the 2-process gloo fine-tuning test (launched by tests/test_train_distributed.py).

The environment carries torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so
``fine_tune`` initializes torch.distributed itself, exactly as under ``torchrun``.

Usage: python train_dist_worker.py POSTS_CSV IMAGE_ROOT OUT_DIR CONFIG_JSON
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ccclip_testkit import TINY_CFG


def main() -> int:
    posts_csv, image_root, out_dir, config_json = sys.argv[1:5]
    from ccclip_widgets.models import load_model, register_model_config
    from ccclip_widgets.posts import read_posts
    from ccclip_widgets.train import FineTuneConfig, fine_tune

    torch.set_num_threads(1)
    arch = register_model_config("ccclip-test-tiny", TINY_CFG)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        clip = load_model(f"{arch}:random", device="cpu", allow_random=True)
    posts = read_posts(posts_csv, image_root=image_root)
    config = FineTuneConfig.from_dict(json.loads(Path(config_json).read_text()))
    result = fine_tune(clip, posts, config, out_dir=out_dir)
    if int(os.environ["RANK"]) == 0:
        report = {
            "world_size": torch.distributed.get_world_size(),
            "losses": [h["loss"] for h in result.history],
            "steps": result.steps,
        }
        (Path(out_dir) / "dist_report.json").write_text(json.dumps(report))
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
