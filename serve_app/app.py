"""``build_app(args)``: the Serve application (the import path ``serve_app.app:build_app``).

The args are a :class:`~serve_app.config.ServeConfig` mapping. The checkpoint's config is
read here (no weights) to decide whether a ``StyleEncoder`` is deployed; each model
deployment gets ``user_config = {"checkpoint": ...}``, which a later Serve config change can
point at a new checkpoint (``reconfigure``, no restart).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ray.serve import Application

from spade_core.checkpoint import read_config

from .checkpoints import resolve_checkpoint
from .config import ServeConfig
from .deployments import SpadeGenerator, StyleEncoder
from .ingress import SpadeIngress


def build_app(args: dict[str, Any] | ServeConfig) -> Application:
    config = args if isinstance(args, ServeConfig) else ServeConfig.from_dict(args)
    model_config = read_config(resolve_checkpoint(config.checkpoint))
    # The checkpoint is not among the replicas' init args but in their user_config, so a
    # change of it alone reconfigures running replicas instead of replacing them.
    replica_options = {
        "device": config.device,
        "precision": config.precision,
        "compile": config.compile,
        "batching": {"max_batch_size": config.batching.max_batch_size, "batch_wait_timeout_s": config.batching.batch_wait_timeout_s},
    }
    user_config = {"checkpoint": config.checkpoint}

    def options(section: Any) -> dict[str, Any]:
        health = {"health_check_period_s": section.health_check_period_s, "health_check_timeout_s": section.health_check_timeout_s}
        return {**replica_options, **health}

    generator_args = options(config.generator)
    generator = SpadeGenerator.options(
        **config.generator.ray_options(), user_config=user_config, version=_version(generator_args, config.generator)
    ).bind(generator_args)
    encoder = None
    if model_config.use_vae:
        encoder_args = options(config.encoder)
        encoder = StyleEncoder.options(
            **config.encoder.ray_options(), user_config=user_config, version=_version(encoder_args, config.encoder)
        ).bind(encoder_args)
    api = config.api_settings()
    return SpadeIngress.options(**config.ingress.ray_options(), version=_version(api, config.ingress)).bind(generator, encoder, api)


def _version(init_args: dict[str, Any], section: Any) -> str:
    """A deployment version that changes with its init args and options but not with the
    checkpoint: Serve then treats a new checkpoint as a light update (``reconfigure``)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        code = version("spade-ray")
    except PackageNotFoundError:
        code = "dev"
    text = json.dumps([code, init_args, section.ray_options()], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
