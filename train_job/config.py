"""The training job's config: one typed, validated YAML file (presets in ``cluster/configs/``).

    config = load_train_config("cluster/configs/tiny.yaml", ["optim.lr=1e-4", "scaling.num_workers=1"])

Sections: ``model`` (:class:`spade_core.config.ModelConfig`, the architecture that travels
with the weights), ``loss`` (:class:`spade_core.losses.LossConfig`), ``data``, ``optim``,
``scaling``, ``storage``, ``checkpoint``, ``logging``. Everything is a frozen dataclass and
checked once, here, so a bad value fails before a cluster is asked for anything:

* unknown keys, wrong types, bad literals and out-of-range values are ValueErrors that name
  the full dotted key (``optim.lr must be > 0, got -1``);
* cross-section rules: ``data.batch_size`` is the global batch and must split equally over
  ``scaling.num_workers``; ``data.preprocess.crop_size`` must equal
  ``model.generator.crop_size``, and for the fixed-size preprocessing modes the generator
  must produce exactly the image size the pipeline delivers;
* relative local paths (``data.shards``, ``storage.path``, ``storage.resume_from``,
  ``loss.vgg_weights``) are made absolute against the current directory at load time:
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
import re
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
    check_tree,
    dump_yaml_text,
    join_key,
    load_yaml,
    require,
)
from spade_core.losses import LossConfig
from spade_core.preprocess import PreprocessConfig, output_size

Precision = Literal["fp32", "bf16", "fp16"]
PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]

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
        object.__setattr__(self, "shards", _absolute(self.shards))
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
        object.__setattr__(self, "path", _absolute(self.path))
        require(
            self.name not in ("", ".", "..") and "/" not in self.name and "\\" not in self.name,
            f"storage.name must be a plain directory name (no '/'), got {self.name!r}",
        )
        if self.resume_from is not None:
            require(self.resume_from != "", "storage.resume_from must be a path, a URI or null, got ''")
            object.__setattr__(self, "resume_from", _absolute(self.resume_from))


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    every_steps: int = 1000  # global steps between checkpoints; 0: only at epoch ends
    keep: int = 3  # newest checkpoints kept (ray.train.CheckpointConfig.num_to_keep)
    at_epoch_end: bool = True

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

    def __post_init__(self) -> None:
        check_fields(self, "")
        weights = self.loss.vgg_weights
        if weights is not None and _absolute(weights) != weights:
            # LossConfig lives in spade_core and stays as given; the workers need an absolute path.
            object.__setattr__(self, "loss", dataclasses.replace(self.loss, vgg_weights=_absolute(weights)))
        workers = self.scaling.num_workers
        require(
            self.data.batch_size % workers == 0,
            f"data.batch_size ({self.data.batch_size}) must be divisible by scaling.num_workers ({workers}): "
            "it is the global batch, split equally over the workers",
        )
        self._check_image_size()

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
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Build and validate; unknown keys and bad values are ValueErrors naming the dotted key."""
        return build(cls, data, "", builders={ModelConfig: _build_model})


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


def _build_model(data: Mapping[str, Any], where: str) -> ModelConfig:
    # Check keys and types here first, for messages with the full dotted key; then let
    # ModelConfig.from_dict build it, so the model config reads exactly as config.json does.
    check_tree(data, ModelConfig, where)
    try:
        return ModelConfig.from_dict(dict(data))
    except ValueError as exc:
        raise ValueError(_qualify_model(str(exc), where)) from exc


# spade_core's messages name keys relative to the model config ('generator.ngf', and
# 'spade.norm' for generator.spade); prefix them so they read as keys of this file.
_MODEL_PARTS = re.compile(r"(?<![\w.'\"])(labels|generator|encoder|discriminator|spade)(?=[.:\s]|$)")


def _qualify_model(message: str, where: str) -> str:
    def full(m: re.Match[str]) -> str:
        return join_key(where, "generator.spade" if m.group(1) == "spade" else m.group(1))

    return _MODEL_PARTS.sub(full, message)


def _absolute(path: str) -> str:
    """Local paths made absolute (``~`` expanded) against the current directory; URIs as given."""
    if "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


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
