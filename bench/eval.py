"""What evaluation costs, in one run: Inception throughput, a whole ``spade-eval run``, and
evaluation's share of a training run.

    python bench/eval.py [--images 500] [--model tiny|ade20k] [--inception PATH] [--device auto]
                         [--parts inception,run,training] [--train-steps 120] [--eval-every 40]

1. Inception features (``spade_core.metrics.activations``: pytorch-fid's preprocessing,
   bilinear resize to 299, 2048-d pool features) on 256x256 uint8 images at batch 16, fp32
   and bf16 (autocast), images/s, on ``--device`` (auto: CUDA when there is one). Each
   precision runs until ``--seconds`` have passed (at least one batch after a warm-up one):
   on a CPU without bf16 hardware bf16 runs torch's reference kernels, so its batches are
   slow, and fewer of them are timed.
2. ``spade-eval run`` as a user runs it (a subprocess: Ray start-up included) on ``--images``
   synthetic validation scenes with the ``--model`` architecture (random weights: the cost
   does not depend on them): FID + KID (2048 dims) and oracle mIoU, every stage on the
   embedded Ray. Prints the wall time, the pipeline's images/s and the metrics' seconds from
   eval.json.
3. In-training evaluation: the tiny preset (2 CPU workers) trained ``--train-steps`` steps
   twice, with evaluation every ``--eval-every`` steps (64 validation pairs; FID, KID and
   oracle mIoU) and without: the runs' wall times, the evaluations' own seconds
   (metrics.jsonl ``eval_s``) and their share of the run.

Without ``--inception`` the Inception weights are random in pytorch-fid's layout (same
cost; the FID values are then not comparable to anyone's, and none are printed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import spade_core  # noqa: E402
from spade_core.config import ModelConfig  # noqa: E402
from spade_core.metrics import activations, load_fid_inception  # noqa: E402
from spade_core.testing import random_inception_state, randomize_weights  # noqa: E402
from train_job.config import load_train_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY_YAML = REPO / "cluster/configs/tiny.yaml"
PARTS = ("inception", "run", "training")


def model_config(name: str) -> ModelConfig:
    return load_train_config(TINY_YAML).model if name == "tiny" else ModelConfig()  # ModelConfig(): ADE20K, 256x256


def inception_file(given: str | None, tmp: Path) -> tuple[Path, bool]:
    """The weight file and whether it is pytorch-fid's own (else random, in its layout)."""
    if given:
        return Path(given), True
    path = tmp / "inception-random.pth"
    torch.save(random_inception_state(0), path)
    return path, False


def inception_throughput(weights: Path, official: bool, *, device: torch.device, precision: str, batch: int, seconds: float) -> dict[str, float]:
    """images/s of feature extraction from 256x256 uint8 images (upload, resize and pool included)."""
    model = load_fid_inception(weights, device=device, allow_any_inception=not official)
    rng = np.random.default_rng(0)
    sets = [torch.from_numpy(rng.integers(0, 256, (batch, 3, 256, 256), dtype=np.uint8)) for _ in range(3)]

    def once(i: int) -> float:
        t0 = time.perf_counter()
        feats = activations([sets[i % 3]], model, dims=2048, batch_size=batch, device=device, precision=precision)  # type: ignore[arg-type]
        assert feats.shape == (batch, 2048) and np.isfinite(feats).all()
        return time.perf_counter() - t0  # activations returns NumPy: the device has finished

    warmup = once(0)
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while not times or time.perf_counter() < deadline:
        times.append(once(len(times) + 1))
    return {"images_per_s": batch / float(np.median(times)), "batches": len(times), "warmup_s": warmup}


def write_split(root: Path, *, n_train: int, n_val: int, size: int) -> Path:
    """Synthetic scenes (both splits) prepared as shards; returns the shards' folder."""
    from train_job.prepare import main as prepare_main
    from train_job.synthetic import write_dataset

    write_dataset(root / "scenes", n=n_train, size=size, seed=0, split="both", val_n=n_val, workers=os.cpu_count() or 1)
    for split in ("train", "val"):
        code = prepare_main(["--dataset", "ade20k", "--root", str(root / "scenes"), "--split", split,
                             "--out", str(root / "shards"), "--shard-rows", "100", "--no-progress"])
        if code:
            sys.exit(f"prepare --split {split} failed ({code})")
    return root / "shards"


def eval_run(shards: Path, weights: Path, official: bool, *, config: ModelConfig, images: int, device: str, tmp: Path) -> dict[str, object]:
    """One ``spade-eval run`` subprocess, timed from the outside; its eval.json's own timings."""
    checkpoint = spade_core.save_checkpoint(randomize_weights(spade_core.build_model(config, discriminator=False, seed=0)), tmp / "ckpt")
    out = tmp / "eval_out"
    argv = [sys.executable, "-m", "train_job.eval_cli", "run", "--checkpoint", str(checkpoint), "--data", str(shards),
            "--num-images", str(images), "--inception", str(weights), "--oracle", "--device", device,
            "--out", str(out), "--no-progress", *([] if official else ["--allow-any-inception"])]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"spade-eval run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    record = json.loads((out / "eval.json").read_text())
    return {"wall_s": wall, **record["wall_time_s"], "scores": record["metrics"]}


def training_share(shards: Path, weights: Path, official: bool, *, steps: int, every: int, tmp: Path) -> dict[str, dict[str, float]]:
    """The tiny preset trained ``steps`` steps with and without evaluation every ``every`` steps."""
    import ray

    from train_job.__main__ import build_trainer

    out: dict[str, dict[str, float]] = {}
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        for name, eval_sets in (("without eval", ["eval.every_steps=0"]),
                                ("with eval", [f"eval.every_steps={every}", "eval.num_images=64", f"eval.inception={weights}",
                                               f"eval.allow_any_inception={str(not official).lower()}", "eval.oracle=true",
                                               "eval.metrics=[fid, kid, miou]"])):
            cfg = load_train_config(TINY_YAML, [
                f"data.shards={shards}", f"storage.path={tmp / 'runs'}", f"storage.name={name.replace(' ', '_')}",
                "optim.niter=1000", "optim.niter_decay=0", f"optim.max_steps={steps}", f"checkpoint.every_steps={steps}", "logging.every_steps=20",
                "logging.sample_grid_every_steps=0", "logging.metrics_port=null", "logging.tensorboard=false", *eval_sets,
            ])
            t0 = time.perf_counter()
            result = build_trainer(cfg).fit()
            wall = time.perf_counter() - t0
            if result.error is not None:
                sys.exit(f"training ({name}) failed: {result.error}")
            lines = [json.loads(line) for line in (Path(result.path) / "metrics.jsonl").read_text().splitlines() if line.strip()]
            evals = [line for line in lines if "eval" in line]
            out[name] = {"wall_s": wall, "evaluations": len(evals), "eval_s": sum(e["eval_s"] for e in evals)}
    finally:
        ray.shutdown()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=500, help="images of the spade-eval run (part 2)")
    parser.add_argument("--model", choices=["tiny", "ade20k"], default="tiny", help="architecture of part 2's checkpoint")
    parser.add_argument("--inception", help="pytorch-fid's weight file (default: random weights in its layout)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"some of {', '.join(PARTS)}")
    parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds per Inception precision (part 1)")
    parser.add_argument("--train-steps", type=int, default=120)
    parser.add_argument("--eval-every", type=int, default=40)
    args = parser.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if unknown := sorted(set(parts) - set(PARTS)):
        sys.exit(f"--parts: unknown {', '.join(unknown)} (choose from {', '.join(PARTS)})")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, load average "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    summary: list[str] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        weights, official = inception_file(args.inception, tmp)
        if not official:
            print("Inception: random weights in pytorch-fid's layout (costs are real; metric values are not comparable)")
        if "inception" in parts:
            print("\n== 1. Inception features, 256x256 uint8 -> 2048-d, batch 16 ==", flush=True)
            rates = {}
            for precision in ("fp32", "bf16"):
                r = inception_throughput(weights, official, device=device, precision=precision, batch=16, seconds=args.seconds)
                rates[precision] = r["images_per_s"]
                print(f"  {precision}  {r['images_per_s']:8.1f} images/s  ({r['batches']} timed batches, warm-up {r['warmup_s']:.1f}s)")
            summary.append(f"Inception on {device}: fp32 {rates['fp32']:.1f} images/s, bf16 {rates['bf16']:.1f} images/s "
                           f"(bf16 / fp32 = {rates['bf16'] / rates['fp32']:.2f}x)")
        if {"run", "training"} & set(parts):
            config = model_config(args.model)
            size = config.generator.output_size[0] if "run" in parts else 64
            n_val = max(args.images, 64) if "run" in parts else 64  # part 3 scores 64
            print(f"\nwriting {n_val} synthetic validation scenes ({size}x{size}) + 400 training scenes ...", flush=True)
            shards = write_split(tmp, n_train=400, n_val=n_val, size=size)
            if "run" in parts:
                print(f"\n== 2. spade-eval run: {args.images} images, {args.model} model, FID + KID + oracle mIoU ==", flush=True)
                r = eval_run(shards, weights, official, config=config, images=args.images, device=args.device, tmp=tmp)
                print(f"  wall {r['wall_s']:.1f}s (the command, Ray start-up included); pipeline {r['pipeline']:.1f}s "
                      f"({r['images_per_s']:.1f} images/s: decode, generate, Inception, segment); metrics {r['metrics']:.1f}s")
                summary.append(f"spade-eval run, {args.images} images ({args.model}, {device}): {r['wall_s']:.0f}s wall, "
                               f"{r['images_per_s']:.1f} images/s in the pipeline")
            if "training" in parts:
                if size != 64:
                    sys.exit("part 3 trains the tiny preset: run it with --model tiny")
                print(f"\n== 3. training {args.train_steps} steps (tiny preset, 2 workers), eval every {args.eval_every} ==", flush=True)
                runs = training_share(shards, weights, official, steps=args.train_steps, every=args.eval_every, tmp=tmp)
                with_eval, without = runs["with eval"], runs["without eval"]
                for name, r in runs.items():
                    print(f"  {name:13s} wall {r['wall_s']:6.1f}s  {r['evaluations']} evaluations, {r['eval_s']:.1f}s in them")
                share = with_eval["eval_s"] / with_eval["wall_s"]
                extra = with_eval["wall_s"] / without["wall_s"] - 1
                summary.append(f"in-training eval every {args.eval_every} steps: {share:.0%} of the run's wall time in evaluation "
                               f"({with_eval['eval_s'] / max(with_eval['evaluations'], 1):.1f}s each, 64 images); the run took "
                               f"{extra:+.0%} longer than without")
    print("\n== summary ==")
    for line in summary:
        print(f"  {line}")


if __name__ == "__main__":
    main()
