"""Does training learn? Oracle mIoU of generated images vs. training time, tiny config, this machine.

    python bench/learn.py [--minutes 20] [--n 2000]

Writes synthetic ADE20K-layout scenes (64x64), prepares shards, trains the tiny preset
(cluster/configs/tiny.yaml: 2 CPU workers, synced batch norm) on local Ray for the time
budget with a checkpoint every --every steps, then segments each checkpoint's generated
images (EMA generator, held-out label maps) with the oracle segmenter and prints steps vs
mIoU against the input label maps. Chance is what an untrained generator scores.
Target: mIoU >= 0.7 within 20 minutes. Saves a sample grid of the last checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import spade_core  # noqa: E402
from spade_core.metrics import mean_iou  # noqa: E402
from train_job.__main__ import build_trainer  # noqa: E402
from train_job.config import load_train_config  # noqa: E402
from train_job.metrics import save_sample_grid  # noqa: E402
from train_job.prepare import main as prepare_main  # noqa: E402
from train_job.synthetic import generate_scene, segment, write_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def evaluate(checkpoint: Path, labels: torch.Tensor) -> tuple[float, torch.Tensor]:
    model = spade_core.load_checkpoint(checkpoint)
    with torch.no_grad():
        fake = torch.cat([model.synthesize(labels[i : i + 16]) for i in range(0, len(labels), 16)])
    pred = segment(fake)
    return mean_iou(pred, labels.numpy()), fake


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--n", type=int, default=2000, help="synthetic training scenes")
    parser.add_argument("--every", type=int, default=100, help="steps between checkpoints (evaluated)")
    parser.add_argument("--eval-n", type=int, default=64, help="held-out label maps")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra tiny.yaml overrides")
    parser.add_argument("--out", default=str(REPO / "out/bench_learn"), help="where the sample grid goes")
    args = parser.parse_args()
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_dataset(root / "scenes", n=args.n, size=64, seed=0, split="training")
        prepare_main(["--dataset", "ade20k", "--root", str(root / "scenes"), "--split", "train",
                      "--out", str(root / "shards"), "--shard-rows", "100"])
        rng = np.random.default_rng(12345)  # held out: a seed the training scenes never use
        labels = torch.from_numpy(np.stack([generate_scene(rng, 64)[1] for _ in range(args.eval_n)])).long()
        cfg = load_train_config(REPO / "cluster/configs/tiny.yaml", [
            f"data.shards={root / 'shards'}", f"storage.path={root / 'runs'}", "storage.name=learn",
            "optim.niter=1000", "optim.niter_decay=0", f"checkpoint.every_steps={args.every}", "checkpoint.keep=1000",
            "logging.every_steps=50", "logging.sample_grid_every_steps=0", "logging.metrics_port=null", *args.overrides,
        ])
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=True, logging_level="WARNING")
        t0 = time.perf_counter()
        result = build_trainer(cfg, extra_loop_config={"time_budget_s": args.minutes * 60}).fit()
        train_s = time.perf_counter() - t0
        ray.shutdown()
        if result.error is not None:
            sys.exit(f"training failed: {result.error}")
        checkpoints = sorted((p for p in (root / "runs/learn").glob("checkpoint_*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
        untrained = spade_core.build_model(cfg.model, discriminator=False, seed=cfg.data.seed).eval()
        chance = mean_iou(segment(untrained.synthesize(labels)), labels.numpy())
        print(f"\ntrained {train_s / 60:.1f} min (incl. start-up); {len(checkpoints)} checkpoints; "
              f"{args.eval_n} held-out 64x64 label maps; oracle mIoU of generated images:")
        print(f"  step      0  mIoU {chance:.3f}  (untrained: chance)")
        best, fake = chance, None
        for ckpt in checkpoints:
            step = int(torch.load(ckpt / "training/state.pt", weights_only=True)["state"]["step"])
            miou, fake = evaluate(ckpt, labels)
            best = max(best, miou)
            print(f"  step {step:6d}  mIoU {miou:.3f}")
        if fake is not None:
            grid = save_sample_grid(Path(args.out) / "learn_grid.png", labels[:8], fake[:8], fake[:8] * 0,
                                    spade_core.semantics.ade20k_classes(), max_rows=8)
            print(f"sample grid (label | generated | blank): {grid}")
        print(f"\nbest mIoU {best:.3f} ({'meets' if best >= 0.7 else 'BELOW'} the 0.7 target in {args.minutes:.0f} min)")


if __name__ == "__main__":
    main()
