"""Does training learn? KID and oracle mIoU of generated images vs. training time, tiny config.

    python bench/learn.py [--minutes 20] [--n 2000] [--every 100] [--eval-n 64] [--inception PATH]

Writes synthetic ADE20K-layout scenes (64x64, a training and a held-out validation split),
prepares shards, and trains the tiny preset (cluster/configs/tiny.yaml: 2 CPU workers,
synced batch norm) on local Ray for the time budget with the training's own evaluation
(``eval:``) every --every steps: rank 0 scores the EMA generator on the first --eval-n
validation pairs, KID (Inception pool features) and mIoU by the scenes' oracle segmenter,
exactly as ``spade-eval run`` would, and keeps the best checkpoint by mIoU
(``checkpoint.best_by``). The curve is read back from the run's metrics.jsonl. Step 0 is
the same evaluator on the untrained generator (chance); the real images' mIoU is the ceiling.

Without --inception the Inception weights are random in pytorch-fid's layout: KID then still
falls as the images approach the real ones, but its values compare only within this run.
Target: mIoU >= 0.7 within 20 minutes. Saves the best checkpoint's sample grid and the curve (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

import torch  # noqa: E402

import spade_core  # noqa: E402
from spade_core.runs import read_best  # noqa: E402
from spade_core.testing import random_inception_state  # noqa: E402
from train_job.__main__ import build_trainer  # noqa: E402
from train_job.callbacks import TimeBudget  # noqa: E402
from train_job.config import load_train_config  # noqa: E402
from train_job.metrics import save_grid  # noqa: E402
from train_job.prepare import main as prepare_main  # noqa: E402
from train_job.synthetic import write_dataset  # noqa: E402
from train_job.validation import TrainingEvaluator  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TARGET_MIOU = 0.7


def row(step: object, values: dict[str, float | None], note: str = "") -> str:
    kid = values.get("kid")
    kid_text = f"{kid:10.4g} ± {values.get('kid_std', 0.0):8.2g}" if kid is not None else f"{'-':>21s}"
    return f"  {step!s:>7s}  {kid_text}   {values['miou']:.3f}   {note}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--n", type=int, default=2000, help="synthetic training scenes")
    parser.add_argument("--every", type=int, default=100, help="steps between evaluations")
    parser.add_argument("--eval-n", type=int, default=64, help="held-out validation pairs scored per evaluation")
    parser.add_argument("--inception", help="pytorch-fid's weight file (default: random weights in its layout)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra tiny.yaml overrides")
    parser.add_argument("--out", default=str(REPO / "out/bench_learn"), help="where the sample grid and curve go")
    args = parser.parse_args()
    import ray

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_dataset(root / "scenes", n=args.n, size=64, seed=0, split="both", val_n=args.eval_n, workers=os.cpu_count() or 1)
        for split in ("train", "val"):
            prepare_main(["--dataset", "ade20k", "--root", str(root / "scenes"), "--split", split,
                          "--out", str(root / "shards"), "--shard-rows", "100", "--no-progress"])
        inception, official = args.inception, args.inception is not None
        if inception is None:
            inception = str(root / "inception-random.pth")
            torch.save(random_inception_state(0), inception)
        cfg = load_train_config(REPO / "cluster/configs/tiny.yaml", [
            f"data.shards={root / 'shards'}", f"storage.path={root / 'runs'}", "storage.name=learn",
            "optim.niter=1000", "optim.niter_decay=0", f"checkpoint.every_steps={args.every}", "checkpoint.best_by=miou",
            "logging.every_steps=50", "logging.sample_grid_every_steps=0", "logging.metrics_port=null",
            f"eval.every_steps={args.every}", f"eval.num_images={args.eval_n}", "eval.metrics=[kid, miou]",
            f"eval.inception={inception}", f"eval.allow_any_inception={str(not official).lower()}", "eval.oracle=true",
            *args.overrides,
        ])
        evaluator = TrainingEvaluator(cfg, device=torch.device("cpu"))  # the loop's own evaluator, here for step 0
        untrained = spade_core.build_model(cfg.model, discriminator=False, seed=cfg.data.seed)
        chance = evaluator(untrained.generator).values
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        t0 = time.perf_counter()
        result = build_trainer(cfg, callbacks=[TimeBudget(args.minutes * 60)]).fit()
        train_s = time.perf_counter() - t0
        ray.shutdown()
        if result.error is not None:
            sys.exit(f"training failed: {result.error}")
        run_dir = Path(result.path)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        evals = [r for r in records if "eval" in r]
        eval_s = sum(r["eval_s"] for r in evals)
        print(f"\ntrained {train_s / 60:.1f} min (incl. start-up), {evals[-1]['step'] if evals else 0} steps; "
              f"{len(evals)} evaluations on {args.eval_n} held-out 64x64 pairs took {eval_s:.0f}s ({eval_s / train_s:.0%} of the run)")
        print(f"KID ({'pytorch-fid Inception' if official else 'random Inception weights: compare within this run only'}) "
              "and oracle mIoU of the EMA generator's images:")
        print(f"  {'step':>7s}  {'KID':>21s}   mIoU")
        print(row(0, chance, "untrained: chance"))
        for r in evals:
            print(row(r["step"], r["eval"], "(best)" if r.get("best") else ""))
        ceiling = evaluator.real_scores["miou"]
        print(f"  {'real':>7s}  {'0 (by definition)':>21s}   {ceiling:.3f}   the real images: the oracle's ceiling")
        best = read_best(run_dir)
        best_miou = best["value"] if best else chance["miou"]
        curve = {"chance": chance, "ceiling_miou": ceiling, "official_inception": official, "train_s": train_s,
                 "evaluations": [{"step": r["step"], **r["eval"], "eval_s": r["eval_s"]} for r in evals], "best": best}
        (out / "learn_curve.json").write_text(json.dumps(curve, indent=2) + "\n")
        model = spade_core.load_checkpoint(best["checkpoint"]) if best else untrained
        outcome = evaluator(model.generator)  # the evaluation's own grid, of the best model
        if outcome.grid is not None:
            save_grid(out / "learn_grid.png", outcome.grid)
            print(f"sample grid of the best checkpoint (label | generated | real): {out / 'learn_grid.png'}")
        print(f"curve: {out / 'learn_curve.json'}")
        meets = "meets" if best_miou >= TARGET_MIOU else "BELOW"
        print(f"\nbest mIoU {best_miou:.3f} at step {best['step'] if best else 0} ({meets} the {TARGET_MIOU} target in {args.minutes:.0f} min)")


if __name__ == "__main__":
    main()
