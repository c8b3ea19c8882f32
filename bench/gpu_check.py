"""One prepared check of every CUDA path the project has, for a short slot on one GPU.

    python bench/gpu_check.py                # one GPU (H200-class, 16 cores): about 7 minutes
    python bench/gpu_check.py --cpu-smoke    # every stage at toy sizes on the CPU (tests/test_gpu_check.py)
    python bench/gpu_check.py --stages 1,4   # a subset; --budget-s caps the optional measurements

On an image without Ray (an air-gapped GPU node), unpack the offline bundle first and put it
on PYTHONPATH beside the checkout (README, "Offline bundle"); stages 1, 2b and 4 need only torch.

Stages:
  1 correctness   generator (plain and fast path), encoder and discriminator on the device
                  against the CPU fp32 output: fp32 with TF32 off <= 1e-5 relative, bf16 <= 1e-2,
                  fp16 <= 5e-3 (NaN never passes), fresh random inputs per check; the trainable
                  fast path's loss terms and gradients against the plain path's on the device
  2 sync BN       a) spade_core.SyncBatchNorm inside a TorchTrainer(use_gpu) worker, in its real
                  (NCCL) process group, world size 1, plus torch's own sync computation forced
                  through that group; b) 2 ranks on the one device (gloo: NCCL refuses two ranks
                  per GPU) == 1 rank x double batch: outputs, input and weight gradients, stats
  3 training      spade-train itself (TorchTrainer, 1 GPU worker, Ray Data from synthetic 256^2
                  shards) at the ADE20K preset with VGG (random weights), bf16, channels_last,
                  fast path, per batch size; and the plain fp32 computation at one batch size:
                  images/s, step time, data-wait share, peak memory, TFLOP/s (FLOPs of one
                  G+D iteration counted once with torch's FLOP counter)
  4 inference     generator images/s at batch 1/8/32/64, fp32/bf16/fp16, eager, CUDA graphs,
                  torch.compile; the card's bf16 matmul peak measured in the same run
  5 serving       spade-serve with one GPU generator replica, bench/serve.py's closed loop at
                  1/16/64 clients: served / raw batched model, p50 / p99
  6 VAE           style encoding and style-guided synthesis at batch 16: accuracy and speed
  8 evaluation    pytorch-fid's Inception on the device vs the CPU (fp32 <= 1e-5, bf16 <= 1e-2) and its
                  images/s (bench/eval.py's measurement); spade-eval run's Ray Data pipeline with
                  one GPU actor: 500 images of the ADE20K model, FID + KID + oracle mIoU, wall time
  7 profiles      torch.profiler's top kernels of one inference batch / training iteration
                  whose goal was missed (both in the smoke run)

Goals are measured and reported, never turned into failures: inference bf16 batch 32 >= 30% of
the measured bf16 matmul peak; fast path >= 5x plain fp32 at batch 1; training bf16 >= 3x plain
fp32 with data wait < 5%; serving >= 90% of the raw batched model at 64 clients.

Prints a short table last; writes every number as JSON to $OUT/gpu_check.json when OUT is set,
else out/gpu_check.json. Exit status 1 when a correctness check failed or a stage crashed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import spade_core  # noqa: E402
from spade_core.config import EncoderConfig, ModelConfig  # noqa: E402
from spade_core.fast import FastGenerator  # noqa: E402
from spade_core.losses import LossConfig  # noqa: E402
from spade_core.norms import set_fast_training  # noqa: E402
from spade_core.syncbn import SyncBatchNorm, convert_sync_batchnorm  # noqa: E402
from spade_core.semantics import label_channels, one_hot, semantic_input  # noqa: E402
from spade_core.testing import randomize_weights  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOLERANCE = {"fp32": 1e-5, "bf16": 1e-2, "fp16": 5e-3}  # relative to the CPU fp32 output
FLOOR_FACTOR = 1.5  # a low-precision device result may be this much less accurate than the CPU's in the same dtype
GRAD_FACTOR = 2.0  # the fast path's gradients may be this much further from float64 than the plain path's
# A wrong gradient is off by percents. A right one in fp32 is ~1e-6 off float64, except at
# points where an activation sits within rounding of a ReLU kink: there any fp32-sized
# perturbation (the plain path, the fast path, or float64 with weights nudged by 6e-8) can
# land 1e-4..1e-3 away (bench/grad_conditioning.py measures it), so errors below this pass
# whatever the plain path's. (The fast path in float64 is exact: 7e-15.)
GRAD_FLOOR = 5e-3  # above the 3.1e-3 seen at such a point (tiny preset, seed 0, plain fp32)
PRESETS = REPO / "cluster" / "configs"


# ---------------------------------------------------------------------------------------
# Sizes: the real check, and the CPU smoke run


@dataclass(frozen=True)
class Sizes:
    preset: str  # training preset under cluster/configs/
    check_batch: int
    train_batches: tuple[int, ...]
    train_steps: int  # per run; the first warmup_steps are not measured
    warmup_steps: int
    plain_batch: int
    plain_steps: int
    scenes: int
    scene_size: int
    infer_batches: tuple[int, ...]
    infer_ms: float  # time each inference variant at least this long
    graph_batches: tuple[int, ...]
    compile_variants: tuple[tuple[str, int], ...]  # (dtype, batch), most important first
    serve_batch: int
    serve_clients: tuple[int, ...]
    serve_seconds: float
    vae_batch: int
    peak_size: int  # square bf16 matmul for the peak
    sync_channels: int
    eval_images: int  # spade-eval run's images
    eval_batch: int  # Inception throughput batch
    eval_seconds: float  # timed seconds per Inception precision
    warmup: int = 3  # untimed calls before each timed variant
    reps: int = 5  # timed calls at least


GPU = Sizes(
    preset="ade20k.yaml", check_batch=2, train_batches=(8, 16, 32), train_steps=20, warmup_steps=4, plain_batch=16,
    plain_steps=10, scenes=768, scene_size=256, infer_batches=(1, 8, 32, 64), infer_ms=400.0, graph_batches=(1, 8, 32),
    compile_variants=(("bf16", 32), ("bf16", 1), ("fp16", 32)), serve_batch=32, serve_clients=(1, 16, 64),
    serve_seconds=10.0, vae_batch=16, peak_size=8192, sync_channels=64, eval_images=500, eval_batch=64, eval_seconds=3.0,
)
SMOKE = Sizes(
    preset="tiny.yaml", check_batch=2, train_batches=(2,), train_steps=3, warmup_steps=1, plain_batch=2, plain_steps=0,
    scenes=12, scene_size=64, infer_batches=(1, 2), infer_ms=20.0, graph_batches=(), compile_variants=(), serve_batch=2,
    serve_clients=(1, 2), serve_seconds=1.5, vae_batch=2, peak_size=256, sync_channels=8, eval_images=8, eval_batch=2,
    eval_seconds=0.5, warmup=1, reps=2,
)


# ---------------------------------------------------------------------------------------
# The run: device, clock, results


@dataclass
class Run:
    sizes: Sizes
    device: torch.device
    smoke: bool
    deadline: float
    tmp: Path
    results: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    goals: list[dict[str, Any]] = field(default_factory=list)
    clock: float = field(default_factory=time.perf_counter)  # when the last check or stage ended

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def stage(self, name: str) -> dict[str, Any]:
        return self.results.setdefault("stages", {}).setdefault(name, {"checks": [], "rows": [], "notes": []})

    def check(
        self, stage: str, name: str, error: float, tolerance: float, *, floor: Callable[[], float | None] | None = None, **extra: Any
    ) -> bool:
        """A correctness check: passes only for a finite error within the tolerance.

        ``floor`` (asked only when the error exceeds the tolerance): the error the same
        low-precision computation has on the CPU for these inputs. Deep networks in bf16 can
        exceed a fixed tolerance by rounding alone; the device then passes when it is no
        worse than FLOOR_FACTOR x that floor. Both verdicts are recorded.
        """
        within = math.isfinite(error) and error <= tolerance
        if not within and floor is not None:
            floor = error if not self.cuda else floor()  # on the CPU the device's computation is the floor's
        else:
            floor = None
        at_floor = floor is not None and math.isfinite(error) and error <= FLOOR_FACTOR * floor
        ok = within or at_floor
        entry = {"name": name, "error": error, "tolerance": tolerance, "ok": ok, "within_tolerance": within, **extra}
        if floor is not None:
            entry["cpu_same_dtype_error"] = floor
        self.stage(stage)["checks"].append(entry)
        if not ok:
            self.failures.append(f"{stage}: {name} error {error:.3g} > {tolerance:g}")
        how = f"<= {tolerance:g}" if within else f"> {tolerance:g}, CPU same dtype {floor:.2e}" if floor is not None else f"> {tolerance:g}"
        now = time.perf_counter()
        print(f"  [{'ok' if ok else 'FAIL'}] {name}: {error:.2e} ({how}) [{now - self.clock:.1f} s]", flush=True)
        self.clock = now
        return ok

    def row(self, stage: str, **fields: Any) -> None:
        self.stage(stage)["rows"].append(fields)

    def note(self, stage: str, text: str) -> None:
        self.stage(stage)["notes"].append(text)
        print(f"  note: {text}", flush=True)

    def goal(self, name: str, value: float | None, target: float, unit: str = "x") -> None:
        met = value is not None and math.isfinite(value) and value >= target
        self.goals.append({"goal": name, "value": value, "target": target, "unit": unit, "met": met})


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 on the CPU; NaN or inf anywhere gives inf."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if out.shape != ref.shape or not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 for matmuls and cuDNN convs on or off inside the block (true fp32 for the accuracy checks)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(run: Run, fn: Callable[[int], Any], *, warmup: int | None = None, min_ms: float | None = None, reps: int | None = None) -> float:
    """Median milliseconds of ``fn(i)`` (i rotates the caller's input sets): CUDA events on a
    GPU, after ``warmup`` calls; repeated until ``min_ms`` of timed work and ``reps`` calls."""
    min_ms = run.sizes.infer_ms if min_ms is None else min_ms
    warmup = run.sizes.warmup if warmup is None else warmup
    reps = run.sizes.reps if reps is None else reps
    for i in range(warmup):
        fn(i)
    synchronize(run.device)
    times: list[float] = []
    i = 0
    while len(times) < reps or sum(times) < min_ms:
        if run.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(i)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(i)
            times.append((time.perf_counter() - t0) * 1e3)
        i += 1
        if len(times) > 2000:
            break
    return statistics.median(times)


# ---------------------------------------------------------------------------------------
# Models and inputs


def preset_model(run: Run, name: str | None = None) -> ModelConfig:
    from train_job.config import load_train_config

    return load_train_config(PRESETS / (name or run.sizes.preset)).model


def vae_model(run: Run) -> ModelConfig:
    if not run.smoke:
        return preset_model(run, "ade20k_vae.yaml")
    base = preset_model(run)
    z = 32
    return replace(
        base, generator=replace(base.generator, z_dim=z), encoder=EncoderConfig(ndf=16, z_dim=z, input_size=base.generator.crop_size)
    )


def random_labels(config: ModelConfig, batch: int, seed: int) -> torch.Tensor:
    """Blocky raw label ids like real scenes (regions of 8x8 px), never all one class; some don't-care pixels."""
    g = torch.Generator().manual_seed(seed)
    h, w = config.generator.output_size
    ids = torch.randint(0, config.labels.label_nc + 1, (batch, max(h // 8, 1), max(w // 8, 1)), generator=g)
    ids = ids.repeat_interleave(8, 1).repeat_interleave(8, 2)[:, :h, :w]
    if config.labels.contain_dontcare_label:
        ids[:, :3, :5] = config.labels.dontcare_value
    return ids


def random_images(config: ModelConfig, batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    h, w = config.generator.output_size
    return torch.rand(batch, 3, h, w, generator=g) * 2 - 1


def trained_like(config: ModelConfig, *, discriminator: bool = True, seed: int = 1) -> spade_core.SpadeModel:
    """A fresh copy of a model with trained-like random weights (built once per config: the
    warm-up passes at the ADE20K size cost seconds on the host CPU)."""
    return copy.deepcopy(_trained_like(config, discriminator, seed))


@functools.lru_cache(maxsize=4)
def _trained_like(config: ModelConfig, discriminator: bool, seed: int) -> spade_core.SpadeModel:
    return randomize_weights(spade_core.build_model(config, discriminator=discriminator, seed=seed), seed=seed + 1).eval()


def flat(outputs: Any) -> torch.Tensor:
    """Every tensor of a (nested) discriminator output, flattened into one vector."""
    if isinstance(outputs, torch.Tensor):
        return outputs.detach().float().reshape(-1)
    return torch.cat([flat(o) for o in outputs])


# ---------------------------------------------------------------------------------------
# Stage 1: correctness on the device


def stage_correctness(run: Run) -> None:
    stage = "1 correctness"
    config = preset_model(run)
    cpu = trained_like(config)
    dev = copy.deepcopy(cpu).to(run.device)
    labels_cfg = config.labels
    seed = iter(range(1000, 2000))
    print(f"\n== {stage}: {config.generator.output_size} ngf {config.generator.ngf}, batch {run.sizes.check_batch} ==", flush=True)
    with tf32(False), torch.inference_mode():
        for precision in DTYPES:
            for path in ("plain", "fast"):
                if run.smoke and path == "plain" and precision != "fp32" and not cpu_has_bf16():
                    # autocast convs without bf16/fp16 hardware take the slow reference kernels: the
                    # fast path's low-precision checks below keep the smoke run's coverage of dtypes
                    run.note(stage, f"smoke on a CPU without bf16 hardware: generator plain {precision} not checked")
                    continue
                labels = random_labels(config, run.sizes.check_batch, next(seed))
                channels = label_channels(labels, labels_cfg)
                ref = cpu.generator(one_hot(channels, labels_cfg.num_label_channels))

                def generate(model: spade_core.SpadeModel, device: torch.device) -> torch.Tensor:
                    if path == "plain":
                        seg = one_hot(channels.to(device), labels_cfg.num_label_channels)
                        with torch.autocast(device.type, dtype=DTYPES[precision], enabled=precision != "fp32"):
                            return model.generator(seg)
                    return FastGenerator(model.generator, label_config=labels_cfg, dtype=DTYPES[precision])(channels.to(device))

                run.check(stage, f"generator {path} {precision}", relative_error(generate(dev, run.device), ref),
                          TOLERANCE[precision], floor=lambda: cpu_floor(run, precision, lambda: generate(cpu, torch.device("cpu")), ref))
        for precision in DTYPES:
            images = random_images(config, run.sizes.check_batch, next(seed))
            labels = random_labels(config, run.sizes.check_batch, next(seed))
            seg_cpu = semantic_input(labels, labels_cfg)
            d_in_cpu = torch.cat([seg_cpu, images], dim=1)
            ref = flat(cpu.discriminator(d_in_cpu))

            def discriminate(model: spade_core.SpadeModel, device: torch.device) -> torch.Tensor:
                with torch.autocast(device.type, dtype=DTYPES[precision], enabled=precision != "fp32"):
                    return flat(model.discriminator(d_in_cpu.to(device)))

            run.check(stage, f"discriminator {precision}", relative_error(discriminate(dev, run.device), ref), TOLERANCE[precision],
                      floor=lambda: cpu_floor(run, precision, lambda: discriminate(cpu, torch.device("cpu")), ref))
    vae_cpu = trained_like(vae_model(run), discriminator=False)
    vae_dev = copy.deepcopy(vae_cpu).to(run.device)
    with tf32(False), torch.inference_mode():
        for precision in DTYPES:
            style = random_images(vae_cpu.config, run.sizes.check_batch, next(seed))
            ref = torch.cat(vae_cpu.encoder(style), dim=1)  # (mu, logvar)

            def encode(model: spade_core.SpadeModel, device: torch.device) -> torch.Tensor:
                with torch.autocast(device.type, dtype=DTYPES[precision], enabled=precision != "fp32"):
                    return torch.cat(model.encoder(style.to(device)), dim=1)

            run.check(stage, f"encoder {precision}", relative_error(encode(vae_dev, run.device), ref), TOLERANCE[precision],
                      floor=lambda: cpu_floor(run, precision, lambda: encode(vae_cpu, torch.device("cpu")), ref))
    with tf32(False):
        gradient_checks(run, stage, config, seed=next(seed))


def cpu_floor(run: Run, precision: str, compute: Callable[[], torch.Tensor], ref: torch.Tensor) -> float | None:
    """The error of the same low-precision computation on the CPU (None for fp32, or where the CPU lacks the dtype)."""
    if precision == "fp32" or (run.cuda and not cpu_has(precision)):
        return None  # a full-size network on a CPU without the dtype's hardware takes minutes: the fixed tolerance alone
    try:
        return relative_error(compute(), ref)
    except RuntimeError:  # e.g. an fp16 kernel this CPU build lacks
        return None


def cpu_has(precision: str) -> bool:
    """bf16 / fp16 convolutions in hardware (AVX512-BF16, AVX512-FP16, AMX); elsewhere a slow fallback runs."""
    try:
        if precision == "fp16":
            return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False


def cpu_has_bf16() -> bool:
    return cpu_has("bf16")


def gradient_checks(run: Run, stage: str, config: ModelConfig, *, seed: int) -> None:
    """The trainable fast path (LabelMap gathers, fused SPADE and spectral norm, channels_last)
    against the plain computation on the device, both in fp32 without TF32, each measured
    against the plain computation in float64: loss terms and every gradient of G and D.

    Batch norm over few values (the first blocks see 4x4 maps) amplifies rounding in the
    gradients, so the fast path's error is held against the plain fp32 path's own error,
    not a fixed number: a wrong gradient is far off, a reordered sum is not.
    """
    from train_job.steps import Networks, discriminator_losses, generator_losses, semantics_of

    loss = LossConfig(use_vgg_loss=False)
    base = spade_core.build_model(config, seed=seed).train().to(run.device)  # the training init
    batch = {"label": random_labels(config, run.sizes.check_batch, seed).to(run.device),
             "image": random_images(config, run.sizes.check_batch, seed + 1).to(run.device)}
    results = {}
    for variant in ("float64", "plain", "fast"):
        model = copy.deepcopy(base)
        image = batch["image"]
        if variant == "float64":
            model = model.double()
            image = image.double()
        if variant == "fast":
            set_fast_training(model)
            model.to(memory_format=torch.channels_last)
            image = image.contiguous(memory_format=torch.channels_last)
        nets = Networks(model.generator, model.discriminator)
        sem = semantics_of(batch, config.labels, as_label_map=variant == "fast")
        if variant == "float64":
            sem = sem.double()
        g_terms, fake = generator_losses(nets, sem, image, loss=loss, vgg=None)
        sum(g_terms.values()).backward()
        g_grads = {n: p.grad.detach().clone() for n, p in model.generator.named_parameters() if p.grad is not None}
        model.discriminator.zero_grad(set_to_none=True)
        d_terms = discriminator_losses(nets, sem, image, loss=loss, fake=fake.detach())
        sum(d_terms.values()).backward()
        d_grads = {n: p.grad.detach().clone() for n, p in model.discriminator.named_parameters() if p.grad is not None}
        results[variant] = {"terms": torch.stack([v.detach().double() for v in {**g_terms, **d_terms}.values()]),
                            "generator": g_grads, "discriminator": d_grads}
    exact = results["float64"]
    for what in ("terms", "generator", "discriminator"):
        errors = {}
        for variant in ("plain", "fast"):
            got = results[variant][what]
            if what != "terms":
                if set(got) != set(exact[what]):
                    errors[variant] = float("inf")
                    continue
                got = torch.cat([got[k].double().reshape(-1) for k in sorted(exact[what])])
            ref = exact[what] if what == "terms" else torch.cat([exact[what][k].reshape(-1) for k in sorted(exact[what])])
            errors[variant] = relative_error(got, ref)
        name = "loss terms" if what == "terms" else f"{what} gradients"
        run.check(stage, f"fast-path {name} vs float64 (plain fp32: {errors['plain']:.1e})", errors["fast"],
                  max(GRAD_FACTOR * errors["plain"], GRAD_FLOOR), plain_error=errors["plain"])


# ---------------------------------------------------------------------------------------
# Stage 2: synced batch norm


def sync_case(channels: int, batch: int, device: torch.device, seed: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A conv + batch norm network (affine, so weights get gradients), an input and a loss weighting."""
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.LeakyReLU(0.2))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() == 1 and p is net[1].weight else 0.0))
    x = torch.randn(batch, channels, 12, 12, generator=g) * 2 + 0.5
    target = torch.randn(batch, channels, 12, 12, generator=g)
    return net.to(device), x.to(device), target.to(device)


def _trainer_sync_worker(config: dict[str, Any]) -> None:
    """Inside a TorchTrainer worker: our SyncBatchNorm under DDP in the worker's real process
    group, against plain batch norm; then torch's sync computation forced through the group."""
    import ray.train
    import ray.train.torch

    device = ray.train.torch.get_device()
    backend = torch.distributed.get_backend()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    net, x, target = sync_case(config["channels"], 8, device, seed=5)
    reference = copy.deepcopy(net)
    synced = convert_sync_batchnorm(copy.deepcopy(net))
    ids = [device.index] if device.type == "cuda" else None
    ddp = torch.nn.parallel.DistributedDataParallel(synced, device_ids=ids)
    xs, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out, ref = ddp(xs), reference(xr)
    (out * target).sum().backward()
    (ref * target).sum().backward()
    errors = {
        "output": relative_error(out, ref),
        "input_grad": relative_error(xs.grad, xr.grad),
        "weight_grad": relative_error(torch.cat([p.grad.reshape(-1) for p in synced.parameters()]),
                                      torch.cat([q.grad.reshape(-1) for q in reference.parameters()])),
        "running_stats": max(relative_error(synced[1].running_mean, reference[1].running_mean),
                             relative_error(synced[1].running_var, reference[1].running_var)),
    }
    # World size 1 makes every sync layer take the plain path; push a batch through the
    # synchronising computation anyway, so the group's collective really carries statistics.
    bn = copy.deepcopy(reference[1]).train()
    plain = F.batch_norm(x, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
    group = torch.distributed.group.WORLD
    if device.type == "cuda":
        from torch.nn.modules._functions import SyncBatchNorm as TorchSyncFunction

        forced = TorchSyncFunction.apply(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps, 0.1, group, 1)
    else:
        from spade_core.syncbn import _cpu_sync_batch_norm

        forced = _cpu_sync_batch_norm(convert_sync_batchnorm(bn), x)
    errors["forced_sync_computation"] = relative_error(forced, plain)
    total = torch.ones(1, device=device) * 3
    torch.distributed.all_reduce(total)
    errors["all_reduce"] = abs(float(total) - 3.0)
    metrics = {**errors, "backend": backend, "device": str(device), "layer": type(synced[1]).__name__}
    # Ray Train keeps reported metrics only with a checkpoint: ship them as one
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "metrics.json").write_text(json.dumps(metrics))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _rank_worker(rank: int, world: int, port: int, device: str, channels: int, batch: int, out_dir: str) -> None:
    """One of two ranks on the same device: its half of the batch through SyncBatchNorm + DDP."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        net, x, target = sync_case(channels, batch, dev, seed=7)
        per = batch // world
        x = x[rank * per : (rank + 1) * per].clone().requires_grad_(True)
        target = target[rank * per : (rank + 1) * per]
        synced = convert_sync_batchnorm(net)
        path = "torch's CUDA sync computation" if dev.type == "cuda" else "the all-reduce computation"
        if dev.type == "cuda" and not _gathers_on_device(dev):
            # torch's CUDA computation all-gathers the statistics, which gloo may refuse for
            # CUDA tensors (torch's backend table); the all-reduce path is also ours to check
            from spade_core.syncbn import _cpu_sync_batch_norm

            layer = synced[1]
            layer.forward = lambda t: _cpu_sync_batch_norm(layer, t)  # type: ignore[method-assign]
            path = "the all-reduce computation on CUDA tensors (gloo refused all_gather of CUDA tensors)"
        ddp = torch.nn.parallel.DistributedDataParallel(synced, device_ids=[dev.index] if dev.type == "cuda" else None)
        out = ddp(x)
        (out * target).sum().backward()
        torch.save(
            {"output": out.detach().cpu(), "input_grad": x.grad.cpu(),
             # DDP averages gradients over ranks; the 1-rank reference sums over the whole batch
             "weight_grads": [p.grad.cpu() * world for p in synced.parameters()],
             "running_mean": synced[1].running_mean.cpu(), "running_var": synced[1].running_var.cpu(),
             "layer": f"{type(synced[1]).__name__} through {path}"},
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        torch.distributed.destroy_process_group()


def without_ray(run: Run, stage: str, ray: Any | None, *, part: str = "") -> bool:
    if ray is None:
        run.note(stage, f"{part}skipped: Ray is not importable here (see the offline bundle)")
    return ray is None


def _gathers_on_device(device: torch.device) -> bool:
    """Whether the process group all-gathers tensors on ``device`` (every rank asks; each gets the same answer)."""
    probe = torch.ones(1, device=device)
    try:
        gathered = [torch.zeros_like(probe) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(gathered, probe)
        return True
    except RuntimeError:
        return False


def stage_sync_batchnorm(run: Run, ray: Any | None) -> None:
    stage = "2 sync BN"
    print(f"\n== {stage} ==", flush=True)
    channels = run.sizes.sync_channels
    if not without_ray(run, stage, ray, part="2a "):
        import ray.train
        from ray.train.torch import TorchTrainer

        import gpu_check  # by module name: a function of __main__ would be pickled by value, with torch's modules

        trainer = TorchTrainer(
            gpu_check._trainer_sync_worker,
            train_loop_config={"channels": channels},
            scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=run.cuda, resources_per_worker={"CPU": 1}),
            run_config=ray.train.RunConfig(name="sync_bn", storage_path=str(run.tmp / "ray_results")),
        )
        result = trainer.fit()
        if result.error is not None:
            raise result.error
        with result.checkpoint.as_directory() as reported:
            metrics = json.loads((Path(reported) / "metrics.json").read_text())
        run.note(stage, f"2a TorchTrainer worker: backend {metrics['backend']}, device {metrics['device']}, layer {metrics['layer']}")
        for key in ("output", "input_grad", "weight_grad", "running_stats", "forced_sync_computation", "all_reduce"):
            run.check(stage, f"2a world size 1 {key}", float(metrics[key]), 1e-5, backend=metrics["backend"])

    # 2b: two ranks on the one device
    import socket

    world, batch = 2, 8
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out_dir = run.tmp / "sync2"
    out_dir.mkdir(exist_ok=True)
    torch.multiprocessing.spawn(
        _rank_worker, args=(world, port, str(run.device), channels, batch, str(out_dir)), nprocs=world, join=True
    )
    ranks = [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(world)]
    with tf32(False):
        net, x, target = sync_case(channels, batch, run.device, seed=7)
        x = x.clone().requires_grad_(True)
        out = net(x)
        (out * target).sum().backward()
    run.note(stage, f"2b two ranks on {run.device} over gloo, layer {ranks[0]['layer']}, 2 x {batch // world} vs 1 x {batch}")
    run.check(stage, "2b output", relative_error(torch.cat([r["output"] for r in ranks]), out), 1e-5)
    run.check(stage, "2b input grad", relative_error(torch.cat([r["input_grad"] for r in ranks]), x.grad), 1e-5)
    # one vector per rank: the conv bias before batch norm has a zero gradient in exact arithmetic, rounding noise here
    reference = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
    weight_error = max(relative_error(torch.cat([g.reshape(-1) for g in r["weight_grads"]]), reference) for r in ranks)
    run.check(stage, "2b weight grads", weight_error, 1e-5)
    stats_error = max(max(relative_error(r["running_mean"], net[1].running_mean), relative_error(r["running_var"], net[1].running_var))
                      for r in ranks)
    run.check(stage, "2b running stats", stats_error, 1e-5)


# ---------------------------------------------------------------------------------------
# Stage 3: training through spade-train


def iteration_flops(run: Run, config: ModelConfig, vgg_file: Path) -> float:
    """FLOPs per image of one plain fp32 G+D iteration (G step with VGG + D step), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode
    from train import Trainer, sample_batch  # bench/train.py: the same iteration it times

    from spade_core.losses import VGGLoss, load_vgg19

    batch = 2
    base = spade_core.build_model(config, seed=0).to(run.device)
    vgg = VGGLoss(load_vgg19(vgg_file, device=run.device))
    trainer = Trainer.build(base, vgg, LossConfig(vgg_weights=str(vgg_file)), fast=False, bf16=False)
    data = {k: v.to(run.device) for k, v in sample_batch(config, batch).items()}
    with FlopCounterMode(display=False) as counter:
        trainer.step(data)
    return counter.get_total_flops() / batch


def write_shards(run: Run) -> Path:
    """The synthetic scenes' training split as shards (written once; stage 8 scores them too)."""
    from train_job.prepare import main as prepare_main
    from train_job.synthetic import write_dataset

    shards = run.tmp / "shards"
    if (shards / "manifest.json").is_file():
        return shards
    t0 = time.perf_counter()
    root = run.tmp / "synthetic"
    write_dataset(root, run.sizes.scenes, run.sizes.scene_size, workers=os.cpu_count() or 1)
    code = prepare_main(["--dataset", "ade20k", "--root", str(root / "ADEChallengeData2016"), "--split", "train",
                         "--out", str(shards), "--workers", str(min(8, os.cpu_count() or 1)), "--no-progress"])
    if code != 0:
        raise RuntimeError(f"train_job.prepare exited with {code}")
    run.note("3 training", f"{run.sizes.scenes} synthetic {run.sizes.scene_size}^2 scenes -> shards in {time.perf_counter() - t0:.0f} s")
    return shards


def train_once(run: Run, shards: Path, vgg_file: Path, *, batch: int, precision: str, optimised: bool, steps: int) -> dict[str, Any]:
    """One spade-train run (its own main(), in the running Ray); its metrics.jsonl summarised."""
    from train_job.__main__ import main as spade_train

    name = f"b{batch}_{precision}_{'opt' if optimised else 'plain'}"
    overrides = {
        "data.shards": shards, "data.batch_size": batch, "storage.path": run.tmp / "runs", "storage.name": name,
        "scaling.num_workers": 1, "scaling.use_gpu": str(run.cuda).lower(), "scaling.resources_per_worker": "null",
        "scaling.max_failures": 0, "optim.precision": precision, "optim.fast_path": str(optimised).lower(),
        "optim.channels_last": str(optimised).lower(), "optim.max_steps": steps, "logging.every_steps": 1,
        "logging.sample_grid_every_steps": 0, "logging.metrics_port": "null", "checkpoint.every_steps": 0,
        "loss.use_vgg_loss": "true", "loss.vgg_weights": vgg_file,
    }
    argv = ["--config", str(PRESETS / run.sizes.preset)]
    for key, value in overrides.items():
        argv += ["--set", f"{key}={value}"]
    t0 = time.perf_counter()
    code = spade_train(argv)
    wall = time.perf_counter() - t0
    if code != 0:
        raise RuntimeError(f"spade-train {name} exited with {code}")
    records = [json.loads(line) for line in (run.tmp / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    measured = records[run.sizes.warmup_steps :] or records
    busy = sum(r["step_s"] for r in measured)
    waited = sum(r["data_wait_s"] for r in measured)
    return {
        "run": name, "batch": batch, "precision": precision, "path": "optimised" if optimised else "plain",
        "steps_measured": len(measured), "images_per_s": batch * len(measured) / (busy + waited),
        "step_ms": 1e3 * statistics.median(r["step_s"] for r in measured), "data_wait_share": waited / (busy + waited),
        "peak_memory_gb": max((r.get("gpu_memory_gb", 0.0) for r in records), default=0.0), "wall_s": wall,
        "loss_terms_finite": all(math.isfinite(v) for r in records for k, v in r.items() if k.startswith(("G_", "D_"))),
    }


def stage_training(run: Run, ray: Any | None) -> None:
    stage = "3 training"
    print(f"\n== {stage} ==", flush=True)
    if without_ray(run, stage, ray):
        return
    from spade_core.losses import VGG19Features

    vgg_file = run.tmp / "vgg19-random.pth"
    torch.manual_seed(0)
    torch.save(VGG19Features().state_dict(), vgg_file)  # torchvision's layout, random weights
    config = preset_model(run)
    flops = iteration_flops(run, config, vgg_file)
    run.results["training_flops_per_image"] = flops
    run.note(stage, f"one plain G+D iteration with VGG: {flops / 1e9:.0f} GFLOP per image (torch's FLOP counter)")
    shards = write_shards(run)
    fast = low_precision(run)
    plans = [(b, fast, True, run.sizes.train_steps) for b in run.sizes.train_batches]
    if run.sizes.plain_steps:
        plans.insert(1 if len(plans) > 1 else 0, (run.sizes.plain_batch, "fp32", False, run.sizes.plain_steps))
    else:  # the smoke run: the same command with the fast path off adds a minute, not coverage
        run.note(stage, "plain fp32 run not made (plain_steps 0)")
    for batch, precision, optimised, steps in plans:
        if run.left() < 45 and run.stage(stage)["rows"]:
            run.note(stage, f"b{batch} {precision} skipped: {run.left():.0f} s of the budget left")
            continue
        row = train_once(run, shards, vgg_file, batch=batch, precision=precision, optimised=optimised, steps=steps)
        row["tflops"] = flops * row["images_per_s"] / 1e12
        run.row(stage, **row)
        print(f"  {row['run']}: {row['images_per_s']:.1f} img/s, step {row['step_ms']:.0f} ms, data wait "
              f"{100 * row['data_wait_share']:.1f}%, peak {row['peak_memory_gb']:.1f} GB, {row['tflops']:.1f} TFLOP/s", flush=True)
        if not row["loss_terms_finite"]:
            run.check(stage, f"{row['run']} loss terms finite", float("inf"), 0.0)
    rows = {(r["batch"], r["path"]): r for r in run.stage(stage)["rows"]}
    plain, opt = rows.get((run.sizes.plain_batch, "plain")), rows.get((run.sizes.plain_batch, "optimised"))
    if plain and opt:
        run.goal(f"training bf16 opt / plain fp32 at batch {run.sizes.plain_batch}", opt["images_per_s"] / plain["images_per_s"], 3.0)
    best = max((r for r in rows.values() if r["path"] == "optimised"), key=lambda r: r["images_per_s"], default=None)
    if best:
        run.goal(f"training data wait under 5% (b{best['batch']}: share free of wait)", 1 - best["data_wait_share"], 0.95, "share")


# ---------------------------------------------------------------------------------------
# Stage 4: inference


def low_precision(run: Run) -> str:
    """bf16, except in a CPU smoke run on a CPU without bf16 hardware (its slow fallback would take minutes)."""
    if run.cuda or cpu_has_bf16():
        return "bf16"
    text = "this CPU has no bf16 hardware: the smoke run trains, serves and finds the matmul peak in fp32 where a GPU uses bf16"
    if text not in run.stage("smoke")["notes"]:
        run.note("smoke", text)
    return "fp32"


def matmul_peak(run: Run) -> float:
    """bf16 matmul FLOP/s on random operands (never zeros), median of timed products."""
    n, dtype = run.sizes.peak_size, DTYPES[low_precision(run)]
    g = torch.Generator(device=run.device).manual_seed(0)
    a = torch.randn(n, n, device=run.device, generator=g).to(dtype)
    b = torch.randn(n, n, device=run.device, generator=g).to(dtype)
    ms = time_ms(run, lambda i: a @ b, min_ms=200.0, reps=2 * run.sizes.reps)
    return 2 * n**3 / (ms / 1e3)


def generator_flops(model: spade_core.SpadeModel) -> float:
    """FLOPs per image of the plain generator (dense one-hot convs), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    labels = random_labels(model.config, 1, 0).to(model.device)
    seg = one_hot(label_channels(labels, model.config.labels), model.config.labels.num_label_channels)
    with FlopCounterMode(display=False) as counter, torch.no_grad():  # its module tracker breaks under inference_mode
        model.generator(seg)
    return float(counter.get_total_flops())


def captured(fast: FastGenerator, channels: torch.Tensor) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    """The eager fast generator captured as one CUDA graph for this input shape: (replay(new_channels), output)."""
    static = channels.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.inference_mode():
        for _ in range(2):
            fast._run(static, None, None)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        out = fast._run(static, None, None)

    def replay(new: torch.Tensor) -> torch.Tensor:
        static.copy_(new)
        graph.replay()
        return out

    return replay, out


def stage_inference(run: Run) -> None:
    stage = "4 inference"
    config = preset_model(run)
    if config.generator.z_dim is not None:
        raise ValueError("the inference stage times the label-map generator (preset without VAE)")
    model = trained_like(config, discriminator=False).to(run.device)
    flops = generator_flops(model)
    peak = matmul_peak(run)
    run.results["generator_flops_per_image"] = flops
    run.results["bf16_matmul_peak_tflops"] = peak / 1e12
    print(f"\n== {stage}: {flops / 1e9:.1f} GFLOP per image; bf16 matmul peak {peak / 1e12:.0f} TFLOP/s ==", flush=True)
    labels = config.labels

    def inputs(batch: int) -> list[torch.Tensor]:
        return [label_channels(random_labels(config, batch, 100 * batch + k), labels).to(run.device) for k in range(3)]

    def record(variant: str, precision: str, batch: int, ms: float, **extra: Any) -> None:
        rate = batch / (ms / 1e3)
        run.row(stage, variant=variant, precision=precision, batch=batch, ms=ms, images_per_s=rate,
                share_of_peak=flops * rate / peak, **extra)
        print(f"  {variant:16s} {precision} b{batch:<3d} {ms:8.2f} ms  {rate:8.1f} img/s  {100 * flops * rate / peak:5.1f}% of peak",
              flush=True)

    with torch.inference_mode():
        for batch in run.sizes.infer_batches:  # the reference's computation, TF32 as torch's defaults leave it
            sets = inputs(batch)
            segs = [one_hot(c, labels.num_label_channels) for c in sets]
            record("plain eager", "fp32", batch, time_ms(run, lambda i: model.generator(segs[i % 3])))
    for precision, dtype in DTYPES.items():
        fast = FastGenerator(model.generator, label_config=labels, dtype=dtype)
        for batch in run.sizes.infer_batches:
            sets = inputs(batch)
            record("fast eager", precision, batch, time_ms(run, lambda i: fast(sets[i % 3])))
            if run.cuda and batch in run.sizes.graph_batches and precision != "fp32":
                try:
                    replay, _ = captured(fast, sets[0])
                    error = relative_error(replay(sets[1]).clone(), fast(sets[1]))
                    record("fast CUDA graph", precision, batch, time_ms(run, lambda i: replay(sets[i % 3])), vs_eager=error)
                except Exception as exc:  # a host sync inside the forward makes capture fail: report it
                    run.note(stage, f"CUDA graph capture failed ({precision} b{batch}): {type(exc).__name__}: {exc}")
        del fast
    if not run.cuda:
        run.note(stage, "CUDA graphs and torch.compile variants: GPU only (not run in the CPU smoke)")
    rows = run.stage(stage)["rows"]
    plain1 = next((r for r in rows if r["variant"] == "plain eager" and r["batch"] == 1), None)
    fast1 = max((r for r in rows if r["variant"] != "plain eager" and r["batch"] == 1 and r["precision"] == "bf16"),
                key=lambda r: r["images_per_s"], default=None)
    if plain1 and fast1:
        run.goal("fast bf16 / plain fp32 at batch 1", fast1["images_per_s"] / plain1["images_per_s"], 5.0)


def stage_compiled(run: Run) -> None:
    """torch.compile of the fast generator (what serving's ``compile: true`` runs), and compiled
    with CUDA graphs; each compiles for its batch size, so only what fits in the budget runs."""
    stage = "4 inference"
    if not run.sizes.compile_variants:
        return
    config = preset_model(run)
    model = trained_like(config, discriminator=False).to(run.device)
    flops, peak = run.results["generator_flops_per_image"], run.results["bf16_matmul_peak_tflops"] * 1e12
    print(f"\n== {stage}, compiled ==", flush=True)
    variants = [(p, b, False) for p, b in run.sizes.compile_variants] + [("bf16", 1, True)]
    for precision, batch, graphs in variants:
        if run.left() < 75:
            run.note(stage, f"compiled {precision} b{batch}{' + CUDA graphs' if graphs else ''} skipped: {run.left():.0f} s left")
            continue
        sets = [label_channels(random_labels(config, batch, 7 * batch + k), config.labels).to(run.device) for k in range(3)]
        eager = FastGenerator(model.generator, label_config=config.labels, dtype=DTYPES[precision])
        t0 = time.perf_counter()
        if graphs:
            compiled = FastGenerator(model.generator, label_config=config.labels, dtype=DTYPES[precision])
            compiled._forward = torch.compile(compiled._run, dynamic=False, options={"freezing": True, "triton.cudagraphs": True})
        else:
            compiled = FastGenerator(model.generator, label_config=config.labels, dtype=DTYPES[precision], compile=True)
        error = relative_error(compiled(sets[0]).clone(), eager(sets[0]))
        compile_s = time.perf_counter() - t0
        ms = time_ms(run, lambda i: compiled(sets[i % 3]))
        rate = batch / (ms / 1e3)
        variant = "compiled+graphs" if graphs else "compiled"
        run.row(stage, variant=variant, precision=precision, batch=batch, ms=ms, images_per_s=rate,
                share_of_peak=flops * rate / peak, compile_s=compile_s, vs_eager=error)
        print(f"  {variant:16s} {precision} b{batch:<3d} {ms:8.2f} ms  {rate:8.1f} img/s  {100 * flops * rate / peak:5.1f}% of peak"
              f"  (compiled in {compile_s:.0f} s, vs eager {error:.1e})", flush=True)
        del compiled, eager


def inference_goals(run: Run) -> None:
    rows = run.stage("4 inference")["rows"]
    batch = 32 if 32 in run.sizes.infer_batches else max(run.sizes.infer_batches)
    best = max((r for r in rows if r["precision"] == "bf16" and r["batch"] == batch and r["variant"] != "plain eager"),
               key=lambda r: r["images_per_s"], default=None)
    if best:
        run.goal(f"inference bf16 b{batch} share of bf16 matmul peak ({best['variant']})", best["share_of_peak"], 0.30, "share")


# ---------------------------------------------------------------------------------------
# Stage 5: serving


def stage_serving(run: Run, ray: Any | None) -> None:
    stage = "5 serving"
    print(f"\n== {stage} ==", flush=True)
    if without_ray(run, stage, ray):
        return
    from serve import closed_loop, percentile, raw_throughput, served_app  # bench/serve.py

    config = preset_model(run)
    batch = run.sizes.serve_batch
    model = spade_core.build_model(config, discriminator=False, seed=0).eval().to(run.device)
    precision = low_precision(run)
    model.enable_fast_path(dtype=DTYPES[precision])
    raw = raw_throughput(model, batch, run.sizes.serve_seconds)
    del model
    run.note(stage, f"raw batched model ({precision} fast path, batch {batch}, uint8 on the host): {raw:.1f} img/s")
    cpus = os.cpu_count() or 1
    generator = {"num_gpus": 1, "num_cpus": 2} if run.cuda else {"num_cpus": 1}
    ingress_replicas = max(1, min(4, cpus // 4))
    with served_app(config, precision=precision, batch=batch, generator=generator, ingress_replicas=ingress_replicas) as url:
        closed_loop(url, 1, min(3.0, run.sizes.serve_seconds))  # warm-up
        for clients in run.sizes.serve_clients:
            rate, latencies, batches = closed_loop(url, clients, run.sizes.serve_seconds)
            row = {"clients": clients, "images_per_s": rate, "served_over_raw": rate / raw, "p50_ms": 1e3 * percentile(latencies, 50),
                   "p99_ms": 1e3 * percentile(latencies, 99), "mean_batch": statistics.fmean(batches) if batches else 0.0,
                   "requests": len(latencies), "ingress_replicas": ingress_replicas}
            run.row(stage, **row)
            print(f"  {clients:3d} clients: {rate:7.1f} img/s ({row['served_over_raw']:.2f} of raw), p50 {row['p50_ms']:.0f} ms, "
                  f"p99 {row['p99_ms']:.0f} ms, mean batch {row['mean_batch']:.1f}", flush=True)
            if not latencies:
                run.check(stage, f"{clients} clients answered", float("inf"), 0.0)
    last = run.stage(stage)["rows"][-1] if run.stage(stage)["rows"] else None
    if last:
        run.goal(f"serving / raw at {last['clients']} clients", last["served_over_raw"], 0.90)


# ---------------------------------------------------------------------------------------
# Stage 6: VAE


def stage_vae(run: Run) -> None:
    stage = "6 VAE"
    config = vae_model(run)
    batch = run.sizes.vae_batch
    print(f"\n== {stage}: batch {batch} ==", flush=True)
    cpu = trained_like(config, discriminator=False)
    dev = copy.deepcopy(cpu).to(run.device)
    style = random_images(config, batch, 31)
    labels = random_labels(config, batch, 32)
    with tf32(False):
        mu_ref, logvar_ref = cpu.encode(style)
        mu, logvar = dev.encode(style.to(run.device))
        run.check(stage, "encode fp32 vs CPU", max(relative_error(mu, mu_ref), relative_error(logvar, logvar_ref)), 1e-5)
        ref = cpu.synthesize(labels, style=style)
        run.check(stage, "style-guided synthesis fp32 vs CPU", relative_error(dev.synthesize(labels, style=style), ref), 1e-5)
        dev.enable_fast_path(dtype=torch.bfloat16)

        def cpu_fast() -> torch.Tensor:
            twin = copy.deepcopy(cpu)
            twin.enable_fast_path(dtype=torch.bfloat16)
            return twin.synthesize(labels, style=style)

        run.check(stage, "style-guided synthesis fast bf16 vs CPU", relative_error(dev.synthesize(labels, style=style), ref),
                  TOLERANCE["bf16"], floor=lambda: cpu_floor(run, "bf16", cpu_fast, ref))
    style_dev, labels_dev = style.to(run.device), labels.to(run.device)
    for name, fn in (("encode fp32", lambda i: dev.encode(style_dev)),
                     ("style-guided synthesis (encode + fast bf16)", lambda i: dev.synthesize(labels_dev, style=style_dev))):
        ms = time_ms(run, fn)
        run.row(stage, what=name, batch=batch, ms=ms, images_per_s=batch / (ms / 1e3))
        print(f"  {name}: {ms:.1f} ms, {batch / (ms / 1e3):.1f} img/s", flush=True)


# ---------------------------------------------------------------------------------------
# Stage 8: evaluation


def stage_evaluation(run: Run, ray: Any | None) -> None:
    stage = "8 evaluation"
    print(f"\n== {stage} ==", flush=True)
    from eval import inception_throughput  # bench/eval.py

    from spade_core.metrics import activations, load_fid_inception
    from spade_core.testing import random_inception_state

    weights = run.tmp / "inception-random.pth"
    torch.save(random_inception_state(0), weights)  # same cost as pytorch-fid's file; values not comparable
    images = torch.randint(0, 256, (run.sizes.eval_batch, 3, 256, 256), generator=torch.Generator().manual_seed(81), dtype=torch.uint8)
    cpu_model = load_fid_inception(weights, allow_any_inception=True)
    dev_model = load_fid_inception(weights, device=run.device, allow_any_inception=True)
    ref = torch.from_numpy(activations([images[:4]], cpu_model, dims=2048, batch_size=4))
    precisions = ["fp32", "bf16"] if low_precision(run) == "bf16" else ["fp32"]
    for precision in precisions:
        with tf32(False):
            feats = activations([images[:4]], dev_model, dims=2048, batch_size=4, device=run.device, precision=precision)  # type: ignore[arg-type]
        # bf16 over Inception's ~100 layers with random weights drifts past the fixed tolerance
        # (0.11 on an AVX512-BF16 CPU): held against the CPU's own bf16 error, like the generator's.
        run.check(stage, f"Inception pool features {precision} vs CPU fp32", relative_error(torch.from_numpy(feats), ref),
                  TOLERANCE[precision], floor=lambda: cpu_floor(run, precision, lambda: torch.from_numpy(
                      activations([images[:4]], cpu_model, dims=2048, batch_size=4, precision=precision)), ref))  # type: ignore[arg-type]
        rate = inception_throughput(weights, False, device=run.device, precision=precision, batch=run.sizes.eval_batch,
                                    seconds=run.sizes.eval_seconds)
        run.row(stage, what=f"Inception features {precision}", batch=run.sizes.eval_batch, images_per_s=rate["images_per_s"])
        print(f"  Inception {precision}, batch {run.sizes.eval_batch}: {rate['images_per_s']:.0f} img/s", flush=True)
    del cpu_model, dev_model
    if without_ray(run, stage, ray, part="spade-eval run: "):
        return
    from train_job.eval_inputs import EvalOptions, prepare_evaluation
    from train_job.evaluate import run_evaluation

    shards = write_shards(run)
    checkpoint = spade_core.save_checkpoint(trained_like(preset_model(run), discriminator=False), run.tmp / "eval_checkpoint")
    n = min(run.sizes.eval_images, run.sizes.scenes)
    plan = prepare_evaluation(EvalOptions(
        checkpoint=str(checkpoint), data=str(shards), out=str(run.tmp / "eval"), split="train", inception=str(weights),
        allow_any_inception=True, oracle=True, num_images=n, precision="bf16" if run.cuda else "fp32",
        device="cuda" if run.cuda else "cpu", batch_size=32 if run.cuda else 2,
    ))
    t0 = time.perf_counter()
    result = run_evaluation(plan, progress=False)
    wall = time.perf_counter() - t0
    values = result.metrics["generated"]
    scores = [values.get("fid"), values.get("kid", {}).get("mean"), values.get("miou")]
    finite = all(isinstance(v, float) and math.isfinite(v) for v in scores)
    run.check(stage, "spade-eval run: FID, KID and mIoU computed", 0.0 if finite else math.inf, 0.0)
    run.row(stage, what="spade-eval run", images=n, wall_s=wall, pipeline_s=result.pipeline_s, metrics_s=result.metrics_s,
            images_per_s=n / result.pipeline_s, actors=result.ray.get("actors"), device=result.ray.get("device"))
    print(f"  spade-eval run, {n} images: {wall:.1f} s ({n / result.pipeline_s:.0f} img/s in the pipeline, metrics "
          f"{result.metrics_s:.1f} s) on {result.ray}", flush=True)


# ---------------------------------------------------------------------------------------
# Profiles: where the time goes, for the goals that were missed


def kernel_table(prof: Any, *, device: bool, rows: int = 12) -> list[dict[str, Any]]:
    """The ``rows`` operators / kernels with the most self time (device time on a GPU)."""
    events = [e for e in prof.key_averages() if e.key]
    key = (lambda e: e.self_device_time_total) if device else (lambda e: e.self_cpu_time_total)
    total = sum(key(e) for e in events) or 1.0
    top = sorted(events, key=key, reverse=True)[:rows]
    return [{"name": e.key[:90], "self_ms": key(e) / 1e3, "share": key(e) / total, "calls": e.count} for e in top]


def stage_profiles(run: Run) -> None:
    """torch.profiler tables of one inference batch and one training iteration (bf16, fast path)
    when their goals were missed, so that the next change starts from the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    stage = "7 profiles"
    missed = {g["goal"].split(" ")[0] for g in run.goals if not g["met"]}
    if run.smoke:
        missed |= {"inference", "training"}  # the smoke run exercises both tables
    if not missed & {"inference", "fast", "training"}:
        run.note(stage, "every inference and training goal met: no profiles taken")
        return
    if run.left() < 30:
        run.note(stage, f"skipped: {run.left():.0f} s of the budget left")
        return
    print(f"\n== {stage} ==", flush=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if run.cuda else [])
    config = preset_model(run)
    precision = low_precision(run)
    if missed & {"inference", "fast"}:
        model = trained_like(config, discriminator=False).to(run.device)
        fast = FastGenerator(model.generator, label_config=config.labels, dtype=DTYPES[precision])
        batch = 32 if run.cuda else 2
        channels = label_channels(random_labels(config, batch, 77), config.labels).to(run.device)
        fast(channels)
        synchronize(run.device)
        with profile(activities=activities) as prof:
            for _ in range(3):
                fast(channels)
            synchronize(run.device)
        table = kernel_table(prof, device=run.cuda)
        run.stage(stage)[f"inference {precision} b{batch}"] = table
        print_kernels(f"inference, fast {precision}, batch {batch} (3 calls)", table)
        del model, fast
    if "training" in missed:
        from train import Trainer, sample_batch  # bench/train.py: the step it times

        from spade_core.losses import VGG19Features, VGGLoss

        batch = 16 if run.cuda else 2
        base = spade_core.build_model(config, seed=0).to(run.device)
        trainer = Trainer.build(base, VGGLoss(VGG19Features().to(run.device)), LossConfig(vgg_weights="random"),
                                fast=True, bf16=precision == "bf16")
        data = {k: v.to(run.device) for k, v in sample_batch(config, batch).items()}
        trainer.step(data)
        synchronize(run.device)
        with profile(activities=activities) as prof:
            trainer.step(data)
            synchronize(run.device)
        table = kernel_table(prof, device=run.cuda)
        run.stage(stage)[f"training {precision} b{batch}"] = table
        print_kernels(f"training iteration, fast {precision} + VGG, batch {batch}", table)


def print_kernels(title: str, table: list[dict[str, Any]]) -> None:
    print(f"  {title}: top {len(table)} by self time")
    for row in table:
        print(f"    {100 * row['share']:5.1f}%  {row['self_ms']:9.2f} ms  {row['calls']:6d}x  {row['name']}", flush=True)


# ---------------------------------------------------------------------------------------
# Driver


def machine(run: Run) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "python": sys.version.split()[0], "cpus": os.cpu_count(),
                            "device": str(run.device), "smoke": run.smoke}
    if run.cuda:
        props = torch.cuda.get_device_properties(run.device)
        info.update(gpu=props.name, gpu_memory_gb=props.total_memory / 2**30, multiprocessors=props.multi_processor_count,
                    capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    tf32_defaults={"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32})
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        info["ray"] = None
    return info


def start_ray(run: Run) -> Any | None:
    try:
        import ray
    except ImportError as exc:
        print(f"Ray is not importable ({exc}): stages 2a, 3 and 5 are skipped", flush=True)
        return None
    # Ray's workers import this file's functions by module name (and the project, on an image
    # where it is not installed): they inherit PYTHONPATH from the driver
    paths = [str(REPO), str(REPO / "bench"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    # the smoke run declares spare logical CPUs: Ray Data's read tasks need one beside the train worker
    cpus = max(4, os.cpu_count() or 1) if run.smoke else None
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    return ray


def print_table(run: Run) -> None:
    print("\n" + "=" * 100)
    m = run.results["machine"]
    print(f"gpu_check on {m.get('gpu', 'CPU (smoke)')} | torch {m['torch']} | ray {m['ray']} | {run.results['wall_s']:.0f} s")
    for name, stage in run.results.get("stages", {}).items():
        checks = stage["checks"]
        worst = max((c["error"] / c["tolerance"] if c["tolerance"] else (0.0 if c["ok"] else math.inf) for c in checks), default=0.0)
        status = stage.get("status", "ok")
        print(f"{name:14s} {status:8s} checks {sum(c['ok'] for c in checks)}/{len(checks)} ok (worst {worst:.2f} of its tolerance)")
        for r in stage["rows"]:
            if "variant" in r:
                if r["batch"] in (1, 32) or run.smoke:
                    print(f"    {r['variant']:16s} {r['precision']} b{r['batch']:<3d} {r['images_per_s']:9.1f} img/s "
                          f"{100 * r['share_of_peak']:5.1f}% peak")
            elif "run" in r:
                print(f"    {r['run']:18s} {r['images_per_s']:7.1f} img/s  step {r['step_ms']:6.0f} ms  wait "
                      f"{100 * r['data_wait_share']:4.1f}%  {r['peak_memory_gb']:5.1f} GB  {r['tflops']:6.1f} TFLOP/s")
            elif "clients" in r:
                print(f"    {r['clients']:3d} clients {r['images_per_s']:8.1f} img/s  {r['served_over_raw']:.2f} of raw  "
                      f"p50 {r['p50_ms']:.0f} ms  p99 {r['p99_ms']:.0f} ms")
            elif "what" in r:
                print(f"    {r['what']:44s} {r['images_per_s']:8.1f} img/s")
    for g in run.goals:
        value = "n/a" if g["value"] is None else f"{g['value']:.2f}"
        print(f"goal {'met ' if g['met'] else 'MISS'} {g['goal']}: {value} (target {g['target']:g})")
    print(f"correctness: {'FAILED: ' + '; '.join(run.failures) if run.failures else 'all checks passed'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="every stage at toy sizes on the CPU")
    parser.add_argument("--stages", default="1,2,3,4,5,6,8", help="comma-separated stage numbers (default: all)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="optional measurements stop when this runs out")
    parser.add_argument("--out", help="JSON file (default: $OUT/gpu_check.json, else out/gpu_check.json)")
    args = parser.parse_args(argv)
    stages = {s.strip() for s in args.stages.split(",") if s.strip()}
    if not stages <= set("1234568"):
        parser.error(f"--stages takes numbers 1..6 and 8, got {args.stages!r}")
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("error: no CUDA device is visible; run with --cpu-smoke for the CPU rehearsal", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else REPO / "out" / "gpu_check.json"
    started = time.monotonic()
    device = torch.device("cpu") if args.cpu_smoke else torch.device("cuda", torch.cuda.current_device())
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        budget = math.inf if args.cpu_smoke else args.budget_s  # the smoke run exists to run everything
        run = Run(sizes=SMOKE if args.cpu_smoke else GPU, device=device, smoke=args.cpu_smoke,
                  deadline=started + budget, tmp=Path(tmp))
        run.results["machine"] = machine(run)
        print(f"gpu_check: {run.results['machine']}", flush=True)
        ray = start_ray(run) if stages & {"2", "3", "5", "8"} else None
        plan: list[tuple[str, str, Callable[[], None]]] = [
            ("1", "1 correctness", lambda: stage_correctness(run)),
            ("2", "2 sync BN", lambda: stage_sync_batchnorm(run, ray)),
            ("3", "3 training", lambda: stage_training(run, ray)),
            ("4", "4 inference", lambda: stage_inference(run)),
            ("5", "5 serving", lambda: stage_serving(run, ray)),
            ("6", "6 VAE", lambda: stage_vae(run)),
            ("8", "8 evaluation", lambda: stage_evaluation(run, ray)),
            ("4", "4 inference", lambda: stage_compiled(run)),  # last: it spends what the budget has left
        ]
        for number, name, fn in plan:
            if number not in stages:
                continue
            t0 = run.clock = time.perf_counter()
            try:
                fn()
            except Exception as exc:  # a crashed stage is a failure, and the next stage still runs
                run.stage(name)["status"] = "crashed"
                run.stage(name)["error"] = traceback.format_exc()
                run.failures.append(f"{name} crashed: {type(exc).__name__}: {exc}")
                traceback.print_exc()
            run.stage(name)["seconds"] = run.stage(name).get("seconds", 0.0) + time.perf_counter() - t0
            if run.cuda:
                torch.cuda.empty_cache()
        if "4" in stages:
            inference_goals(run)
        if stages & {"3", "4"}:
            t0 = run.clock = time.perf_counter()
            try:
                stage_profiles(run)
            except Exception as exc:  # a profile that fails is reported, not a correctness failure
                run.note("7 profiles", f"profiling failed: {type(exc).__name__}: {exc}")
            run.stage("7 profiles")["seconds"] = time.perf_counter() - t0
        if ray is not None:
            ray.shutdown()
        run.results["wall_s"] = time.monotonic() - started
        run.results["goals"] = run.goals
        run.results["failures"] = run.failures
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(run.results, indent=2, default=str) + "\n")
        print_table(run)
        print(f"results: {out}")
    return 1 if run.failures else 0


if __name__ == "__main__":
    sys.exit(main())
