"""Training-step speed: the reference's plain computation vs spade_core's trainable fast path.

    python bench/train.py [--quick] [--iters 2] [--tiny-iters 8] [--no-workers] [--ade20k-batches 1 4]
                           [--fused-adam] [--tune-malloc]

One training iteration = generator step (G forward, discriminator on fake+real, hinge +
feature matching [+ VGG19 perceptual, random VGG weights] losses, backward, Adam step) +
discriminator step (the G step's fakes, detached; hinge; backward; Adam step), built from
train_job.steps exactly as training runs them. Variants, measured in this one run:

  plain fp32     the reference's computation: dense one-hot label maps, NCHW, separate
                 gamma/beta convs, torch's spectral norm, eager float32
  opt fp32       LabelMap input (the label convs of every SPADE, of G's fc and of each
                 discriminator scale's first conv as differentiable gathers), fused gamma/beta
                 conv, fused spectral norm (spade_core.norms.set_fast_training), channels_last
                 models and images (VGG included)
  plain bf16     plain fp32 under torch.autocast(bfloat16)
  opt bf16       opt fp32 under torch.autocast(bfloat16)

at the ADE20K config (ngf 64, ndf 64, 256x256, 151 label channels, VGG loss on; batch 1
and 4) and at the tiny config (cluster/configs/tiny.yaml's model: 64x64, ngf 16, hidden 32,
ndf 16, n_layers 3, num_D 2; VGG off as in that config; batch 8). "Workers": the optimised
step (tiny batch 8, ADE20K batch 4) as 2 processes x 1 thread, each on half the batch, DDP
over gloo with synced batch norm (as scaling.num_workers 2 trains), against 1 process x 2
threads; images/s is then the aggregate, global batch / seconds per iteration.

images/s = batch / seconds per iteration: the best of the timed iterations, which the
variants take in turns after one warm-up each (so that load from elsewhere on the machine
hits all alike; the load average is printed: numbers from a busy machine mean little).
Every variant starts from the same weights and trains on the same batch.
"""

from __future__ import annotations

import argparse
import copy
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import spade_core  # noqa: E402
from spade_core.config import DiscriminatorConfig, GeneratorConfig, LabelConfig, ModelConfig, SpadeConfig  # noqa: E402
from spade_core.losses import LossConfig, VGG19Features, VGGLoss  # noqa: E402
from spade_core.norms import set_fast_training  # noqa: E402
from spade_core.syncbn import convert_sync_batchnorm  # noqa: E402
from train_job.steps import Networks, discriminator_losses, generator_losses, semantics_of  # noqa: E402

SAMPLE = REPO / "samples/ade20k/ADEChallengeData2016/annotations/training/ADE_train_00000001.png"

ADE20K = ModelConfig()  # the defaults are cluster/configs/ade20k.yaml's model
TINY = ModelConfig(
    labels=LabelConfig(label_nc=150),
    generator=GeneratorConfig(ngf=16, crop_size=64, spade=SpadeConfig(norm="batch", kernel_size=3, hidden=32)),
    discriminator=DiscriminatorConfig(ndf=16, n_layers=3, num_D=2),
)
LOSS_ADE20K = LossConfig(vgg_weights="random")  # hinge, feature matching, VGG: the yaml's losses
LOSS_TINY = LossConfig(use_vgg_loss=False)
LR_G, LR_D, BETAS = 1e-4, 4e-4, (0.0, 0.9)  # TTUR, the reference's defaults
OPTIONS = {"fused_adam": False, "tune_malloc": False}  # command-line options, for every variant alike


def tune_malloc() -> None:
    """Keep freed memory in glibc's heap instead of returning it to the OS (--tune-malloc).

    Large tensors are otherwise mmap'ed and page-faulted in afresh on every allocation,
    which costs ~6-12% of a step here; the same as MALLOC_MMAP_THRESHOLD_ /
    MALLOC_TRIM_THRESHOLD_ in the environment (or jemalloc / tcmalloc).
    """
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 1 << 31 - 1)  # M_TRIM_THRESHOLD

VARIANTS = [("plain fp32", False, False), ("opt fp32", True, False), ("plain bf16", False, True), ("opt bf16", True, True)]


def sample_batch(config: ModelConfig, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Real ADE20K-like label layouts (the sample annotation, shifted and flipped per image) and random images."""
    h, w = config.generator.output_size
    base = np.array(Image.open(SAMPLE).resize((w, h), Image.NEAREST))
    maps = [np.roll(base if i % 2 == 0 else base[:, ::-1], (w // 16) * i, axis=1) for i in range(batch)]
    g = torch.Generator().manual_seed(seed)
    return {"label": torch.from_numpy(np.stack(maps)).long(), "image": torch.rand(batch, 3, h, w, generator=g) * 2 - 1}


@dataclass
class Trainer:
    """One variant's networks, optimisers and step."""

    model: spade_core.SpadeModel
    nets: Networks
    vgg: VGGLoss | None
    loss: LossConfig
    fast: bool
    bf16: bool
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer

    @classmethod
    def build(
        cls, base: spade_core.SpadeModel, vgg: VGGLoss | None, loss: LossConfig, *, fast: bool, bf16: bool, sync_bn: bool = False
    ) -> Trainer:
        model = copy.deepcopy(base).train()
        vgg = copy.deepcopy(vgg) if vgg is not None else None
        if fast:
            set_fast_training(model)
            model.to(memory_format=torch.channels_last)
            if vgg is not None:
                vgg.to(memory_format=torch.channels_last)
        generator, discriminator = model.generator, model.discriminator
        if sync_bn:
            generator = convert_sync_batchnorm(generator)
            discriminator = convert_sync_batchnorm(discriminator)
            generator = torch.nn.parallel.DistributedDataParallel(generator)
            discriminator = torch.nn.parallel.DistributedDataParallel(discriminator)
        fused = OPTIONS["fused_adam"] or None
        opt_g = torch.optim.Adam(model.generator.parameters(), lr=LR_G, betas=BETAS, fused=fused)
        opt_d = torch.optim.Adam(model.discriminator.parameters(), lr=LR_D, betas=BETAS, fused=fused)
        return cls(model, Networks(generator, discriminator), vgg, loss, fast, bf16, opt_g, opt_d)

    def step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        image = batch["image"].contiguous(memory_format=torch.channels_last) if self.fast else batch["image"]
        autocast = torch.autocast(image.device.type, dtype=torch.bfloat16, enabled=self.bf16)
        with autocast:
            sem = semantics_of(batch, self.model.config.labels, as_label_map=self.fast)
            g_terms, fake = generator_losses(self.nets, sem, image, loss=self.loss, vgg=self.vgg)
        self.opt_g.zero_grad(set_to_none=True)
        sum(g_terms.values()).backward()
        self.opt_g.step()
        with autocast:
            d_terms = discriminator_losses(self.nets, sem, image, loss=self.loss, fake=fake)
        self.opt_d.zero_grad(set_to_none=True)
        sum(d_terms.values()).backward()
        self.opt_d.step()
        return {k: float(v.detach()) for k, v in {**g_terms, **d_terms}.items()}


def run_setting(
    name: str, config: ModelConfig, loss: LossConfig, batch_size: int, iters: int, variants: list, results: dict
) -> None:
    """Every variant: one warm-up step, then ``iters`` timed steps taken in turns (variant 1,
    2, 3, 4, 1, 2, ...), so that a change in the machine's load hits all of them alike; the
    best time of each counts."""
    base = spade_core.build_model(config, seed=0)  # the training init (xavier, gain 0.02)
    vgg = VGGLoss(VGG19Features()) if loss.use_vgg_loss else None
    batch = sample_batch(config, batch_size)
    print(f"\n{name}, batch {batch_size} ({iters} timed iterations each after 1 warm-up; load average {_load()})", flush=True)
    trainers, first = {}, {}
    for label, fast, bf16 in variants:
        trainers[label] = Trainer.build(base, vgg, loss, fast=fast, bf16=bf16)
        first[label] = trainers[label].step(batch)
    best = {label: float("inf") for label in trainers}
    for _ in range(iters):
        for label, trainer in trainers.items():
            t0 = time.perf_counter()
            trainer.step(batch)
            best[label] = min(best[label], time.perf_counter() - t0)
    ref_label = next(iter(trainers))  # plain fp32 (plain bf16 when --quick leaves fp32 out)
    for label, secs in best.items():
        results[(name, batch_size, label)] = batch_size / secs
        terms = " ".join(f"{k} {v:.3f}" for k, v in first[label].items())
        print(
            f"  {label:12s} {batch_size / secs:7.3f} img/s  {secs:7.2f} s/it  {best[ref_label] / secs:5.2f}x vs {ref_label}"
            f"   first step: {terms}",
            flush=True,
        )
    print(f"  (load average now {_load()})", flush=True)


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ---------------------------------------------------------------------------------------
# 2 workers: DDP over gloo, one thread each


def _worker(
    rank: int, world: int, port: int, config: ModelConfig, loss: LossConfig, batch_size: int, iters: int, bf16: bool, options: dict, queue
) -> None:
    torch.set_num_threads(1)
    OPTIONS.update(options)
    if options.get("tune_malloc"):
        tune_malloc()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        base = spade_core.build_model(config, seed=0)
        vgg = VGGLoss(VGG19Features()) if loss.use_vgg_loss else None
        full = sample_batch(config, batch_size)
        per = batch_size // world
        batch = {k: v[rank * per : (rank + 1) * per] for k, v in full.items()}
        trainer = Trainer.build(base, vgg, loss, fast=True, bf16=bf16, sync_bn=True)
        trainer.step(batch)
        times = []
        for _ in range(iters):
            torch.distributed.barrier()
            t0 = time.perf_counter()
            trainer.step(batch)
            torch.distributed.barrier()
            times.append(time.perf_counter() - t0)
        if rank == 0:
            queue.put(min(times))
    finally:
        torch.distributed.destroy_process_group()


def run_workers(
    name: str, config: ModelConfig, loss: LossConfig, batch_size: int, iters: int, results: dict, dtypes: tuple[str, ...] = ("fp32", "bf16")
) -> None:
    ctx = torch.multiprocessing.get_context("spawn")
    print(
        f"\n{name}, batch {batch_size}, optimised step: 2 DDP processes x 1 thread, {batch_size // 2} images each "
        f"(gloo, synced batch norm) vs 1 process x 2 threads ({iters} timed iterations; load average {_load()})",
        flush=True,
    )
    for bf16 in [d == "bf16" for d in dtypes]:
        label = f"opt {'bf16' if bf16 else 'fp32'}"
        one = results.get((name, batch_size, label))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        queue = ctx.SimpleQueue()
        torch.multiprocessing.spawn(
            _worker, args=(2, port, config, loss, batch_size, iters, bf16, dict(OPTIONS), queue), nprocs=2, join=True, start_method="spawn"
        )
        secs = queue.get()
        results[(name, batch_size, f"{label} 2 workers")] = batch_size / secs
        vs = f"  {batch_size / secs / one:5.2f}x vs 1 process x 2 threads ({one:.2f} img/s)" if one else ""
        print(f"  {label} 2 workers {batch_size / secs:7.2f} img/s aggregate ({secs:.3f} s/it){vs}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="skip the ADE20K batch-4 fp32 runs (the slowest: ~30 s per iteration), 1 and 2 workers"
    )
    parser.add_argument("--iters", type=int, default=2, help="timed iterations per variant at the ADE20K config")
    parser.add_argument("--tiny-iters", type=int, default=8, help="timed iterations per variant at the tiny config")
    parser.add_argument("--no-workers", action="store_true", help="skip the 2-worker DDP runs")
    parser.add_argument("--no-ade20k", action="store_true", help="only the tiny config")
    parser.add_argument("--ade20k-batches", type=int, nargs="+", default=[1, 4], help="batch sizes at the ADE20K config")
    parser.add_argument("--fused-adam", action="store_true", help="torch.optim.Adam(fused=True) in every variant")
    parser.add_argument("--tune-malloc", action="store_true", help="see tune_malloc(); applies to every variant")
    args = parser.parse_args()
    OPTIONS.update(fused_adam=args.fused_adam, tune_malloc=args.tune_malloc)
    if args.tune_malloc:
        tune_malloc()
    torch.manual_seed(0)
    t_start = time.perf_counter()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
        f"Adam fused={args.fused_adam}, malloc tuned={args.tune_malloc}"
    )
    results: dict = {}
    if not args.no_ade20k:
        for b in args.ade20k_batches:
            variants = [v for v in VARIANTS if not (args.quick and b > 1 and not v[2])]
            if len(variants) < len(VARIANTS):
                print(f"\n(--quick: no fp32 runs at ADE20K batch {b}; its ratios are vs plain bf16)")
            run_setting("ADE20K", ADE20K, LOSS_ADE20K, b, args.iters, variants, results)
    run_setting("tiny", TINY, LOSS_TINY, 8, args.tiny_iters, VARIANTS, results)
    if not args.no_workers:
        run_workers("tiny", TINY, LOSS_TINY, 8, args.tiny_iters, results)
        if not args.no_ade20k and max(args.ade20k_batches) > 1:
            dtypes = ("bf16",) if args.quick else ("fp32", "bf16")
            run_workers("ADE20K", ADE20K, LOSS_ADE20K, max(args.ade20k_batches), args.iters, results, dtypes)

    print("\nimages/s (ratio vs plain fp32 of the same setting)")
    settings = sorted({(n, b) for n, b, _ in results}, key=lambda nb: (nb[0] != "ADE20K", nb[1]))
    labels = [v[0] for v in VARIANTS] + ["opt fp32 2 workers", "opt bf16 2 workers"]
    print(f"  {'setting':18s}" + "".join(f"{lab:>22s}" for lab in labels))
    for n, b in settings:
        ref = results.get((n, b, "plain fp32"))
        cells = []
        for lab in labels:
            v = results.get((n, b, lab))
            cells.append("-" if v is None else f"{v:.3f}" + (f" ({v / ref:.2f}x)" if ref else ""))
        print(f"  {n + ' b' + str(b):18s}" + "".join(f"{c:>22s}" for c in cells))

    if ("ADE20K", 1, "plain fp32") in results:
        print("\ntargets at the ADE20K config, batch 1 (vs plain fp32 in this run):")
        ref = results[("ADE20K", 1, "plain fp32")]
        for lab, target in (("opt fp32", 1.3), ("opt bf16", 3.0), ("plain bf16", None)):
            ratio = results[("ADE20K", 1, lab)] / ref
            verdict = "(no target)" if target is None else ("meets" if ratio >= target else "BELOW") + f" {target}x"
            print(f"  {lab:12s} {ratio:5.2f}x  {verdict}")
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
