"""The model deployments: ``SpadeGenerator`` and ``StyleEncoder``, batched with ``@serve.batch``.

Each replica loads the checkpoint named by its ``user_config`` (``{"checkpoint": ...}``),
so a Serve config change of that key reaches running replicas through ``reconfigure``:
the new weights load beside the old ones, then one assignment swaps them; batches in
flight finish on the model they started with and no request is dropped.

Requests are checked one by one before they join a batch, so a bad one fails alone.
The forward pass runs in a worker thread: the event loop keeps taking requests (the next
batch fills meanwhile) and answering health checks, which run a tiny inference when the
replica has been idle and fail when a batch has been stuck past the timeout.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from ray import serve

import spade_core
from spade_core.precision import dtype_of
from spade_core.model import NO_STYLE_INPUT, resize_ids
from spade_core.preprocess import to_uint8, to_unit_range
from spade_core.runs import Select

from .checkpoints import load_model
from .config import DEFAULT_MODEL, ReplicaSettings  # DEFAULT_MODEL: the model of a single-checkpoint user_config
from .images import resize_rgb
from .metrics import series

logger = logging.getLogger("ray.serve")



class InputError(ValueError):
    """A request the loaded model cannot take (the ingress answers 400 with its message)."""


Location = tuple[str, Select]  # (checkpoint, select) as user_config gives them


@dataclass
class Loaded:
    """One loaded checkpoint: swapped as a whole."""

    model: spade_core.SpadeModel
    identity: str
    location: Location
    name: str


def model_table(user_config: dict[str, Any], current: dict[str, Location]) -> dict[str, Location]:
    """name -> location from a user_config: ``{"models": [{name, checkpoint, select}, ...]}``, or
    ``{"checkpoint", "select"}``, which (re)places the first model (a single-model app's rollout)."""
    if "models" in user_config:
        return {m["name"]: (m["checkpoint"], m.get("select", "latest")) for m in user_config["models"]}
    location = (user_config["checkpoint"], user_config.get("select", "latest"))
    first = next(iter(current), DEFAULT_MODEL)
    return {**current, first: location}


def model_id(name: str, location: Location) -> str:
    """Serve's multiplexed model id: the name plus a digest of where its weights are, so that a
    rollout of a new checkpoint under the same name is another id (the old one ages out of the
    replicas' caches) and no replica keeps answering with weights it loaded before."""
    return f"{name}@{hashlib.sha256(repr(location).encode()).hexdigest()[:10]}"


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but this replica sees no GPU (set num_gpus)")
    return device


class _ModelReplica:
    """What both deployments share: the served models, loading and swapping them, batching
    knobs, health, metrics.

    The models (``model_table``) are multiplexed with ``@serve.multiplexed``: a replica loads a
    model when a request for it comes, holds at most ``max_models`` and unloads the least
    recently used; Serve routes a request to a replica that holds its model when one does."""

    deployment = ""

    def __init__(self, settings: ReplicaSettings) -> None:
        self.settings = settings
        self.device = pick_device(settings.device)
        self.table: dict[str, Location] = {}  # the models served, the default first
        self.load_errors: dict[str, str] = {}  # the last rollout's failures, by model (an older one serves on)
        self._ready: dict[str, Loaded] = {}  # loaded by reconfigure, handed to the first request
        self._probed: Loaded | None = None  # the model the idle health check runs (the last one used)
        self._lock = threading.Lock()
        self._busy_since: float | None = None
        self._last_ok = 0.0
        self.metrics = series()
        self.metrics["replicas"].set(1, tags={"deployment": self.deployment})
        self._set_batching(dataclasses.asdict(settings.batching))

        async def load(model_id: str) -> Loaded:  # a plain function: Serve keeps its cache on it
            return await self._load_id(model_id)

        self.get_model = serve.multiplexed(max_num_models_per_replica=settings.max_models)(load)

    # --- configuration ------------------------------------------------------------------

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        if "batching" in user_config:
            self._set_batching(user_config["batching"])
        starting = not self.table
        accepted: dict[str, Location] = {}
        for i, (name, location) in enumerate(model_table(user_config, self.table).items()):
            if self.table.get(name) == location:
                accepted[name] = location
                continue
            try:  # every new checkpoint loads once here: a broken one never replaces a working one
                loaded = await asyncio.to_thread(self._load, name, location)
            except Exception as exc:
                self.metrics["load_failures"].inc(tags={"deployment": self.deployment, "model": name})
                if starting:
                    raise  # nothing to serve: the replica must not start
                # A broken rollout (missing file, truncated weights, another architecture) must not
                # take down a replica that serves: keep the old model, say so in the log and in info().
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""  # torch lists every mismatched tensor
                self.load_errors[name] = (f"checkpoint {location[0]} ({location[1]}) failed to load: "
                                          f"{type(exc).__name__}: {reason[:300]}")
                logger.error("%s; model %s %s", self.load_errors[name], name,
                             "keeps its previous checkpoint" if name in self.table else "is not served")
                if name in self.table:
                    accepted[name] = self.table[name]
                continue
            self.load_errors.pop(name, None)
            accepted[name] = location
            self.metrics["loads"].inc(tags={"deployment": self.deployment, "model": name})
            if i == 0:  # the default model stays loaded, ready for the first request; the others load when asked for
                self._ready = {model_id(name, location): loaded}
                self._probed = loaded
        self.table = accepted  # the swap: batches that started keep their reference to the old model

    async def _load_id(self, requested: str) -> Loaded:
        name = requested.rpartition("@")[0] or requested
        if name not in self.table:
            raise InputError(f"no model named {name!r}; this app serves {', '.join(self.table)}")
        location = self.table[name]  # an id of an older rollout gets today's checkpoint
        ready = self._ready.pop(model_id(name, location), None)
        if ready is not None:
            return ready
        loaded = await asyncio.to_thread(self._load, name, location)
        self.metrics["loads"].inc(tags={"deployment": self.deployment, "model": name})
        return loaded

    def _load(self, name: str, location: Location) -> Loaded:
        model, identity = load_model(location[0], device=self.device, select=location[1])
        self.prepare(model)
        return Loaded(model=model, identity=identity, location=location, name=name)

    def prepare(self, model: spade_core.SpadeModel) -> None:
        """Per-deployment set-up of a freshly loaded model (fast path, dtype)."""

    def _set_batching(self, batching: dict[str, Any]) -> None:
        self.batched.set_max_batch_size(int(batching["max_batch_size"]))
        self.batched.set_batch_wait_timeout_s(float(batching["batch_wait_timeout_s"]))

    def default_id(self) -> str:
        if not self.table:
            raise RuntimeError("no model loaded yet")
        name, location = next(iter(self.table.items()))
        return model_id(name, location)

    async def current(self) -> Loaded:
        """The model this request names (Serve's multiplexed model id), else the default."""
        return await self.get_model(serve.get_multiplexed_model_id() or self.default_id())

    async def models(self) -> dict[str, Any]:
        """The models served: what the ingress lists and routes by."""
        return {"models": [{"name": n, "id": model_id(n, loc), "checkpoint": loc[0], "select": loc[1],
                            "load_error": self.load_errors.get(n)} for n, loc in self.table.items()],
                "failed": {n: e for n, e in self.load_errors.items() if n not in self.table}}

    # --- running batches --------------------------------------------------------------------

    async def run_batch(self, fn: Any, items: list[Any]) -> Any:
        """Run ``fn(items)`` in a thread with metrics and stuck-batch tracking."""
        start = time.monotonic()
        tags = {"deployment": self.deployment, "model": items[0].loaded.name}  # a batch is of one model (Serve splits them)
        self._probed = items[0].loaded
        for item in items:
            item.started = start
            self.metrics["queue_wait"].observe(start - item.arrived, tags=tags)
        self.metrics["batch_size"].observe(len(items), tags=tags)
        self._busy_since = start
        try:
            out = await asyncio.to_thread(self._locked, fn, items)
        finally:
            self._busy_since = None
        self._last_ok = time.monotonic()
        self.metrics["inference"].observe(self._last_ok - start, tags=tags)
        self.metrics["computed"].inc(len(items), tags=tags)
        return out

    async def batched_or_cancelled(self, item: Any) -> Any:
        """``await self.batched(item)``, counting a request whose caller went away (a client that
        hung up: Serve cancels its calls) by whether its batch had started. Serve's batcher
        leaves cancelled requests out of the next batch, so a "queued" one cost no forward pass."""
        try:
            return await self.batched(item)
        except asyncio.CancelledError:
            stage = "queued" if item.started is None else "running"
            self.metrics["cancelled"].inc(tags={"deployment": self.deployment, "model": item.loaded.name, "stage": stage})
            raise

    def _locked(self, fn: Any, items: list[Any]) -> Any:
        with self._lock, torch.inference_mode():  # one forward pass at a time per replica
            return fn(items)

    async def check_health(self) -> None:
        """Called by Serve every health_check_period_s; raising (or timing out) replaces the replica."""
        if not self.table:
            raise RuntimeError("no model loaded")
        self.metrics["replicas"].set(1, tags={"deployment": self.deployment})  # refreshed: gauges set once can go stale
        timeout = self.settings.health_check_timeout_s
        if self._busy_since is not None and time.monotonic() - self._busy_since > timeout:
            raise RuntimeError(f"a batch has been running for more than {timeout:g} s")
        if time.monotonic() - self._last_ok > self.settings.health_check_period_s:
            # Idle: prove the model used last still runs (not the default: loading it would evict
            # the model in use when the replica holds one model at a time).
            loaded = self._probed
            if loaded is not None:
                await asyncio.to_thread(self._locked, lambda _: self.probe(loaded.model), [])
            self._last_ok = time.monotonic()

    def probe(self, model: spade_core.SpadeModel) -> None:
        raise NotImplementedError


@dataclass
class SynthesisItem:
    labels: torch.Tensor  # (H, W) int64 raw label ids at the model's size, checked
    z: torch.Tensor | None
    instance: torch.Tensor | None  # (H, W) int64 instance ids at the model's size
    arrived: float
    loaded: Loaded  # the model it was checked against and is drawn by
    started: float | None = None  # when its batch's forward pass began


@serve.deployment(name="SpadeGenerator")
class SpadeGenerator(_ModelReplica):
    """Label map (+ style code) -> image, through spade_core's fast inference path."""

    deployment = "SpadeGenerator"

    def prepare(self, model: spade_core.SpadeModel) -> None:
        model.enable_fast_path(dtype=dtype_of(self.settings.precision), compile=self.settings.compile)

    async def info(self) -> dict[str, Any]:
        """What the ingress needs to check requests: the model config and checkpoint identity."""
        loaded = await self.current()
        return {"config": loaded.model.config.to_dict(), "identity": loaded.identity, "name": loaded.name, "device": self.device,
                "precision": self.settings.precision, "pid": os.getpid(), "load_error": self.load_errors.get(loaded.name)}

    async def synthesize(
        self,
        labels: np.ndarray,
        *,
        instance: np.ndarray | None = None,
        mu: np.ndarray | None = None,
        logvar: np.ndarray | None = None,
        seed: int | None = None,
    ) -> dict[str, Any]:
        """(H, W) raw label ids (any size) [+ instance ids (H, W)] [+ a style code (mu, logvar)]
        [+ seed] -> {"image": (H, W, 3) uint8, "seed": the seed z was drawn from or None, ...}.

        The model checks the inputs and turns the seed into z (``SpadeModel.check_inputs`` /
        ``sample_z``), as ``synthesize`` does in a notebook: the same seed, the same image. A
        VAE request without a seed gets a fresh one, returned so the draw can be repeated."""
        arrived = time.monotonic()
        loaded = await self.current()
        vae = loaded.model.config.generator.z_dim is not None
        if vae and mu is None and seed is None:
            seed = secrets.randbits(53)  # exact as a JSON number, like the API's own seeds
        # z drawn from a seed: N(0, I), or around a style's mu (a style without a seed is its mu)
        drawn = vae and seed is not None and (mu is None or logvar is not None)
        item = self._check(loaded, labels, instance, mu, logvar, seed, arrived)
        image, batch_size = await self.batched_or_cancelled(item)
        return {"image": image, "identity": loaded.identity, "batch_size": batch_size, "seed": seed if drawn else None}

    def _check(self, loaded: Loaded, labels: Any, instance: Any, mu: Any, logvar: Any, seed: int | None,
               arrived: float) -> SynthesisItem:
        model = loaded.model
        ids = _ids(labels, "labels")
        inst = _ids(instance, "instance") if instance is not None else None
        try:
            z = model.sample_z(1, seed=seed, mu=_code(mu), logvar=_code(logvar))
            model.check_inputs(ids, z=z, instance=inst)
        except ValueError as exc:
            raise InputError(str(exc)) from exc
        size = model.config.generator.output_size  # one size per batch: resized here, not in the forward pass
        return SynthesisItem(labels=resize_ids(ids[0], size), z=None if z is None else z[0],
                             instance=None if inst is None else resize_ids(inst[0], size), arrived=arrived, loaded=loaded)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def batched(self, items: list[SynthesisItem]) -> list[tuple[np.ndarray, int]]:
        model = items[0].loaded.model  # one model per batch (Serve batches by model id), even if a swap lands meanwhile
        images = await self.run_batch(lambda batch: self._forward(model, batch), items)
        return [(image, len(items)) for image in images]

    def _forward(self, model: spade_core.SpadeModel, items: list[SynthesisItem]) -> np.ndarray:
        z = torch.stack([i.z for i in items]) if items[0].z is not None else None
        instance = torch.stack([i.instance for i in items]) if items[0].instance is not None else None
        return photos(model.synthesize(torch.stack([i.labels for i in items]), z=z, instance=instance))

    def probe(self, model: spade_core.SpadeModel) -> None:
        cfg = model.config
        h, w = cfg.generator.output_size
        item = SynthesisItem(
            labels=torch.zeros(h, w, dtype=torch.long),
            z=torch.zeros(cfg.generator.z_dim) if cfg.generator.z_dim else None,
            instance=torch.zeros(h, w, dtype=torch.long) if cfg.labels.instance_edges else None,
            arrived=time.monotonic(), loaded=None,  # type: ignore[arg-type]  # never batched
        )
        out = self._forward(model, [item])
        if out.shape != (1, h, w, 3):
            raise RuntimeError(f"health probe produced {out.shape}")


def _ids(value: Any, name: str) -> torch.Tensor:
    """An (H, W) integer id map from the ingress as the model's (1, H, W) int64 input."""
    if not isinstance(value, np.ndarray) or value.ndim != 2 or value.dtype.kind not in "iu":
        raise InputError(f"{name} must be an (H, W) integer array of ids")
    return torch.from_numpy(value.astype(np.int64))[None]


def _code(value: Any) -> torch.Tensor | None:
    """A style code vector from the ingress as the model's (1, z_dim) input."""
    if value is None:
        return None
    if not isinstance(value, np.ndarray) or value.ndim != 1 or value.dtype.kind != "f":
        raise InputError("a style code must be a vector of numbers")
    return torch.from_numpy(value.astype(np.float32))[None]


def photos(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, what the ingress encodes."""
    return to_uint8(images).permute(0, 2, 3, 1).contiguous().numpy()


@dataclass
class StyleItem:
    image: torch.Tensor  # (3, H, W) in [-1, 1]
    arrived: float
    loaded: Loaded
    started: float | None = None


@serve.deployment(name="StyleEncoder")
class StyleEncoder(_ModelReplica):
    """Style image -> (mu, logvar) of the VAE encoder."""

    deployment = "StyleEncoder"

    async def encode(self, rgb: np.ndarray) -> dict[str, Any]:
        """(H, W, 3) uint8 style image -> {"mu": [...], "logvar": [...], "identity": ...}."""
        arrived = time.monotonic()
        loaded = await self.current()
        if loaded.model.encoder is None:
            raise InputError(NO_STYLE_INPUT)
        if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise InputError("style must be an (H, W, 3) uint8 RGB array")
        rgb = resize_rgb(rgb, loaded.model.config.generator.output_size)
        image = to_unit_range(torch.from_numpy(np.array(rgb)).permute(2, 0, 1))
        mu, logvar = await self.batched_or_cancelled(StyleItem(image=image, arrived=arrived, loaded=loaded))
        return {"mu": mu, "logvar": logvar, "identity": loaded.identity}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def batched(self, items: list[StyleItem]) -> list[tuple[list[float], list[float]]]:
        model = items[0].loaded.model
        return await self.run_batch(lambda batch: self._forward(model, batch), items)

    def _forward(self, model: spade_core.SpadeModel, items: list[StyleItem]) -> list[tuple[list[float], list[float]]]:
        mu, logvar = model.encode(torch.stack([i.image for i in items]))
        return [(m.tolist(), v.tolist()) for m, v in zip(mu.float().cpu(), logvar.float().cpu())]

    def probe(self, model: spade_core.SpadeModel) -> None:
        if model.encoder is None:
            return  # a model without encoder among several: nothing for this deployment to prove
        h, w = model.config.generator.output_size
        mu, _ = model.encode(torch.zeros(1, 3, h, w))
        if not torch.isfinite(mu).all():
            raise RuntimeError("health probe produced a non-finite style code")
