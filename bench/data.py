"""Data pipeline throughput vs what training consumes, measured in one run on this machine.

    python bench/data.py [--n 256] [--size 512] [--batch-size 16]

1. writes a synthetic ADE20K-layout dataset (S x S JPEG + PNG pairs) and prepares Parquet shards;
2. plain loop: one process reads the shards with pyarrow, decodes and augments with PIL;
3. Ray Data: the training pipeline (read_parquet -> decode + augment in map_batches ->
   iter_torch_batches), timed over a full epoch after a warm-up epoch;
4. training: one full iteration (generator step + discriminator step, backward, Adam) at
   the ADE20K config (ngf 64, 256x256, hinge + feature matching + VGG19) on this machine.
All preprocessing is ADE20K training's: resize to 286, random 256 crop, random flip.
Target: the pipeline delivers >= 3x what training consumes.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import tempfile
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import spade_core  # noqa: E402
from spade_core.config import GeneratorConfig, ModelConfig  # noqa: E402
from spade_core.losses import LossConfig, VGG19Features, VGGLoss  # noqa: E402
from spade_core.preprocess import PreprocessConfig, sample_params, transform_image_uint8, transform_label  # noqa: E402
from train_job.pipeline import build_dataset, iter_training_batches  # noqa: E402
from train_job.shards import open_shards  # noqa: E402
from train_job.prepare import main as prepare_main  # noqa: E402
from train_job.steps import Networks, discriminator_losses, generator_losses, semantics_of  # noqa: E402
from train_job.synthetic import write_dataset  # noqa: E402

ADE20K_TRAIN = PreprocessConfig(mode="resize_and_crop", load_size=286, crop_size=256, flip=True)


def plain_loop(root: str) -> float:
    """Images/s of one process decoding and augmenting every example of the shards."""
    shards = open_shards(root, "train")
    rng = np.random.default_rng(0)
    n, t0 = 0, time.perf_counter()
    for path in shards.paths:
        table = pq.read_table(path, columns=["image", "label"])
        for img_bytes, lab_bytes in zip(table["image"].to_pylist(), table["label"].to_pylist()):
            with Image.open(io.BytesIO(img_bytes)) as img, Image.open(io.BytesIO(lab_bytes)) as lab:
                params = sample_params(ADE20K_TRAIN, img.size, rng, train=True)
                transform_image_uint8(img, ADE20K_TRAIN, params)
                transform_label(lab, ADE20K_TRAIN, params)
            n += 1
    return n / (time.perf_counter() - t0)


def ray_pipeline(root: str, batch_size: int) -> tuple[float, float]:
    """(images/s over the second epoch, seconds to the first batch of the first epoch)."""
    import ray

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        ds = build_dataset(root, split="train", preprocess=ADE20K_TRAIN, train=True, seed=0)
        t0 = time.perf_counter()
        first = None
        for _ in iter_training_batches(ds, batch_size=batch_size, epoch=0):
            first = first or time.perf_counter() - t0
        n, t0 = 0, time.perf_counter()
        for batch in iter_training_batches(ds, batch_size=batch_size, epoch=1):
            n += batch["image"].shape[0]
        return n / (time.perf_counter() - t0), first or float("nan")
    finally:
        ray.shutdown()


def training_rate(batch_size: int, iters: int) -> float:
    """Images/s of full training iterations (G step + D step) at the ADE20K config."""
    config = ModelConfig(generator=GeneratorConfig(ngf=64))
    model = spade_core.build_model(config, seed=0).train()
    nets = Networks(model.generator, model.discriminator)
    loss = LossConfig()
    vgg = VGGLoss(VGG19Features())  # random weights: the cost is the same as ImageNet's
    opt_g = torch.optim.Adam(model.generator.parameters(), lr=1e-4, betas=(0.0, 0.9))
    opt_d = torch.optim.Adam(model.discriminator.parameters(), lr=4e-4, betas=(0.0, 0.9))
    batch = {"image": torch.rand(batch_size, 3, 256, 256) * 2 - 1, "label": torch.randint(0, 151, (batch_size, 256, 256))}

    def iteration() -> None:
        sem = semantics_of(batch, config.labels)
        opt_g.zero_grad(set_to_none=True)
        terms, fake = generator_losses(nets, sem, batch["image"], loss=loss, vgg=vgg)
        sum(terms.values()).backward()
        opt_g.step()
        opt_d.zero_grad(set_to_none=True)
        sum(discriminator_losses(nets, sem, batch["image"], loss=loss).values()).backward()
        opt_d.step()

    iteration()  # warm-up
    t0 = time.perf_counter()
    for _ in range(iters):
        iteration()
    return batch_size * iters / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=256, help="synthetic pairs")
    parser.add_argument("--size", type=int, default=512, help="synthetic image size (ADE20K images are ~512 px)")
    parser.add_argument("--batch-size", type=int, default=16, help="pipeline batch size")
    parser.add_argument("--train-iters", type=int, default=2)
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}, {args.n} synthetic {args.size}x{args.size} pairs -> 256x256")
    with tempfile.TemporaryDirectory() as tmp:
        write_dataset(os.path.join(tmp, "ade"), n=args.n, size=args.size, seed=0, split="training")
        shards = os.path.join(tmp, "shards")
        prepare_main(["--dataset", "ade20k", "--root", os.path.join(tmp, "ade"), "--split", "train",
                      "--out", shards, "--shard-rows", "32"])
        plain = plain_loop(shards)
        print(f"plain PIL loop (1 process)       {plain:8.1f} img/s")
        ray_rate, first = ray_pipeline(shards, args.batch_size)
        print(f"Ray Data pipeline                {ray_rate:8.1f} img/s   (first batch after {first:.1f} s)")
    train = training_rate(1, args.train_iters)
    print(f"training consumes (ADE20K cfg)   {train:8.2f} img/s   (G+D iteration, batch 1, fp32)")
    ratio = ray_rate / train
    print(f"\npipeline / training = {ratio:.0f}x   ({'meets' if ratio >= 3 else 'BELOW'} the 3x target); "
          f"pipeline / plain loop = {ray_rate / plain:.2f}x")


if __name__ == "__main__":
    main()
