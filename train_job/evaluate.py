"""Evaluate a checkpoint on a prepared split through Ray Data: FID, KID, mIoU, pixel accuracy, a results page.

    open_shards (the manifest: split, count, labels)
    -> pipeline.build_dataset(train=False): one read task per shard, decode + the model's
       test-time preprocessing (:func:`~train_job.eval_inputs.eval_preprocess`: resize to the
       model's input size; no random crop, no flip)
    -> limit(N) with preserve_order: the split's first N pairs in shard (= key) order, every run
    -> map_batches(Evaluator): a fixed actor pool, one actor per GPU (``num_gpus=1``) or per
       CPU slot, each holding the generator, the FID Inception and the segmenter. Their files
       travel once through the object store (the exact bytes the driver hashed), so workers
       need none of the driver's paths. Per batch: generated images (VAE models: from the real
       image's style with z = mu, and from z ~ N(0, I) drawn per image from (seed, key)),
       Inception features of the real and each generated set, one confusion matrix per set,
       and the results page's images for the sampled keys. One output row per input batch.
    -> the driver: concatenates features (in key order), merges the confusion matrices,
       computes FID / KID / mIoU / pixel accuracy, writes ``OUT/eval.json``, ``OUT/index.html``
       and ``OUT/images/<set>/<key>.png`` (``label`` colourised, ``real``, each generated set;
       :mod:`train_job.eval_report`).

:func:`~train_job.eval_inputs.prepare_evaluation` checks every input and loads every file without
Ray (errors are :class:`~train_job.eval_inputs.EvalError`, one line each); :func:`run_evaluation`
(this module) needs Ray initialised; :func:`~train_job.eval_report.write_results` writes the
outputs. ``spade-eval run`` (``train_job.eval_cli``) chains them, as :func:`evaluate` does.
"""

from __future__ import annotations

import dataclasses
import io
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

import spade_core
from spade_core import seeds
from spade_core.metrics import (
    ConfusionMatrix,
    IdMapping,
    LabelSpace,
    activations,
    fid_from_statistics,
    kernel_inception_distance,
    load_fid_inception,
    load_segmenter,
    resize_predictions,
    statistics,
    to_unit_interval,
)
from spade_core.precision import dtype_of
from spade_core.preprocess import to_uint8, to_unit_range
from spade_core.semantics import classes_for, colorize

from .eval_inputs import LABEL, REAL, EvalError, EvalOptions, EvalPlan, EvalResult, prepare_evaluation
from .eval_report import write_results
from .progress import Progress


# ---------------------------------------------------------------------------------------
# The actor


def _write_temp(directory: str, name: str, data: bytes) -> Path:
    path = Path(directory) / name
    path.write_bytes(data)
    return path


class Evaluator:
    """Ray Data callable class: a batch of decoded pairs -> one row of features, confusion matrices, samples.

    ``payload``: the checkpoint's, Inception's and segmenter's file bytes (an ObjectRef or the
    dict itself). ``settings``: plain values (sets, dims, precision, seed, device, threads,
    sample keys, label space, the Inception sha256 the driver checked).
    """

    def __init__(self, payload: Any, settings: dict[str, Any]) -> None:
        if not isinstance(payload, dict):  # an ObjectRef that Ray Data passed through unresolved
            import ray

            payload = ray.get(payload)
        self.settings = settings
        self.device = torch.device(settings["device"])
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(settings["threads"])))
        elif not torch.cuda.is_available():
            raise RuntimeError("this evaluation actor was given a GPU, but torch sees no CUDA device")
        self.sets: tuple[str, ...] = tuple(settings["sets"])
        self.dims: int = settings["dims"]
        self.seed: int = settings["seed"]
        self.space = LabelSpace(settings["num_classes"], tuple(settings["ignore_ids"]))
        self.sample_keys = set(settings["sample_keys"])
        with tempfile.TemporaryDirectory(prefix="spade-eval-") as tmp:
            ckpt = Path(tmp) / "checkpoint"
            ckpt.mkdir()
            for name, data in payload["checkpoint"].items():
                _write_temp(str(ckpt), name, data)
            self.model = spade_core.load_checkpoint(ckpt, device=self.device)
            self.inception = None
            if payload["inception"] is not None:
                self.inception = load_fid_inception(
                    _write_temp(tmp, "inception.pth", payload["inception"]), device=self.device, allow_any_inception=True
                )
                if self.inception.weights_sha256 != settings["inception_sha256"]:
                    raise RuntimeError("the Inception weights the actor received differ from those the driver checked")
            self.segmenter: Any = None
            if settings["segmenter"] == "oracle":
                from .synthetic.oracle import default_oracle

                self.segmenter = default_oracle()
            elif payload["segmenter"] is not None:
                name, data = payload["segmenter"]
                file = _write_temp(tmp, name, data)
                self.segmenter = load_segmenter(file, IdMapping(offset=settings["id_offset"]), device=self.device)
        self.model.enable_fast_path(dtype=dtype_of(settings["precision"]))  # same function, fewer FLOPs (fp32: ~1e-6 from the plain path)
        self.classes = self.model.classes
        self.z_dim = self.model.config.generator.z_dim

    def generate(
        self, labels: torch.Tensor, real: torch.Tensor, keys: Sequence[str], instance: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """Each generated set of a batch as uint8 (B, 3, H, W): labels raw ids (B, H, W), real uint8 (B, 3, H, W)."""
        model = self.model
        if model.encoder is None:
            return {"generated": to_uint8(model.synthesize(labels, instance=instance))}
        style = to_unit_range(real).to(self.device)
        # one code per image from (seed, key), as the pipeline seeds per-example choices: batch-independent
        z = np.stack([seeds.rng(self.seed, k).standard_normal(self.z_dim, dtype=np.float32)
                      for k in keys])
        return {
            "style": to_uint8(model.synthesize(labels, style=style, instance=instance)),
            "random": to_uint8(model.synthesize(labels, z=torch.from_numpy(z), instance=instance)),
        }

    def confusion(self, images: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
        """The segmenter's confusion matrix of uint8 images (B, 3, H, W) against their label maps."""
        pred = self.segmenter.predict(to_unit_interval(images, self.device))
        matrix = ConfusionMatrix.for_space(self.space)
        matrix.update(resize_predictions(pred, labels.shape[-2:]), labels)
        return matrix.matrix

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = [str(k) for k in batch["key"]]
        pixels = np.require(batch["image"], requirements=["C", "W"])  # Ray hands out read-only arrays
        real = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
        labels = torch.from_numpy(np.asarray(batch["label"]).astype(np.int64))
        instance = torch.from_numpy(np.asarray(batch["instance"]).astype(np.int64)) if "instance" in batch else None
        with torch.inference_mode():
            images = {REAL: real, **self.generate(labels, real, keys, instance)}
            out: dict[str, np.ndarray] = {"rows": np.array([len(keys)], dtype=np.int64), "keys": _cell("\n".join(keys))}
            for name, uint8_images in images.items():
                if self.inception is not None:
                    feats = activations([uint8_images], self.inception, dims=self.dims, batch_size=len(keys))
                    out[f"features_{name}"] = _cell(feats.astype(np.float32))  # float32 network outputs: exact
                if self.segmenter is not None:
                    out[f"confusion_{name}"] = self.confusion(uint8_images, labels)[None]
        out["samples"] = _cell(self.sample_bytes(keys, labels, images))
        return out

    def sample_bytes(self, keys: Sequence[str], labels: torch.Tensor, images: dict[str, torch.Tensor]) -> bytes:
        """The results page's images of the batch's sampled keys as .npz bytes (b"" when none)."""
        rows = [i for i, k in enumerate(keys) if k in self.sample_keys]
        if not rows:
            return b""
        arrays = {"keys": np.array([keys[i] for i in rows]), LABEL: colorize(labels[rows], self.classes).permute(0, 2, 3, 1).numpy()}
        for name, uint8_images in images.items():
            arrays[name] = uint8_images[rows].permute(0, 2, 3, 1).numpy()
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()


def _cell(value: Any) -> np.ndarray:
    """A one-row object column holding ``value`` (a per-batch array, string or bytes)."""
    column = np.empty(1, dtype=object)
    column[0] = value
    return column


# ---------------------------------------------------------------------------------------
# The pipeline


def _placement(opts: EvalOptions, batches: int) -> tuple[str, dict[str, float], int]:
    """(device, per-actor resources, actors) for the Ray cluster at hand."""
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    device = opts.device if opts.device != "auto" else ("cuda" if gpus else "cpu")
    if device == "cuda":
        if not gpus and opts.concurrency is None:
            raise EvalError("--device cuda but the Ray cluster has no GPUs now (on an autoscaling cluster pass --concurrency N)")
        return device, {"num_gpus": 1, "num_cpus": 1}, min(opts.concurrency or gpus, batches)
    cpus = float(resources.get("CPU", 1))
    actors = opts.concurrency or max(1, int((cpus - opts.decode_cpus) // opts.cpus_per_actor))
    actors = min(actors, batches)
    if actors * opts.cpus_per_actor + opts.decode_cpus > cpus:
        raise EvalError(
            f"{actors} actors x {opts.cpus_per_actor} CPU + {opts.decode_cpus} CPU for decoding exceed the cluster's {cpus:g} CPUs: "
            "Ray Data's read tasks would never run (lower --concurrency or --cpus-per-actor)"
        )
    return device, {"num_cpus": opts.cpus_per_actor}, actors


def actor_settings(plan: EvalPlan, device: str) -> dict[str, Any]:
    """The plain values an :class:`Evaluator` is built with (besides the files' bytes)."""
    opts = plan.options
    segmenter = plan.segmenter or {}
    return {
        "sets": plan.sets, "dims": opts.dims, "seed": opts.seed, "device": device, "threads": opts.cpus_per_actor,
        "precision": opts.precision, "num_classes": plan.space.num_classes, "ignore_ids": list(plan.space.ignore_ids),
        "sample_keys": plan.sample_keys, "inception_sha256": plan.inception["sha256"] if plan.inception else None,
        "segmenter": segmenter.get("kind"), "id_offset": segmenter.get("id_offset", 0),
    }


def run_evaluation(plan: EvalPlan, *, progress: bool = True, stream: TextIO | None = None) -> EvalResult:
    """Generate, extract features and segment through Ray Data (Ray must be initialised); compute the metrics."""
    import ray
    import ray.data

    from .pipeline import build_dataset  # imports Ray: only when the pipeline runs

    opts = plan.options
    batches = math.ceil(plan.num_images / opts.batch_size)
    device, resources, actors = _placement(opts, batches)
    settings = actor_settings(plan, device)
    payload = ray.put(plan.payload)
    ds = build_dataset(
        opts.data, split=plan.split, preprocess=plan.preprocess, train=False, seed=opts.seed,
        decode_cpus=opts.decode_cpus, decode_batch_size=opts.batch_size,
    ).limit(plan.num_images)
    ds = ds.map_batches(
        Evaluator, batch_size=opts.batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
        fn_constructor_kwargs={"payload": payload, "settings": settings}, **resources,
    )
    ds.context.execution_options.preserve_order = True  # limit() then takes the first N rows, every run
    ds.context.enable_progress_bars = False  # the driver draws its own

    names = (REAL, *plan.sets)
    features: dict[str, list[np.ndarray]] = {name: [] for name in names}
    matrices = {name: ConfusionMatrix.for_space(plan.space) for name in names}
    keys: list[str] = []
    samples: dict[str, dict[str, np.ndarray]] = {}
    bar = Progress(plan.num_images, label="spade-eval: ", unit="images", enabled=progress, stream=stream)
    t0 = time.monotonic()
    try:
        for block in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for i in range(len(block["rows"])):
                keys += str(block["keys"][i]).split("\n")
                for name in names:
                    if plan.inception is not None:
                        features[name].append(np.asarray(block[f"features_{name}"][i], dtype=np.float32))
                    if plan.segmenter is not None:
                        part = ConfusionMatrix.for_space(plan.space)
                        part.matrix += np.asarray(block[f"confusion_{name}"][i], dtype=np.int64)
                        matrices[name].merge(part)
                if block["samples"][i]:
                    _collect_samples(bytes(block["samples"][i]), samples)
                bar.advance(int(block["rows"][i]))
    finally:
        bar.close()
    pipeline_s = time.monotonic() - t0
    del payload
    if sorted(keys) != sorted(plan.keys):
        raise RuntimeError(f"the pipeline delivered {len(keys)} rows that are not the split's first {plan.num_images} pairs")

    t1 = time.monotonic()
    index = {k: i for i, k in enumerate(plan.keys)}
    order = np.argsort([index[k] for k in keys])  # the split's order whatever the delivery order: KID's draws repeat
    metrics: dict[str, dict[str, Any]] = {name: {} for name in names}
    if plan.inception is not None:
        feats = {name: np.concatenate(features[name])[order] for name in names}
        real_stats = statistics(feats[REAL], inception_sha256=plan.inception["sha256"])
        for name in plan.sets:
            fake_stats = statistics(feats[name], inception_sha256=plan.inception["sha256"])
            kid = kernel_inception_distance(feats[REAL], feats[name], subsets=opts.kid_subsets, subset_size=opts.kid_subset_size)
            metrics[name]["fid"] = fid_from_statistics(real_stats, fake_stats)
            metrics[name]["kid"] = dataclasses.asdict(kid)
    if plan.segmenter is not None:
        names_by_id = classes_for(plan.shards.labels).names
        for name in names:
            scores = matrices[name].scores()
            metrics[name].update(
                miou=scores.miou, pixel_accuracy=scores.pixel_accuracy, pixels=scores.pixels,
                iou=[{"id": c, "name": names_by_id[c] if c < len(names_by_id) else str(c), "iou": v}
                     for c, v in sorted(scores.iou.items())],
            )
    ray_info = {"actors": actors, "device": device, "actor_resources": resources, "batch_size": opts.batch_size,
                "decode_cpus": opts.decode_cpus}
    return EvalResult(metrics, samples, ray_info, pipeline_s, time.monotonic() - t1)


def _collect_samples(data: bytes, samples: dict[str, dict[str, np.ndarray]]) -> None:
    with np.load(io.BytesIO(data), allow_pickle=False) as f:
        arrays = {name: f[name] for name in f.files}
    for i, key in enumerate(arrays.pop("keys")):
        samples[str(key)] = {name: a[i] for name, a in arrays.items()}


def evaluate(
    opts: EvalOptions, *, progress: bool = True, stream: TextIO | None = None, command: Sequence[str] | None = None
) -> dict[str, Any]:
    """prepare + run + write (Ray must be initialised): the ``eval.json`` record."""
    plan = prepare_evaluation(opts)
    for note in plan.notes:
        print(f"note: {note}", file=stream or sys.stderr)
    result = run_evaluation(plan, progress=progress, stream=stream)
    return write_results(plan, result, command=command)
