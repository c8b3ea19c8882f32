"""The training job's config: one typed, validated YAML file (presets in ``cluster/configs/``).

    config = load_train_config("cluster/configs/tiny.yaml", ["optim.lr=1e-4", "scaling.num_workers=1"])

Sections: ``model`` (:class:`spade_core.config.ModelConfig`, the architecture that travels
with the weights), ``loss`` (:class:`spade_core.losses.LossConfig`), ``data``, ``optim``,
``scaling``, ``storage``, ``checkpoint``, ``logging``, ``eval`` (evaluation during training,
off by default). Everything is a frozen dataclass and checked once, here, so a bad value
fails before a cluster is asked for anything:

* unknown keys, wrong types, bad literals and out-of-range values are ValueErrors that name
  the full dotted key (``optim.lr must be > 0, got -1``);
* cross-section rules: ``data.batch_size`` is the global batch and must split equally over
  ``scaling.num_workers``; ``data.preprocess.crop_size`` must equal
  ``model.generator.crop_size``, and for the fixed-size preprocessing modes the generator
  must produce exactly the image size the pipeline delivers; ``checkpoint.best_by`` must be
  a metric ``eval`` computes; ``eval.oracle`` only labels ADE20K-layout scenes;
* relative local paths (``data.shards``, ``storage.path``, ``storage.resume_from``,
  ``loss.vgg_weights``, ``eval.inception``, ``eval.segmenter``) are made absolute against the
  current directory at load time:
  Ray Train rejects a relative ``storage_path``, and its workers run in another directory.

Overrides are ``key=value`` strings with dotted keys; the value is read as a YAML scalar
(``true``, ``1e-4``, ``null``, ``[1, 2]``, ``{CPU: 0.5}``). YAML is read with one change from
PyYAML's YAML 1.1 rules: ``1e-4`` is a number (YAML 1.2), not the string PyYAML makes of it.

Imports no Ray: the driver and a CLI can check a config before touching a cluster.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from spade_core import configtools
from spade_core.config import ModelConfig
from spade_core.configtools import (
    build,
    check_fields,
    dump_yaml_text,
    load_yaml,
    reject_unknown,
    require,
    type_hints,
    typed,
)
from spade_core.locations import absolute
from spade_core.losses import LossConfig
from spade_core.precision import Precision
from spade_core.metrics.inception import BLOCK_BY_DIMS
from spade_core.preprocess import PreprocessConfig, output_size

from .datasets import DatasetError, normalize_split

PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]
EvalMetric = Literal["fid", "kid", "miou"]
EVAL_METRICS: tuple[str, ...] = ("fid", "kid", "miou")
# What each metric puts in the records: KID's spread over its subsets, and pixel accuracy
# from the same confusion matrix as the mIoU.
EVAL_VALUES = {"fid": ("fid",), "kid": ("kid", "kid_std"), "miou": ("miou", "pixel_accuracy")}
LOWER_IS_BETTER = {"fid": True, "kid": True, "miou": False}

# Ray's worker processes take ports 10002-19999 by default (docs/ray-2.60-notes.md); a
# metrics server there would collide with them at random.
_RAY_WORKER_PORTS = range(10002, 20000)


# ---------------------------------------------------------------------------------------
# Sections


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the prepared Parquet shards are and how batches are made from them."""

    # Local path or URI (s3://, gs://, ...) of a train_job.prepare output (manifest.json + shards).
    shards: str
    # The global batch over all workers (the reference's batchSize); each worker gets
    # batch_size / scaling.num_workers.
    batch_size: int
    split: str = "train"
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    # Rows per worker in iter_torch_batches' local shuffle buffer; 0 keeps the shard order
    # (file and block order are still reshuffled every epoch).
    shuffle_buffer: int = 0
    decode_cpus: float = 1.0  # CPUs each decode + augment task reserves
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self, "data")
        require(self.shards != "", "data.shards must be a path or URI, got ''")
        object.__setattr__(self, "shards", absolute(self.shards))
        require(self.split != "", "data.split must be a split name (e.g. 'train'), got ''")
        require(self.batch_size >= 1, f"data.batch_size must be >= 1, got {self.batch_size}")
        require(self.shuffle_buffer >= 0, f"data.shuffle_buffer must be >= 0, got {self.shuffle_buffer}")
        require(self.decode_cpus > 0, f"data.decode_cpus must be > 0, got {self.decode_cpus}")
        require(self.seed >= 0, f"data.seed must be >= 0, got {self.seed}")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """Adam for G (+ E) and D, as the reference: TTUR by default, linear decay to zero.

    Epochs: ``niter`` at the base rate, then ``niter_decay`` with the rate decaying linearly
    (the reference's names; total = niter + niter_decay). Rates and betas depend on
    ``no_ttur``; use :attr:`lr_g`, :attr:`lr_d`, :attr:`betas` and :meth:`learning_rates`
    rather than re-deriving them.
    """

    niter: int = 50
    niter_decay: int = 0
    lr: float = 2e-4  # the base rate; with TTUR G trains at lr / 2 and D at lr * 2
    no_ttur: bool = False
    # null: the reference's defaults, (0, 0.9) with TTUR and (0.5, 0.999) with no_ttur.
    # A value given here is used in both modes, as the reference's --beta1 / --beta2.
    beta1: float | None = None
    beta2: float | None = None
    # Stop after this many iterations in all (a checkpoint is written there); null: run
    # every epoch. For demos and smoke runs: the LR schedule still follows the epochs.
    max_steps: int | None = None
    d_steps_per_g: int = 1  # the generator steps on every d_steps_per_g-th batch; D on every batch
    precision: Precision = "fp32"  # autocast dtype; fp16 also needs a GradScaler (bf16 does not)
    channels_last: bool = False
    # spade_core's trainable fast path: label-map convs as gathers, fused SPADE gamma/beta
    # convs, fused spectral norm. The same function and gradients (to float rounding) as the
    # reference's computation, which false restores (for comparisons).
    fast_path: bool = True
    ema_decay: float | None = 0.999  # shadow copy of G's weights; null disables it
    grad_clip: float | None = None  # max global gradient norm per network; null: no clipping

    def __post_init__(self) -> None:
        check_fields(self, "optim")
        require(self.niter >= 0, f"optim.niter must be >= 0, got {self.niter}")
        require(self.niter_decay >= 0, f"optim.niter_decay must be >= 0, got {self.niter_decay}")
        require(
            self.total_epochs >= 1,
            f"optim.niter + optim.niter_decay must be >= 1, got {self.niter} + {self.niter_decay}",
        )
        require(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            require(value is None or 0 <= value < 1, f"optim.{name} must be in [0, 1) or null, got {value}")
        require(self.max_steps is None or self.max_steps >= 1, f"optim.max_steps must be >= 1 or null, got {self.max_steps}")
        require(self.d_steps_per_g >= 1, f"optim.d_steps_per_g must be >= 1, got {self.d_steps_per_g}")
        require(
            self.ema_decay is None or 0 < self.ema_decay < 1,
            f"optim.ema_decay must be in (0, 1) or null, got {self.ema_decay}",
        )
        require(self.grad_clip is None or self.grad_clip > 0, f"optim.grad_clip must be > 0 or null, got {self.grad_clip}")

    @property
    def total_epochs(self) -> int:
        return self.niter + self.niter_decay

    @property
    def lr_g(self) -> float:
        """The generator's (and encoder's) base learning rate."""
        return self.lr if self.no_ttur else self.lr / 2

    @property
    def lr_d(self) -> float:
        """The discriminator's base learning rate."""
        return self.lr if self.no_ttur else self.lr * 2

    @property
    def betas(self) -> tuple[float, float]:
        """Adam's (beta1, beta2), the same for G and D."""
        default1, default2 = (0.5, 0.999) if self.no_ttur else (0.0, 0.9)
        return (
            default1 if self.beta1 is None else self.beta1,
            default2 if self.beta2 is None else self.beta2,
        )

    @property
    def uses_grad_scaler(self) -> bool:
        # fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range.
        return self.precision == "fp16"

    def lr_factor(self, epoch: int) -> float:
        """The multiplier of the base rates during ``epoch`` (0-based).

        The reference lowers the rate by ``lr / niter_decay`` at the end of every epoch after
        the first ``niter``: epoch ``niter`` still runs at the full rate and the last one at
        ``1 / niter_decay`` of it (never at zero).
        """
        require(isinstance(epoch, int) and epoch >= 0, f"epoch must be an int >= 0, got {epoch!r}")
        if self.niter_decay == 0:
            return 1.0
        decayed = min(max(0, epoch - self.niter), self.niter_decay)
        return 1.0 - decayed / self.niter_decay

    def learning_rates(self, epoch: int) -> tuple[float, float]:
        """(generator lr, discriminator lr) during ``epoch`` (0-based)."""
        factor = self.lr_factor(epoch)
        return self.lr_g * factor, self.lr_d * factor


@dataclass(frozen=True, kw_only=True)
class ScalingConfig:
    """How many Ray Train workers and what each reserves (maps onto ``ray.train.ScalingConfig``)."""

    num_workers: int = 1
    use_gpu: bool = False
    # null: {"CPU": 1} per worker, plus {"GPU": 1} with use_gpu (see worker_resources).
    # On small CPU-only nodes give fractions, e.g. {"CPU": 0.5} on 2 cores: with a whole
    # CPU reserved by each train worker, Ray Data's read tasks never get a CPU and the job
    # hangs (docs/ray-2.60-notes.md).
    resources_per_worker: dict[str, float] | None = None
    placement_strategy: PlacementStrategy = "PACK"
    max_failures: int = 0  # worker-group restarts from the last checkpoint; -1: unlimited (Ray's meaning)
    sync_batchnorm: bool = True  # batch statistics over the global batch when num_workers > 1

    def __post_init__(self) -> None:
        check_fields(self, "scaling")
        require(self.num_workers >= 1, f"scaling.num_workers must be >= 1, got {self.num_workers}")
        require(self.max_failures >= -1, f"scaling.max_failures must be >= 0, or -1 for unlimited, got {self.max_failures}")
        resources = self.resources_per_worker
        if resources is None:
            return
        require(
            len(resources) > 0,
            "scaling.resources_per_worker must name at least one resource, or be null for the default",
        )
        for name, amount in resources.items():
            require(name != "", "scaling.resources_per_worker has an empty resource name")
            require(amount >= 0, f"scaling.resources_per_worker.{name} must be >= 0, got {amount}")
        gpus = resources.get("GPU")
        # Ray's ScalingConfig refuses both of these, but only once the job is submitted.
        require(
            self.use_gpu or not gpus,
            f"scaling.resources_per_worker.GPU is {gpus} but scaling.use_gpu is false; set use_gpu: true or drop GPU",
        )
        require(
            not self.use_gpu or gpus is None or gpus > 0,
            "scaling.resources_per_worker.GPU is 0 but scaling.use_gpu is true",
        )
        object.__setattr__(self, "resources_per_worker", dict(resources))  # no aliasing of the caller's dict

    @property
    def worker_resources(self) -> dict[str, float]:
        """What each worker reserves, defaults filled in.

        Unlike Ray's default ({"GPU": 1} alone), GPU workers also reserve one CPU, so that
        Ray Data's decode tasks are not packed onto the cores the training loop needs.
        """
        if self.resources_per_worker is None:
            resources = {"CPU": 1.0}
        else:
            resources = dict(self.resources_per_worker)
        if self.use_gpu:
            resources.setdefault("GPU", 1.0)
        return resources

    def ray_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``ray.train.ScalingConfig``."""
        return {
            "num_workers": self.num_workers,
            "use_gpu": self.use_gpu,
            "resources_per_worker": self.worker_resources,
            "placement_strategy": self.placement_strategy,
        }


@dataclass(frozen=True, kw_only=True)
class StorageConfig:
    """Where Ray Train writes the run (checkpoints, results).

    ``path``: absolute path or URI (s3://, gs://, file:///...). A relative path is made
    absolute against the current directory when the config is loaded: fine for local runs;
    under ``ray job submit`` the driver's directory is a temporary copy, so use a URI or an
    absolute shared path there.
    """

    path: str
    name: str  # the run's directory under path; rerunning the same name resumes that run
    # A checkpoint directory (path or URI) to start a *new* run from (weights, optimisers,
    # step); null: start fresh, or resume this run's own latest checkpoint.
    resume_from: str | None = None

    def __post_init__(self) -> None:
        check_fields(self, "storage")
        require(self.path != "", "storage.path must be an absolute path or a URI, got ''")
        object.__setattr__(self, "path", absolute(self.path))
        require(
            self.name not in ("", ".", "..") and "/" not in self.name and "\\" not in self.name,
            f"storage.name must be a plain directory name (no '/'), got {self.name!r}",
        )
        if self.resume_from is not None:
            require(self.resume_from != "", "storage.resume_from must be a path, a URI or null, got ''")
            object.__setattr__(self, "resume_from", absolute(self.resume_from))


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    every_steps: int = 1000  # global steps between checkpoints; 0: only at epoch ends
    keep: int = 3  # newest checkpoints kept (ray.train.CheckpointConfig.num_to_keep)
    at_epoch_end: bool = True
    # Keep the model that scored best in eval (lower fid / kid, higher miou) as RUN_DIR/best/
    # with RUN_DIR/best.json, whatever `keep` says; null: no best copy.
    best_by: EvalMetric | None = None

    def __post_init__(self) -> None:
        check_fields(self, "checkpoint")
        require(self.every_steps >= 0, f"checkpoint.every_steps must be >= 0, got {self.every_steps}")
        require(self.keep >= 1, f"checkpoint.keep must be >= 1, got {self.keep}")
        # Without checkpoints a run keeps no weights and cannot resume or survive a failure.
        require(
            self.every_steps > 0 or self.at_epoch_end,
            "checkpoint.every_steps is 0 and checkpoint.at_epoch_end is false: the run would never checkpoint",
        )


@dataclass(frozen=True, kw_only=True)
class LoggingConfig:
    every_steps: int = 10  # steps between metric reports
    sample_grid_every_steps: int = 500  # steps between sample image grids; 0: never
    # Prometheus endpoint on the rank-0 worker; null disables it. Not in 10002-19999,
    # where Ray puts its worker processes.
    metrics_port: int | None = 9464
    metrics_host: str = "127.0.0.1"  # loopback unless a scraper on another host needs it
    # TensorBoard event files under RUN_DIR/tensorboard/: loss terms, rates, eval metrics, sample grids
    tensorboard: bool = True

    def __post_init__(self) -> None:
        check_fields(self, "logging")
        require(self.every_steps >= 1, f"logging.every_steps must be >= 1, got {self.every_steps}")
        require(
            self.sample_grid_every_steps >= 0,
            f"logging.sample_grid_every_steps must be >= 0, got {self.sample_grid_every_steps}",
        )
        port = self.metrics_port
        require(port is None or 1 <= port <= 65535, f"logging.metrics_port must be in 1..65535 or null, got {port}")
        require(
            port is None or port not in _RAY_WORKER_PORTS,
            f"logging.metrics_port {port} is in {_RAY_WORKER_PORTS.start}..{_RAY_WORKER_PORTS.stop - 1}, "
            "the range Ray gives its worker processes; choose another port",
        )
        require(self.metrics_host != "", "logging.metrics_host must be a host name or address, got ''")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Evaluation during training (``train_job.validation``): rank 0 scores the generator
    (the EMA one when EMA is on) on a fixed validation subset every ``every_steps`` steps and
    at the end of the run, as ``spade-eval run`` would score a checkpoint.

    Requirements are checked only when it is on (``every_steps`` > 0): FID and KID need
    ``inception``, mIoU needs ``segmenter`` or ``oracle``. ``metrics: null`` takes every
    metric the given files allow. Whether ``split`` exists is checked at job start, against
    the shards' manifest.
    """

    every_steps: int = 0  # global steps between evaluations; 0: off
    split: str = "val"
    # The split's first N pairs in key order, with the test-time preprocessing (resize to the
    # model's input, no crop or flip): the same images every time. FID over a subset is
    # biased upward against the full split: compare runs at the same num_images.
    num_images: int = 500
    metrics: tuple[EvalMetric, ...] | None = None  # some of fid, kid, miou; null: what the files allow
    inception: str | None = None  # pytorch-fid's pt_inception-2015-12-05-6726825d.pth (fid, kid)
    allow_any_inception: bool = False  # other weights of that layout (tests): FID not comparable then
    # Inception feature block: 64, 192, 768 or 2048 (pytorch-fid's --dims; published FIDs use
    # 2048). FID's matrix square root is dims x dims on rank 0's CPU threads (Ray gives a worker
    # as many as it reserves CPUs): at 2048, ~30 s per evaluation on one thread of a 2-core Xeon.
    dims: int = 2048
    segmenter: str | None = None  # a TorchScript (.pt) or torch.export (.pt2) segmentation network (miou)
    segmenter_offset: int | None = None  # output channel c -> id c + offset; null: 1 for ADE20K, else 0
    oracle: bool = False  # the synthetic scenes' oracle segmenter instead of a network (miou)
    batch_size: int = 16  # images per generator / Inception / segmenter call
    sample_rows: int = 4  # rows of the subset's sample grid in TensorBoard (label | generated | real); 0: none

    def __post_init__(self) -> None:
        hints = type_hints(type(self))
        for f in dataclasses.fields(self):  # configtools checks scalars; the metric list is checked below
            if f.name != "metrics":
                checked = typed(getattr(self, f.name), hints[f.name], f"eval.{f.name}")
                object.__setattr__(self, f.name, checked)
        object.__setattr__(self, "metrics", _metric_list(self.metrics, "eval.metrics"))
        require(self.every_steps >= 0, f"eval.every_steps must be >= 0 (0: off), got {self.every_steps}")
        try:
            object.__setattr__(self, "split", normalize_split(self.split))
        except DatasetError:
            raise ValueError(f"eval.split must be train, training, val or validation, got {self.split!r}") from None
        require(self.num_images >= 1, f"eval.num_images must be >= 1, got {self.num_images}")
        require(self.dims in BLOCK_BY_DIMS, f"eval.dims must be one of {', '.join(map(str, BLOCK_BY_DIMS))}, got {self.dims}")
        require(self.batch_size >= 1, f"eval.batch_size must be >= 1, got {self.batch_size}")
        require(self.sample_rows >= 0, f"eval.sample_rows must be >= 0, got {self.sample_rows}")
        for name in ("inception", "segmenter"):
            value = getattr(self, name)
            if value is not None:
                require(value != "", f"eval.{name} must be a path or null, got ''")
                object.__setattr__(self, name, absolute(value))
        require(not (self.segmenter and self.oracle), "eval.segmenter and eval.oracle are both set: give one of them")
        require(
            self.segmenter_offset is None or self.segmenter_offset >= 0,
            f"eval.segmenter_offset must be >= 0 or null, got {self.segmenter_offset}",
        )
        require(
            self.segmenter_offset is None or self.segmenter is not None,
            "eval.segmenter_offset is set but eval.segmenter is not: the offset maps a segmentation network's outputs",
        )
        if not self.enabled:
            return
        chosen = self.chosen_metrics
        require(
            len(chosen) > 0,
            f"eval.every_steps is {self.every_steps} but there is nothing to compute: set eval.inception "
            "(fid, kid) and/or eval.segmenter or eval.oracle (miou), or eval.every_steps: 0",
        )
        for metric in chosen:
            require(
                metric == "miou" or self.inception is not None,
                f"eval.metrics includes {metric}, which needs eval.inception (pytorch-fid's Inception weights)",
            )
            require(
                metric != "miou" or self.segmenter is not None or self.oracle,
                "eval.metrics includes miou, which needs eval.segmenter (a segmentation network) or eval.oracle: true",
            )
        require(
            self.num_images >= 2 or not ({"fid", "kid"} & set(chosen)),
            f"eval.num_images must be >= 2 for fid and kid (a covariance), got {self.num_images}",
        )

    @property
    def enabled(self) -> bool:
        return self.every_steps > 0

    @property
    def chosen_metrics(self) -> tuple[str, ...]:
        """The metrics computed: as listed, or (``metrics: null``) every one the files allow."""
        if self.metrics is not None:
            return self.metrics
        allowed = ("fid", "kid") if self.inception is not None else ()
        return allowed + (("miou",) if self.segmenter is not None or self.oracle else ())

    @property
    def value_names(self) -> tuple[str, ...]:
        """The keys an evaluation reports: fid, kid, kid_std, miou, pixel_accuracy (those chosen)."""
        return tuple(name for metric in self.chosen_metrics for name in EVAL_VALUES[metric])


def _metric_list(value: Any, key: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ValueError(f"{key} has a wrong value {value!r}; expected a list of {', '.join(EVAL_METRICS)}, or null")
    for item in value:
        if item not in EVAL_METRICS or not isinstance(item, str):
            raise ValueError(f"{key} has an unknown metric {item!r}; expected some of {', '.join(EVAL_METRICS)}")
    require(len(set(value)) == len(value), f"{key} lists a metric twice: {list(value)}")
    require(len(value) > 0, f"{key} is empty; list some of {', '.join(EVAL_METRICS)}, or null for what the files allow")
    return tuple(value)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The whole training job. Build with :func:`load_train_config` or :meth:`from_dict`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig
    optim: OptimConfig = field(default_factory=OptimConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    storage: StorageConfig
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        check_fields(self, "")
        weights = self.loss.vgg_weights
        if weights is not None and absolute(weights) != weights:
            # LossConfig lives in spade_core and stays as given; the workers need an absolute path.
            object.__setattr__(self, "loss", dataclasses.replace(self.loss, vgg_weights=absolute(weights)))
        workers = self.scaling.num_workers
        require(
            self.data.batch_size % workers == 0,
            f"data.batch_size ({self.data.batch_size}) must be divisible by scaling.num_workers ({workers}): "
            "it is the global batch, split equally over the workers",
        )
        self._check_image_size()
        self._check_eval()

    def _check_eval(self) -> None:
        ev, best = self.eval, self.checkpoint.best_by
        if best is not None:
            require(
                ev.enabled,
                f"checkpoint.best_by is {best!r} but eval.every_steps is 0: the best model is chosen by the "
                "evaluation during training, so turn it on",
            )
            require(
                best in ev.chosen_metrics,
                f"checkpoint.best_by is {best!r} but eval computes only {', '.join(ev.chosen_metrics)}: list it in "
                "eval.metrics (fid and kid need eval.inception, miou eval.segmenter or eval.oracle)",
            )
        require(
            not ev.oracle or self.model.labels.dataset == "ade20k",
            f"eval.oracle labels the synthetic ADE20K-layout scenes; model.labels.dataset is {self.model.labels.dataset!r}",
        )

    def _check_image_size(self) -> None:
        pre, gen = self.data.preprocess, self.model.generator
        require(
            pre.crop_size == gen.crop_size,
            f"data.preprocess.crop_size ({pre.crop_size}) must equal model.generator.crop_size ({gen.crop_size})",
        )
        # Only these modes give every image the same size; for the others it depends on the
        # input, and the loop finds a mismatch at the first batch.
        if pre.mode != "fixed" and "crop" not in pre.mode:
            return
        want = output_size(pre, (pre.crop_size, pre.crop_size))
        require(
            gen.output_size == want,
            f"model.generator makes {gen.output_size[0]}x{gen.output_size[1]} (height x width) images "
            f"(crop_size {gen.crop_size}, aspect_ratio {gen.aspect_ratio}, {gen.num_upsamplings} upsamplings) "
            f"but data.preprocess mode {pre.mode!r} gives {want[0]}x{want[1]}: use a crop_size divisible by "
            f"{2 ** gen.num_upsamplings} and matching aspect ratios",
        )

    @property
    def worker_batch_size(self) -> int:
        """The batch each worker trains on per step."""
        return self.data.batch_size // self.scaling.num_workers

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts, lists and scalars: ``TrainConfig.from_dict(c.to_dict()) == c``."""
        out = dataclasses.asdict(self)
        if out["eval"]["metrics"] is not None:
            out["eval"]["metrics"] = list(out["eval"]["metrics"])  # YAML has lists, not tuples
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Build and validate; unknown keys and bad values are ValueErrors naming the dotted key."""
        return build(cls, data, "", builders={EvalConfig: _build_eval})


# ---------------------------------------------------------------------------------------
# Loading, overrides, dumping


def load_train_config(path: str | os.PathLike[str], overrides: Iterable[str] = ()) -> TrainConfig:
    """Read a YAML config, apply ``key=value`` overrides (dotted keys), and validate.

    Raises ``ValueError`` naming the file and the offending key; a missing file raises
    ``FileNotFoundError``.
    """
    text = Path(path).read_text(encoding="utf-8")
    try:
        return TrainConfig.from_dict(apply_overrides(load_yaml(text), overrides))
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A copy of the raw config ``data`` with ``key=value`` overrides applied in order
    (see :func:`spade_core.configtools.apply_overrides`)."""
    return configtools.apply_overrides(data, overrides, TrainConfig)


def dump_yaml(config: TrainConfig, path: str | os.PathLike[str] | None = None) -> str:
    """The config as YAML (every key, defaults included); also written to ``path`` if given.

    :func:`load_train_config` reads it back to an equal config.
    """
    text = dump_yaml_text(config.to_dict())
    if path is not None:
        Path(path).write_text(text, encoding="utf-8")
    return text


# ---------------------------------------------------------------------------------------
# Building and checking dataclasses from raw mappings


def _build_eval(data: Mapping[str, Any], where: str) -> EvalConfig:
    # configtools reads scalars and mappings; EvalConfig checks its list of metrics itself
    reject_unknown(data, type_hints(EvalConfig), where)
    return EvalConfig(**dict(data))


# ---------------------------------------------------------------------------------------
# CLI: check a config and print it resolved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train_job.config", description="Validate a training config and print it with every default filled in."
    )
    parser.add_argument("config", help="YAML file, e.g. cluster/configs/ade20k.yaml")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a dotted key, e.g. --set optim.lr=1e-4 (repeatable)",
    )
    args = parser.parse_args(argv)
    try:
        config = load_train_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(dump_yaml(config))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
