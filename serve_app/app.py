"""``build_app(args)``: the Serve application (the import path ``serve_app.app:build_app``).

The args are a :class:`~serve_app.config.ServeConfig` mapping. The checkpoint's config is
read here (no weights) to decide whether a ``StyleEncoder`` is deployed; each model
deployment gets ``user_config = {"checkpoint": args.checkpoint, "select": args.select}``, or with
several models ``{"models": [{"name", "checkpoint", "select"}, ...]}`` (Serve's model
multiplexing: requests name their model; see serve_app.deployments).

Rolling out a new checkpoint in place: in the Serve config (``serve deploy``, a
RayService's ``serveConfigV2``) leave ``args`` as they are and set
``deployments: [{name: SpadeGenerator, user_config: {checkpoint: NEW}}]`` (``select: best`` to
take a run's best checkpoint; and the same for
``StyleEncoder``): Serve calls ``reconfigure`` on the running replicas, which load the new
weights and swap them between batches. Changing ``args`` (or ``serve.run`` from Python,
which always versions anew) replaces the replicas instead, also without dropping requests
but with a cold start.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from spade_core.checkpoint import read_config

from .checkpoints import resolve_checkpoint
from .config import ServeConfig
from .deployments import SpadeGenerator, StyleEncoder
from .ingress import SpadeIngress


def build_app(args: dict[str, Any] | ServeConfig) -> Application:
    config = args if isinstance(args, ServeConfig) else ServeConfig.from_dict(args)
    # An encoder deployment when any served model is a VAE (it answers 400 for the others).
    use_vae = any(read_config(resolve_checkpoint(m.checkpoint, m.select)).use_vae for m in config.model_entries())
    # The checkpoint is not among the replicas' init args but in their user_config, so a
    # change of it alone reconfigures running replicas instead of replacing them.
    user_config = config.user_config()
    generator = SpadeGenerator.options(**config.generator.ray_options(), user_config=user_config).bind(
        config.replica_settings(config.generator))
    encoder = None
    if use_vae:
        encoder = StyleEncoder.options(**config.encoder.ray_options(), user_config=user_config).bind(
            config.replica_settings(config.encoder))
    return SpadeIngress.options(**config.ingress.ray_options()).bind(generator, encoder, config.api_settings())
