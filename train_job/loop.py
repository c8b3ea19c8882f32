"""``train_loop_per_worker``: what every Ray Train worker runs.

Build the networks -> synced batch norm (more than one worker) -> DDP -> resume from the
latest checkpoint if there is one -> epochs of the reference's G step + D step, with the
LR schedule, AMP, EMA, checkpoints, metrics and sample grids; with ``eval.every_steps``,
rank 0 evaluates the generator on a fixed validation subset (``train_job.validation``) and
keeps the best model (``checkpoint.best_by``, ``train_job.checkpointing.BestCheckpoint``).
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import spade_core
from spade_core import seeds
from spade_core.locations import is_remote, local_path
from spade_core.losses import build_vgg_loss
from spade_core.precision import autocast_dtype
from spade_core.norms import convert_sync_batchnorm, set_fast_training

from .checkpointing import BestCheckpoint, TrainState, read_training_checkpoint, unrecorded_checkpoint, write_training_checkpoint
from .config import TrainConfig
from .metrics import MetricsLog, Throughput, sample_grid, save_grid, start_prometheus
from .pipeline import iter_training_batches
from .steps import Networks, discriminator_losses, generator_losses, semantics_of



class EMA:
    """Exponential moving average of a network's parameters; buffers follow the network."""

    def __init__(self, net: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = copy.deepcopy(net).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        for s, p in zip(self.shadow.parameters(), net.parameters()):
            s.lerp_(p.detach(), 1.0 - self.decay)
        for s, b in zip(self.shadow.buffers(), net.buffers()):
            s.copy_(b)


def steps_per_epoch(count: int, *, workers: int, worker_batch: int) -> int:
    """Whole batches each worker gets: Ray Train splits rows equally (the remainder is dropped)."""
    return (count // workers) // worker_batch


def build_training_model(cfg: TrainConfig, *, device: torch.device, sync_batchnorm: bool) -> spade_core.SpadeModel:
    """The networks as a worker trains them: synced batch norm (call it inside the process
    group), the fast path and the memory format the config asks for."""
    model = spade_core.build_model(cfg.model, seed=cfg.data.seed).to(device).train()
    if sync_batchnorm:
        for name in ("generator", "encoder", "discriminator"):
            if getattr(model, name) is not None:
                setattr(model, name, convert_sync_batchnorm(getattr(model, name)))
    if cfg.optim.fast_path:
        set_fast_training(model)
    if cfg.optim.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.from_dict(loop_config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    distributed = world > 1 and torch.distributed.is_initialized()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed crop sizes: autotuned conv algorithms pay after the first step

    model = build_training_model(cfg, device=device, sync_batchnorm=distributed and cfg.scaling.sync_batchnorm)
    ema = EMA(model.generator, cfg.optim.ema_decay) if cfg.optim.ema_decay is not None else None

    g_params = list(model.generator.parameters()) + (list(model.encoder.parameters()) if model.encoder else [])
    optimizers = {
        "generator": torch.optim.Adam(g_params, lr=cfg.optim.lr_g, betas=cfg.optim.betas),
        "discriminator": torch.optim.Adam(model.discriminator.parameters(), lr=cfg.optim.lr_d, betas=cfg.optim.betas),
    }
    scaler = torch.amp.GradScaler(device.type) if cfg.optim.uses_grad_scaler else None

    state = TrainState()
    checkpoint = ray.train.get_checkpoint()
    unrecorded = _unrecorded(cfg, checkpoint, rank=rank, distributed=distributed)
    if unrecorded is not None:
        state = _resume(unrecorded, model, ema, optimizers, scaler, rank)
    elif checkpoint is not None:
        # as_directory, not to_directory: every rank reads at once, and to_directory makes
        # them copy into the same temporary folder while others read from it.
        with checkpoint.as_directory() as resume_dir:
            state = _resume(Path(resume_dir), model, ema, optimizers, scaler, rank)
    elif cfg.storage.resume_from:
        state = _resume(Path(cfg.storage.resume_from), model, ema, optimizers, scaler, rank)

    nets = Networks(
        generator=_ddp(model.generator, device, distributed),
        discriminator=_ddp(model.discriminator, device, distributed),
        encoder=_ddp(model.encoder, device, distributed) if model.encoder is not None else None,
    )
    vgg = build_vgg_loss(cfg.loss, device=device)
    if vgg is not None and cfg.optim.channels_last:
        vgg.to(memory_format=torch.channels_last)
    run_dir = _run_dir(cfg)
    log = None
    evaluator, best = None, None
    if rank == 0:
        prometheus = cfg.logging.metrics_port is not None and start_prometheus(cfg.logging.metrics_port, cfg.logging.metrics_host)
        log = MetricsLog(run_dir, prometheus=prometheus, tensorboard=cfg.logging.tensorboard, resume_step=state.step)
        if cfg.eval.enabled:
            # Rank 0 alone evaluates, between two steps; the other ranks go on to the next
            # collective (DDP's gradient all-reduce, synced batch norm, ray.train.report) and
            # wait there, so the evaluation's time shows as their step time. Acceptable
            # because the subset is small and fixed (eval.num_images, one forward pass per
            # image and network) and comes every eval.every_steps steps; its cost is logged
            # (eval_s) and must stay well under the process group's timeout (Ray Train's
            # TorchConfig.timeout_s, 30 min). Sharding the subset over the ranks would divide
            # the forward passes by the world size, but needs Inception and the segmenter on
            # every rank and a gather of features, and FID's matrix square root (the largest
            # part at 2048 dims on CPUs) stays on one rank either way.
            from .validation import TrainingEvaluator

            evaluator = TrainingEvaluator(cfg, device=device)
            print(evaluator.describe(), flush=True)
            if cfg.checkpoint.best_by is not None:
                best = BestCheckpoint(run_dir, cfg.checkpoint.best_by)

    count = int(loop_config["num_examples"])
    per_epoch = steps_per_epoch(count, workers=world, worker_batch=cfg.worker_batch_size)
    if per_epoch < 1:
        raise ValueError(
            f"{count} examples over {world} workers give no whole batch of {cfg.worker_batch_size} per worker; "
            "lower data.batch_size or add data"
        )
    fail_at = loop_config.get("fail_at_step")  # fault-injection hook for tests
    stop_at = loop_config.get("stop_at_step")  # end early after a checkpoint (tests)
    max_steps = cfg.optim.max_steps
    deadline = loop_config.get("time_budget_s")  # end with a checkpoint after this long (benchmarks)
    started = time.monotonic()
    shard = ray.train.get_dataset_shard("train")
    amp_dtype = autocast_dtype(cfg.optim.precision)
    throughput = Throughput()

    if max_steps is not None and state.step >= max_steps:
        return  # a resumed run that had already finished
    for epoch in range(state.epoch, cfg.optim.total_epochs):
        lr_g, lr_d = cfg.optim.learning_rates(epoch)
        _set_lr(optimizers["generator"], lr_g)
        _set_lr(optimizers["discriminator"], lr_d)
        torch.manual_seed(seeds.derive_seed(cfg.data.seed, rank, epoch, state.step))
        skip = state.epoch_step if epoch == state.epoch else 0
        state.epoch, state.epoch_step = epoch, skip
        batches = iter_training_batches(
            shard, batch_size=cfg.worker_batch_size, epoch=epoch, seed=cfg.data.seed, device=device,
            shuffle_buffer=cfg.data.shuffle_buffer,
        )
        t_wait = time.perf_counter()
        for i, batch in enumerate(batches):
            if i >= per_epoch:
                break  # every worker runs exactly per_epoch steps
            if i < skip:
                t_wait = time.perf_counter()
                continue  # resumed mid-epoch: these batches were trained on before the checkpoint
            data_wait = time.perf_counter() - t_wait
            t_step = time.perf_counter()
            if fail_at is not None and state.step == fail_at and rank == world - 1 and _first_attempt(run_dir):
                os._exit(1)  # a worker dies; Ray Train restarts the group from the last checkpoint
            if cfg.optim.channels_last:
                batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
            terms = _iteration(cfg, nets, model, batch, optimizers, scaler, vgg, ema, amp_dtype, state.step, device)
            state.step += 1
            state.epoch_step += 1
            step_s = time.perf_counter() - t_step
            rate = throughput.add(cfg.data.batch_size)

            if log is not None and state.step % cfg.logging.every_steps == 0:
                record = {"step": state.step, "epoch": epoch, **terms, "images_per_s": rate, "step_s": step_s,
                          "data_wait_s": data_wait, "lr_g": lr_g, "lr_d": lr_d, "workers": world, "time": time.time()}
                if device.type == "cuda":
                    record["gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30  # peak since start
                log.record(record, images=cfg.data.batch_size * cfg.logging.every_steps, step_seconds=step_s, data_wait=data_wait)
                log.print_line(record)
                throughput.reset()
            if log is not None and cfg.logging.sample_grid_every_steps and state.step % cfg.logging.sample_grid_every_steps == 0:
                grid = _sample_grid(run_dir / "samples" / f"step_{state.step:08d}.png", model, ema, batch, device)
                log.image("samples/train", grid, state.step)
            end_of_epoch = state.epoch_step == per_epoch
            if end_of_epoch:
                state.epoch, state.epoch_step = epoch + 1, 0
            # all ranks must agree to stop at the same step: decide from rank 0's clock
            out_of_time = deadline is not None and _broadcast_flag(time.monotonic() - started > deadline, distributed)
            finished = out_of_time or (max_steps is not None and state.step >= max_steps)
            run_ends = finished or (stop_at is not None and state.step >= stop_at) or (
                end_of_epoch and epoch == cfg.optim.total_epochs - 1
            )
            if evaluator is not None and (state.step % cfg.eval.every_steps == 0 or run_ends):
                _evaluate(evaluator, best, log, model, ema, state.step, epoch)
            if log is not None and run_ends:
                log.flush()
            if (cfg.checkpoint.every_steps and state.step % cfg.checkpoint.every_steps == 0) or (
                end_of_epoch and cfg.checkpoint.at_epoch_end
            ) or finished:
                _report(cfg, loop_config, model, ema, optimizers, scaler, state, terms, rank)
            if (stop_at is not None and state.step >= stop_at) or finished:
                return
            t_wait = time.perf_counter()
    if loop_config.get("dump_norm_stats_dir"):  # tests: is batch norm synced across ranks?
        stats = {k: v for k, v in model.generator.state_dict().items() if k.endswith(("running_mean", "running_var"))}
        torch.save(stats, Path(loop_config["dump_norm_stats_dir"]) / f"rank{rank}.pt")


def _resume(path: Path, model, ema, optimizers, scaler, rank: int) -> TrainState:  # type: ignore[no-untyped-def]
    state = read_training_checkpoint(
        path, model=model, ema_generator=ema.shadow if ema else None, optimizers=optimizers, scaler=scaler
    )
    if rank == 0:
        print(f"resumed from {path} at step {state.step} (epoch {state.epoch}, +{state.epoch_step})", flush=True)
    return state


def _iteration(
    cfg: TrainConfig,
    nets: Networks,
    model: spade_core.SpadeModel,
    batch: dict[str, torch.Tensor],
    optimizers: dict[str, torch.optim.Optimizer],
    scaler: torch.amp.GradScaler | None,
    vgg: Any,
    ema: EMA | None,
    amp_dtype: torch.dtype | None,
    step: int,
    device: torch.device,
) -> dict[str, float]:
    """The reference's iteration: a generator step (every d_steps_per_g-th), then a discriminator step."""
    real = batch["image"]
    semantics = semantics_of(batch, cfg.model.labels, as_label_map=cfg.optim.fast_path)
    terms: dict[str, torch.Tensor] = {}
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    if step % cfg.optim.d_steps_per_g == 0:
        opt = optimizers["generator"]
        opt.zero_grad(set_to_none=True)
        with autocast:
            g_terms, _ = generator_losses(nets, semantics, real, loss=cfg.loss, vgg=vgg)
        _backward_step(sum(g_terms.values()), opt, scaler, cfg.optim.grad_clip)
        if ema is not None:
            ema.update(model.generator)
        terms.update(g_terms)
    opt = optimizers["discriminator"]
    opt.zero_grad(set_to_none=True)
    with autocast:
        d_terms = discriminator_losses(nets, semantics, real, loss=cfg.loss)
    _backward_step(sum(d_terms.values()), opt, scaler, cfg.optim.grad_clip)
    terms.update(d_terms)
    # one device-to-host copy for all terms: on a GPU each float() would be a sync of its own
    values = torch.stack([v.detach().float() for v in terms.values()]).tolist()
    return dict(zip(terms, values))


def _backward_step(loss: torch.Tensor, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, clip: float | None) -> None:
    params = [p for group in opt.param_groups for p in group["params"]]
    if scaler is not None:
        scaler.scale(loss).backward()
        if clip is not None:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, clip)
        scaler.step(opt)
        scaler.update()
        return
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()


def _report(cfg, loop_config, model, ema, optimizers, scaler, state, terms, rank) -> None:  # type: ignore[no-untyped-def]
    """Every rank reports (it is a barrier); rank 0 attaches the checkpoint."""
    import tempfile

    import ray.train

    metrics = {"step": state.step, "epoch": state.epoch, **terms}
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        write_training_checkpoint(
            Path(tmp), model=model, ema_generator=ema.shadow if ema else None, optimizers=optimizers,
            scaler=scaler, state=state, train_config=loop_config["train"],
        )
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _evaluate(evaluator, best, log, model, ema, step: int, epoch: int) -> None:  # type: ignore[no-untyped-def]
    """Rank 0: score the exported generator (EMA with EMA on), keep the best model, record it all."""
    outcome = evaluator(ema.shadow if ema is not None else model.generator, model.encoder)
    new_best = best is not None and best.offer(
        outcome.values, step=step, epoch=epoch, model=model, ema_generator=ema.shadow if ema is not None else None,
        details={"split": evaluator.cfg.eval.split, "num_images": len(evaluator.data)},
    )
    log.record_eval({"step": step, "epoch": epoch, "eval": outcome.values, "eval_s": outcome.seconds,
                     "eval_images": len(evaluator.data), "best": new_best, "time": time.time()})
    if outcome.grid is not None:
        log.image("samples/eval", outcome.grid, step)


@torch.no_grad()
def _sample_grid(path: Path, model: spade_core.SpadeModel, ema: EMA | None, batch: dict[str, torch.Tensor], device: torch.device) -> Any:
    generator = ema.shadow if ema is not None else model.generator
    semantics = semantics_of(batch, model.config.labels)
    was_training = generator.training
    generator.eval()
    z = None
    if model.encoder is not None:
        was_enc = model.encoder.training
        model.encoder.eval()
        z, _ = model.encoder(batch["image"])
        model.encoder.train(was_enc)
    fake = generator(semantics, z=z)
    generator.train(was_training)
    grid = sample_grid(batch["label"], fake, batch["image"], model.classes)
    save_grid(path, grid)
    return grid


def _broadcast_flag(flag: bool, distributed: bool) -> bool:
    if not distributed:
        return flag
    # NCCL moves only CUDA tensors; gloo takes either
    on = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" else "cpu"
    t = torch.tensor([int(flag)], device=on)
    torch.distributed.broadcast(t, src=0)
    return bool(t.item())


def _ddp(net: nn.Module, device: torch.device, distributed: bool) -> nn.Module:
    if not distributed:
        return net
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(net, device_ids=ids)


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def _unrecorded(cfg: TrainConfig, checkpoint: Any, *, rank: int, distributed: bool) -> Path | None:
    """Rank 0's look for a whole checkpoint newer than Ray's record (local storage only), shared
    with every rank so that all resume from the same one."""
    found = None
    if rank == 0 and _local_storage(cfg):
        found = unrecorded_checkpoint(_run_dir(cfg), checkpoint.path if checkpoint is not None else None)
        if found is not None:
            print(f"note: {found.name} is whole but was not yet recorded by Ray Train (its driver stopped "
                  "first): resuming from it", flush=True)
    if distributed:
        box = [str(found) if found is not None else None]
        torch.distributed.broadcast_object_list(box, src=0)
        found = Path(box[0]) if box[0] is not None else None
    return found


def _local_storage(cfg: TrainConfig) -> bool:
    return not is_remote(cfg.storage.path)


def _run_dir(cfg: TrainConfig) -> Path:
    """Where rank 0 writes metrics.jsonl and samples: the run's folder for local storage,
    else the worker's working directory (Ray's per-run artifacts folder)."""
    if _local_storage(cfg):
        return Path(local_path(cfg.storage.path)) / cfg.storage.name
    return Path.cwd()


def _first_attempt(run_dir: Path) -> bool:
    marker = run_dir / ".fault_injected"
    if marker.exists():
        return False
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("1")
    return True
