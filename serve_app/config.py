"""The serving app's config: the ``args`` of the Serve application (``serve_app.app:build_app``).

    checkpoint: out/runs/tiny          # a checkpoint dir (ours or NVlabs'), a training run dir, or a URI
    # or several models, served at once through Ray Serve's model multiplexing:
    # models: [{name: ade20k, checkpoint: out/runs/ade20k}, {name: coco, checkpoint: s3://.../coco}]
    precision: bf16
    batching: {max_batch_size: 8, batch_wait_timeout_s: 0.01}
    generator: {num_gpus: 1, autoscaling: {min_replicas: 1, max_replicas: 4}}

The same keys come from a Serve config YAML (``cluster/serve/*.yaml``, under
``applications[].args``), from ``spade-serve --config`` or from its flags. Unknown keys and
bad values are ValueErrors naming the dotted key, before any replica starts.

Imports no Ray.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from spade_core import configtools
from spade_core.configtools import build, check_fields, load_yaml, require
from spade_core.locations import absolute
from spade_core.precision import Precision
from spade_core.runs import Select

Device = Literal["auto", "cpu", "cuda"]
ImageFormat = Literal["png", "jpeg", "webp"]


@dataclass(frozen=True, kw_only=True)
class AutoscalingConfig:
    """Ray Serve's ``autoscaling_config`` (the keys we expose; see Ray's docs for their meaning)."""

    min_replicas: int = 1
    max_replicas: int = 1
    initial_replicas: int | None = None
    # Requests per replica the autoscaler aims at. For the generator keep it near
    # batching.max_batch_size, so a replica is added when its batches are full.
    target_ongoing_requests: float = 8.0
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 300.0
    look_back_period_s: float = 30.0

    def __post_init__(self) -> None:
        check_fields(self, "autoscaling")
        require(self.min_replicas >= 0, f"autoscaling.min_replicas must be >= 0, got {self.min_replicas}")
        require(
            self.max_replicas >= max(1, self.min_replicas),
            f"autoscaling.max_replicas must be >= 1 and >= min_replicas ({self.min_replicas}), got {self.max_replicas}",
        )
        if self.initial_replicas is not None:
            require(
                self.min_replicas <= self.initial_replicas <= self.max_replicas,
                f"autoscaling.initial_replicas must lie in [min_replicas, max_replicas], got {self.initial_replicas}",
            )
        require(self.target_ongoing_requests > 0, "autoscaling.target_ongoing_requests must be > 0")
        for name in ("upscale_delay_s", "downscale_delay_s", "look_back_period_s"):
            require(getattr(self, name) >= 0, f"autoscaling.{name} must be >= 0, got {getattr(self, name)}")

    def to_ray(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True, kw_only=True)
class DeploymentConfig:
    """One deployment's replicas: resources, concurrency, autoscaling, health checks."""

    config_section: ClassVar[str] = "deployment"  # its messages' prefix, replaced by the field's key

    num_cpus: float = 1.0
    num_gpus: float = 0.0  # > 0: the replica runs on a GPU (device auto picks cuda there)
    memory_gb: float | None = None
    # Requests a replica holds at once. Ray's default of 5 would cap every batch at 5: the
    # generator needs at least batching.max_batch_size, the ingress enough for all of them.
    max_ongoing_requests: int = 16
    # Requests waiting for a replica beyond those; more get 503 + Retry-After. -1: unbounded.
    max_queued_requests: int = 64
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 30.0
    # How long a replica being stopped may finish its requests before it is killed. A replica
    # found unhealthy (hung) is stopped the same way: its requests wait this long, then fail
    # over to another replica (the ingress retries them).
    graceful_shutdown_timeout_s: float = 20.0

    def __post_init__(self) -> None:
        check_fields(self, "deployment")
        require(self.num_cpus >= 0, f"deployment.num_cpus must be >= 0, got {self.num_cpus}")
        require(self.num_gpus >= 0, f"deployment.num_gpus must be >= 0, got {self.num_gpus}")
        require(self.memory_gb is None or self.memory_gb > 0, "deployment.memory_gb must be > 0 or null")
        require(self.max_ongoing_requests >= 1, f"deployment.max_ongoing_requests must be >= 1, got {self.max_ongoing_requests}")
        require(
            self.max_queued_requests == -1 or self.max_queued_requests >= 0,
            f"deployment.max_queued_requests must be >= 0 or -1 (unbounded), got {self.max_queued_requests}",
        )
        require(self.health_check_period_s > 0, "deployment.health_check_period_s must be > 0")
        require(self.health_check_timeout_s > 0, "deployment.health_check_timeout_s must be > 0")
        require(self.graceful_shutdown_timeout_s >= 0, "deployment.graceful_shutdown_timeout_s must be >= 0")

    def ray_options(self) -> dict[str, Any]:
        """Keyword arguments for ``Deployment.options``."""
        actor: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory_gb is not None:
            actor["memory"] = int(self.memory_gb * 2**30)
        return {
            "ray_actor_options": actor,
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "autoscaling_config": self.autoscaling.to_ray(),
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
        }


@dataclass(frozen=True, kw_only=True)
class BatchingConfig:
    """``@serve.batch`` of the generator and the encoder: requests merged into one forward pass."""

    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.01  # how long a first request waits for others to join

    def __post_init__(self) -> None:
        check_fields(self, "batching")
        require(self.max_batch_size >= 1, f"batching.max_batch_size must be >= 1, got {self.max_batch_size}")
        require(self.batch_wait_timeout_s >= 0, f"batching.batch_wait_timeout_s must be >= 0, got {self.batch_wait_timeout_s}")


@dataclass(frozen=True, kw_only=True)
class LimitsConfig:
    """What one request may ask; beyond it the answer is a 4xx, never a crashed replica."""

    max_body_bytes: int = 16 * 2**20  # 413 beyond this (Ray Serve has no limit of its own)
    max_pixels: int = 4096 * 4096  # per uploaded image, checked before decoding (decompression bombs)
    max_output_side: int = 2048  # the largest width or height ``size`` may ask for
    request_timeout_s: float = 60.0  # 408 when a synthesis takes longer (queue wait included)
    retry_after_s: int = 1  # the Retry-After of a 503 when the queue is full

    def __post_init__(self) -> None:
        check_fields(self, "limits")
        for name in ("max_body_bytes", "max_pixels", "max_output_side", "retry_after_s"):
            require(getattr(self, name) >= 1, f"limits.{name} must be >= 1, got {getattr(self, name)}")
        require(self.request_timeout_s > 0, f"limits.request_timeout_s must be > 0, got {self.request_timeout_s}")


DEFAULT_MODEL = "default"  # the name of the one model of a config that gives ``checkpoint``
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True, kw_only=True)
class ModelEntry:
    """One served model: requests name it in their ``model`` field."""

    config_section: ClassVar[str] = "model"  # its messages' prefix, replaced by models[i]

    name: str
    checkpoint: str  # as ServeConfig.checkpoint
    select: Select = "latest"

    def __post_init__(self) -> None:
        check_fields(self, "model")
        require(bool(_MODEL_NAME.fullmatch(self.name)),
                f"model.name must be 1-64 letters, digits, '.', '_' or '-' (starting with a letter or digit), got {self.name!r}")
        require(self.checkpoint != "", "model.checkpoint must be a path or URI, got ''")
        object.__setattr__(self, "checkpoint", absolute(self.checkpoint))

    def user_config(self) -> dict[str, str]:
        return {"name": self.name, "checkpoint": self.checkpoint, "select": self.select}


@dataclass(frozen=True, kw_only=True)
class ApiSettings:
    """The ingress's part of the config (see :meth:`ServeConfig.api_settings`)."""

    limits: LimitsConfig = field(default_factory=LimitsConfig)
    auth_token_env: str | None = None
    default_format: ImageFormat = "png"
    jpeg_quality: int = 95

    def __post_init__(self) -> None:
        check_fields(self, "")



@dataclass(frozen=True, kw_only=True)
class ReplicaSettings:
    """What a model replica (SpadeGenerator, StyleEncoder) is built with: bound to its
    deployment as this typed object (:meth:`ServeConfig.replica_settings`). The checkpoint is
    not here but in the deployments' user_config, so a new one reconfigures running replicas."""

    device: Device
    precision: Precision
    compile: bool
    batching: BatchingConfig
    max_models: int
    health_check_period_s: float
    health_check_timeout_s: float


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """The whole app. Build with :func:`load_serve_config` or :meth:`from_dict`."""

    # A checkpoint directory (spade_core's config.json + safetensors, or NVlabs'
    # latest_net_*.pth + opt.txt), a training run directory (its newest checkpoint_* is
    # served, or its best/ with select: best), or a URI (s3://, gs://, file://) of either,
    # copied to a local cache. Or ``models`` instead, for several.
    checkpoint: str | None = None
    select: Select = "latest"  # of a training run: the newest checkpoint_*, or best/ (checkpoint.best_by)
    # Several models at once, the first the default. Each model replica holds at most
    # max_models_per_replica of them, the least recently used unloaded (Serve's multiplexing),
    # and Serve routes a request to a replica that holds its model when one does.
    models: tuple[ModelEntry, ...] = ()
    max_models_per_replica: int = 2
    device: Device = "auto"  # auto: cuda when the replica has a GPU, else cpu
    precision: Precision = "fp32"  # the fast path's compute dtype (bf16: ~10x on AMX CPUs and GPUs)
    compile: bool = False  # torch.compile the fast generator (slow first call per batch size)
    default_format: ImageFormat = "png"
    jpeg_quality: int = 95
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    # Name of an environment variable holding a bearer token; set: /v1/* require
    # "Authorization: Bearer <token>". The token itself never sits in a config file.
    auth_token_env: str | None = None
    generator: DeploymentConfig = field(default_factory=lambda: DeploymentConfig(max_ongoing_requests=16))
    encoder: DeploymentConfig = field(default_factory=lambda: DeploymentConfig(num_cpus=0.5, max_ongoing_requests=16))
    ingress: DeploymentConfig = field(
        default_factory=lambda: DeploymentConfig(
            num_cpus=0.5,
            max_ongoing_requests=256,
            max_queued_requests=256,
            autoscaling=AutoscalingConfig(target_ongoing_requests=64.0),
        )
    )

    def __post_init__(self) -> None:
        check_fields(self, "")
        require((self.checkpoint is None) != (not self.models),
                "give either checkpoint (one model) or models (a list of {name, checkpoint}), not both and not neither")
        require(self.checkpoint != "", "checkpoint must be a path or URI, got ''")
        if self.checkpoint is not None:
            object.__setattr__(self, "checkpoint", absolute(self.checkpoint))
        names = [m.name for m in self.models]
        repeated = sorted({n for n in names if names.count(n) > 1})
        require(not repeated, f"models: each name once, got {', '.join(repeated)} more than once")
        require(self.max_models_per_replica >= 1, f"max_models_per_replica must be >= 1, got {self.max_models_per_replica}")
        require(1 <= self.jpeg_quality <= 100, f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        require(
            self.generator.max_ongoing_requests >= self.batching.max_batch_size,
            f"generator.max_ongoing_requests ({self.generator.max_ongoing_requests}) must be >= "
            f"batching.max_batch_size ({self.batching.max_batch_size}), or batches can never fill",
        )
        require(
            self.auth_token_env is None or self.auth_token_env != "",
            "auth_token_env must name an environment variable or be null",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def model_entries(self) -> tuple[ModelEntry, ...]:
        """The served models, the default first (one named "default" for a ``checkpoint`` config)."""
        if self.models:
            return self.models
        assert self.checkpoint is not None
        return (ModelEntry(name=DEFAULT_MODEL, checkpoint=self.checkpoint, select=self.select),)

    def user_config(self) -> dict[str, Any]:
        """The model deployments' user_config. One model keeps the single-checkpoint form, so a
        rollout written for it (``user_config: {checkpoint: NEW}``) means the same as before."""
        if not self.models:
            return {"checkpoint": self.checkpoint, "select": self.select}
        return {"models": [m.user_config() for m in self.models]}

    def api_settings(self) -> ApiSettings:
        """What the HTTP ingress needs (no checkpoint: a new one must not restart it)."""
        return ApiSettings(limits=self.limits, auth_token_env=self.auth_token_env,
                           default_format=self.default_format, jpeg_quality=self.jpeg_quality)

    def replica_settings(self, deployment: DeploymentConfig) -> ReplicaSettings:
        """What a model deployment's replicas are built with (``deployment``: generator or encoder)."""
        return ReplicaSettings(device=self.device, precision=self.precision, compile=self.compile, batching=self.batching,
                               max_models=self.max_models_per_replica, health_check_period_s=deployment.health_check_period_s,
                               health_check_timeout_s=deployment.health_check_timeout_s)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ServeConfig:
        return build(cls, data, "")


def load_serve_config(path: str | os.PathLike[str] | None = None, overrides: Iterable[str] = (), **values: Any) -> ServeConfig:
    """A YAML file of app args (or nothing), then ``key=value`` overrides, then keyword values."""
    data: dict[str, Any] = {}
    where = str(path) if path is not None else "serve config"
    try:
        if path is not None:
            data = load_yaml(Path(path).read_text(encoding="utf-8"))
        data = configtools.apply_overrides(data, overrides, ServeConfig)
        data.update({k: v for k, v in values.items() if v is not None})
        return ServeConfig.from_dict(data)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc
