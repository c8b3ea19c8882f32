"""The training run of one Ray Train worker, as an object.

:class:`Trainer` holds the parts of a run (networks, optimisers, the AMP scaler, the EMA
generator, where the data stands) and restores them as one state; :class:`Checkpointer` owns
when a checkpoint is written; :mod:`train_job.callbacks` carries what tests and benchmarks
need (torchtitan's ``Trainer`` and ``CheckpointManager`` are the model). The order of a run:

build the networks -> synced batch norm (more than one worker) -> DDP -> resume from the
latest checkpoint if there is one -> epochs of the reference's G step + D step, with the LR
schedule, AMP, EMA, checkpoints, metrics and sample grids; with ``eval.every_steps``, rank 0
evaluates the generator on a fixed validation subset (``train_job.validation``) and keeps the
best model (``checkpoint.best_by``, ``train_job.checkpointing.BestCheckpoint``).

A Trainer is built without Ray (tests drive :meth:`Trainer.train_step` directly);
:func:`train_loop_per_worker` is the entry point Ray Train runs on every worker.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import spade_core
from spade_core import seeds
from spade_core.locations import is_remote, local_path
from spade_core.losses import build_vgg_loss
from spade_core.norms import set_fast_training
from spade_core.precision import autocast_dtype
from spade_core.syncbn import convert_sync_batchnorm

from .callbacks import Callback
from .checkpointing import BestCheckpoint, TrainState, read_training_checkpoint, unrecorded_checkpoint, write_training_checkpoint
from .config import CheckpointConfig, TrainConfig
from .console import tee_to
from .metrics import MetricsLog, Throughput, sample_grid, save_grid, start_prometheus
from .pipeline import iter_training_batches
from .steps import Networks, discriminator_losses, generator_losses, semantics_of


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """What Ray Train runs on every worker: ``{"train": TrainConfig dict, "num_examples": N,
    "callbacks": [...]}`` (see ``train_job.__main__.build_trainer``)."""
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.from_dict(loop_config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if rank == 0 and loop_config.get("console"):
        tee_to(run_dir(cfg))  # the driver shows these lines (train_job.console), not Ray's own
    trainer = Trainer(cfg, device=ray.train.torch.get_device(), rank=rank, world=world,
                      distributed=world > 1 and torch.distributed.is_initialized(), callbacks=loop_config.get("callbacks", ()))
    trainer.resume(ray.train.get_checkpoint())
    trainer.fit(ray.train.get_dataset_shard("train"), num_examples=int(loop_config["num_examples"]))


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


def total_steps(cfg: TrainConfig, num_examples: int) -> int:
    """The steps a run takes in all: ``optim.max_steps``, else whole epochs of whole batches."""
    per_epoch = steps_per_epoch(num_examples, workers=cfg.scaling.num_workers, worker_batch=cfg.worker_batch_size)
    every = per_epoch * cfg.optim.total_epochs
    return min(every, cfg.optim.max_steps) if cfg.optim.max_steps is not None else every


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


class Trainer:
    """One rank's part of a SPADE training run."""

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        device: torch.device,
        rank: int = 0,
        world: int = 1,
        distributed: bool = False,
        callbacks: Iterable[Callback] = (),
    ) -> None:
        self.cfg, self.device, self.rank, self.world, self.distributed = cfg, device, rank, world, distributed
        self.callbacks: Sequence[Callback] = tuple(callbacks)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed crop sizes: autotuned conv algorithms pay after the first step
        self.model = build_training_model(cfg, device=device, sync_batchnorm=distributed and cfg.scaling.sync_batchnorm)
        self.ema = EMA(self.model.generator, cfg.optim.ema_decay) if cfg.optim.ema_decay is not None else None
        model = self.model
        g_params = list(model.generator.parameters()) + (list(model.encoder.parameters()) if model.encoder else [])
        self.optimizers = {
            "generator": torch.optim.Adam(g_params, lr=cfg.optim.lr_g, betas=cfg.optim.betas),
            "discriminator": torch.optim.Adam(model.discriminator.parameters(), lr=cfg.optim.lr_d, betas=cfg.optim.betas),
        }
        self.scaler = torch.amp.GradScaler(device.type) if cfg.optim.uses_grad_scaler else None
        self.state = TrainState()
        self.nets = Networks(
            generator=_ddp(model.generator, device, distributed),
            discriminator=_ddp(model.discriminator, device, distributed),
            encoder=_ddp(model.encoder, device, distributed) if model.encoder is not None else None,
        )
        self.vgg = build_vgg_loss(cfg.loss, device=device)
        if self.vgg is not None and cfg.optim.channels_last:
            self.vgg.to(memory_format=torch.channels_last)
        self.amp_dtype = autocast_dtype(cfg.optim.precision)
        self.run_dir = run_dir(cfg)
        self.checkpointer = Checkpointer(cfg.checkpoint, rank=rank, train_config=cfg.to_dict())

    # --- state ----------------------------------------------------------------------------

    def parts(self) -> dict[str, Any]:
        """What a training checkpoint holds besides ``state``: saved and restored together."""
        return {"model": self.model, "ema_generator": self.ema.shadow if self.ema else None,
                "optimizers": self.optimizers, "scaler": self.scaler}

    def load(self, path: Path) -> None:
        """Restore every part and the data position from the training checkpoint at ``path``."""
        self.state = read_training_checkpoint(path, **self.parts())
        if self.rank == 0:
            s = self.state
            print(f"resumed from {path} at step {s.step} (epoch {s.epoch}, +{s.epoch_step})", flush=True)

    def resume(self, recorded: Any = None) -> None:
        """Continue where the run stands: the newest whole checkpoint Ray Train has not recorded
        (its driver stopped first), else Ray's own (``recorded``), else ``storage.resume_from``."""
        unrecorded = self._unrecorded(recorded)
        if unrecorded is not None:
            self.load(unrecorded)
        elif recorded is not None:
            # as_directory, not to_directory: every rank reads at once, and to_directory makes
            # them copy into the same temporary folder while others read from it.
            with recorded.as_directory() as resume_dir:
                self.load(Path(resume_dir))
        elif self.cfg.storage.resume_from:
            self.load(Path(self.cfg.storage.resume_from))

    def _unrecorded(self, recorded: Any) -> Path | None:
        """Rank 0's look for a whole checkpoint newer than Ray's record (local storage only),
        shared with every rank so that all resume from the same one."""
        found = None
        if self.rank == 0 and not is_remote(self.cfg.storage.path):
            found = unrecorded_checkpoint(self.run_dir, recorded.path if recorded is not None else None)
            if found is not None:
                print(f"note: {found.name} is whole but was not yet recorded by Ray Train (its driver stopped "
                      "first): resuming from it", flush=True)
        if self.distributed:
            box = [str(found) if found is not None else None]
            torch.distributed.broadcast_object_list(box, src=0)
            found = Path(box[0]) if box[0] is not None else None
        return found

    # --- one iteration --------------------------------------------------------------------

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """The reference's iteration: a generator step (every d_steps_per_g-th), then a
        discriminator step; returns the loss terms. Does not advance ``state``."""
        cfg = self.cfg
        if cfg.optim.channels_last:
            batch = {**batch, "image": batch["image"].contiguous(memory_format=torch.channels_last)}
        real = batch["image"]
        semantics = semantics_of(batch, cfg.model.labels, as_label_map=cfg.optim.fast_path)
        terms: dict[str, torch.Tensor] = {}
        autocast = torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)
        if self.state.step % cfg.optim.d_steps_per_g == 0:
            opt = self.optimizers["generator"]
            opt.zero_grad(set_to_none=True)
            with autocast:
                g_terms, _ = generator_losses(self.nets, semantics, real, loss=cfg.loss, vgg=self.vgg)
            _backward_step(sum(g_terms.values()), opt, self.scaler, cfg.optim.grad_clip)
            if self.ema is not None:
                self.ema.update(self.model.generator)
            terms.update(g_terms)
        opt = self.optimizers["discriminator"]
        opt.zero_grad(set_to_none=True)
        with autocast:
            d_terms = discriminator_losses(self.nets, semantics, real, loss=cfg.loss)
        _backward_step(sum(d_terms.values()), opt, self.scaler, cfg.optim.grad_clip)
        terms.update(d_terms)
        # one device-to-host copy for all terms: on a GPU each float() would be a sync of its own
        values = torch.stack([v.detach().float() for v in terms.values()]).tolist()
        return dict(zip(terms, values))

    # --- the run --------------------------------------------------------------------------

    def fit(self, shard: Any, *, num_examples: int) -> None:
        """Train on this worker's Ray Data shard until ``optim.max_steps`` or the last epoch."""
        cfg, state = self.cfg, self.state
        per_epoch = steps_per_epoch(num_examples, workers=self.world, worker_batch=cfg.worker_batch_size)
        if per_epoch < 1:
            raise ValueError(
                f"{num_examples} examples over {self.world} workers give no whole batch of {cfg.worker_batch_size} "
                "per worker; lower data.batch_size or add data"
            )
        log, evaluator, best = self._start_logging()
        max_steps = cfg.optim.max_steps
        throughput = Throughput()
        if max_steps is not None and state.step >= max_steps:
            return  # a resumed run that had already finished
        for epoch in range(state.epoch, cfg.optim.total_epochs):
            lr_g, lr_d = cfg.optim.learning_rates(epoch)
            _set_lr(self.optimizers["generator"], lr_g)
            _set_lr(self.optimizers["discriminator"], lr_d)
            torch.manual_seed(seeds.derive_seed(cfg.data.seed, self.rank, epoch, state.step))
            skip = state.epoch_step if epoch == state.epoch else 0
            state.epoch, state.epoch_step = epoch, skip
            batches = iter_training_batches(
                shard, batch_size=cfg.worker_batch_size, epoch=epoch, seed=cfg.data.seed, device=self.device,
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
                for callback in self.callbacks:
                    callback.on_step_start(self)
                terms = self.train_step(batch)
                state.step += 1
                state.epoch_step += 1
                step_s = time.perf_counter() - t_step
                rate = throughput.add(cfg.data.batch_size)

                if log is not None and state.step % cfg.logging.every_steps == 0:
                    record = {"step": state.step, "epoch": epoch, **terms, "images_per_s": rate, "step_s": step_s,
                              "data_wait_s": data_wait, "lr_g": lr_g, "lr_d": lr_d, "workers": self.world, "time": time.time()}
                    if self.device.type == "cuda":
                        record["gpu_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30  # peak since start
                    log.record(record, images=cfg.data.batch_size * cfg.logging.every_steps, step_seconds=step_s, data_wait=data_wait)
                    log.print_line(record)
                    throughput.reset()
                if log is not None and cfg.logging.sample_grid_every_steps and state.step % cfg.logging.sample_grid_every_steps == 0:
                    grid = self._sample_grid(self.run_dir / "samples" / f"step_{state.step:08d}.png", batch)
                    log.image("samples/train", grid, state.step)
                end_of_epoch = state.epoch_step == per_epoch
                if end_of_epoch:
                    state.epoch, state.epoch_step = epoch + 1, 0
                finished = self._finish_now() or (max_steps is not None and state.step >= max_steps)
                stopped = any(callback.stop(self) for callback in self.callbacks)
                run_ends = finished or stopped or (end_of_epoch and epoch == cfg.optim.total_epochs - 1)
                if evaluator is not None and (state.step % cfg.eval.every_steps == 0 or run_ends):
                    self._evaluate(evaluator, best, log, epoch)
                if log is not None and run_ends:
                    log.flush()
                self.checkpointer.save(self, terms=terms, end_of_epoch=end_of_epoch, last_step=finished)
                if stopped or finished:
                    return
                t_wait = time.perf_counter()
        for callback in self.callbacks:
            callback.on_train_end(self)

    def _finish_now(self) -> bool:
        """A callback's call to finish, decided on rank 0 and shared: all ranks must stop at the
        same step (the next collective would wait forever for a rank that left)."""
        if not self.callbacks:
            return False
        wanted = self.rank == 0 and any(callback.finish(self) for callback in self.callbacks)
        return _broadcast_flag(wanted, self.distributed)

    def _start_logging(self) -> tuple[MetricsLog | None, Any, BestCheckpoint | None]:
        """Rank 0's metrics log, evaluator and best-model keeper (None on the other ranks)."""
        if self.rank != 0:
            return None, None, None
        cfg = self.cfg
        prometheus = cfg.logging.metrics_port is not None and start_prometheus(cfg.logging.metrics_port, cfg.logging.metrics_host)
        log = MetricsLog(self.run_dir, prometheus=prometheus, tensorboard=cfg.logging.tensorboard, resume_step=self.state.step)
        evaluator, best = None, None
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

            evaluator = TrainingEvaluator(cfg, device=self.device)
            print(evaluator.describe(), flush=True)
            if cfg.checkpoint.best_by is not None:
                best = BestCheckpoint(self.run_dir, cfg.checkpoint.best_by)
        return log, evaluator, best

    def _evaluate(self, evaluator: Any, best: BestCheckpoint | None, log: MetricsLog, epoch: int) -> None:
        """Rank 0: score the exported generator (EMA with EMA on), keep the best model, record it all."""
        step, ema = self.state.step, self.ema
        outcome = evaluator(ema.shadow if ema is not None else self.model.generator, self.model.encoder)
        new_best = best is not None and best.offer(
            outcome.values, step=step, epoch=epoch, model=self.model, ema_generator=ema.shadow if ema is not None else None,
            details={"split": evaluator.cfg.eval.split, "num_images": len(evaluator.data)},
        )
        log.record_eval({"step": step, "epoch": epoch, "eval": outcome.values, "eval_s": outcome.seconds,
                         "eval_images": len(evaluator.data), "best": new_best, "time": time.time()})
        if outcome.grid is not None:
            log.image("samples/eval", outcome.grid, step)

    @torch.no_grad()
    def _sample_grid(self, path: Path, batch: dict[str, torch.Tensor]) -> Any:
        model = self.model
        generator = self.ema.shadow if self.ema is not None else model.generator
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


class Checkpointer:
    """When to write a training checkpoint, and writing it: every ``checkpoint.every_steps``
    steps, at each epoch's end with ``checkpoint.at_epoch_end``, and at the last step."""

    def __init__(self, config: CheckpointConfig, *, rank: int, train_config: dict[str, Any]) -> None:
        self.config, self.rank, self.train_config = config, rank, train_config

    def due(self, step: int, *, end_of_epoch: bool, last_step: bool) -> bool:
        every = self.config.every_steps
        return bool(every and step % every == 0) or (end_of_epoch and self.config.at_epoch_end) or last_step

    def save(self, trainer: Trainer, *, terms: dict[str, float], end_of_epoch: bool, last_step: bool) -> bool:
        """Write (and report to Ray Train) a checkpoint if one is due; True if it was."""
        state = trainer.state
        if not self.due(state.step, end_of_epoch=end_of_epoch, last_step=last_step):
            return False
        import tempfile

        import ray.train

        metrics = {"step": state.step, "epoch": state.epoch, **terms}
        if self.rank != 0:
            ray.train.report(metrics)  # every rank reports: it is a barrier; rank 0 attaches the files
            return True
        with tempfile.TemporaryDirectory() as tmp:
            write_training_checkpoint(Path(tmp), **trainer.parts(), state=state, train_config=self.train_config)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        return True


def run_dir(cfg: TrainConfig) -> Path:
    """Where rank 0 writes metrics.jsonl and samples: the run's folder for local storage,
    else the worker's working directory (Ray's per-run artifacts folder)."""
    if not is_remote(cfg.storage.path):
        return Path(local_path(cfg.storage.path)) / cfg.storage.name
    return Path.cwd()


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
