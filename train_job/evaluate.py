"""Evaluate a checkpoint on a prepared split through Ray Data: FID, KID, mIoU, pixel accuracy, a results page.

    open_shards (the manifest: split, count, labels)
    -> pipeline.build_dataset(train=False): one read task per shard, decode + the model's
       test-time preprocessing (:func:`eval_preprocess`: resize to the model's input size;
       no random crop, no flip)
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
       and ``OUT/images/<set>/<key>.png`` (``label`` colourised, ``real``, each generated set).

:func:`prepare_evaluation` checks every input and loads every file without Ray (errors are
:class:`EvalError`, one line each); :func:`run_evaluation` needs Ray initialised;
:func:`write_results` writes the outputs. ``spade-eval run`` (``train_job.eval_cli``) chains them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import io
import json
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TextIO

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

import spade_core
from spade_core import seeds
from spade_core.checkpoint import CONFIG_FILE, WEIGHT_FILES
from spade_core.config import LabelConfig, ModelConfig
from spade_core.metrics import (
    ADE20K,
    COCO_STUFF,
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
from spade_core.metrics.inception import BLOCK_BY_DIMS, FID_WEIGHTS_FILE, FID_WEIGHTS_SHA256, FID_WEIGHTS_URL
from spade_core.locations import absolute
from spade_core.metrics.kid import KID_SEED, KID_SUBSET_SIZE, KID_SUBSETS
from spade_core.nvlabs import NET_FILES
from spade_core.runs import Select, checkpoint_in
from spade_core.precision import dtype_of
from spade_core.preprocess import PreprocessConfig, to_uint8, to_unit_range
from spade_core.semantics import classes_for, colorize

from .datasets import DatasetError, max_label_id, normalize_split
from .progress import Progress

if TYPE_CHECKING:  # .pipeline imports Ray: only the functions that run the pipeline import it
    from .shards import ShardSet

FORMAT_VERSION = 1
Precision = Literal["fp32", "bf16"]
Device = Literal["auto", "cpu", "cuda"]
REAL = "real"
LABEL = "label"  # the colourised label maps on the results page
RESULT_FILE = "eval.json"
PAGE_FILE = "index.html"
IMAGES_DIR = "images"
Z_NOTES = {
    "generated": "the model has no style encoder: no z",
    "style": "z = mu of the style encoder on the real image (deterministic; the reference samples around mu at test time)",
    "random": "z ~ N(0, I), drawn per image from spade_core.seeds.rng(seed, key) (numpy default_rng([seed, crc32(key)]))",
}


class EvalError(ValueError):
    """An input that cannot be evaluated as given, said in one line (``spade-eval`` exits 2)."""


@dataclass(frozen=True)
class EvalOptions:
    """What to evaluate and how (``spade-eval run``'s flags)."""

    checkpoint: str  # a checkpoint directory, or a training run (see select)
    data: str
    out: str
    select: Select = "latest"  # of a training run: its newest checkpoint_*, or best/
    split: str = "val"
    inception: str | None = None  # FID + KID need pytorch-fid's weight file
    allow_any_inception: bool = False  # other weights of the same layout (tests); FID then not comparable
    dims: int = 2048
    segmenter: str | None = None  # a TorchScript / torch.export segmentation network: mIoU + pixel accuracy
    segmenter_offset: int | None = None  # output channel c -> id c + offset; None: 1 for ADE20K, else 0
    oracle: bool = False  # the synthetic scenes' oracle segmenter instead of a network
    num_images: int | None = None  # None: the whole split
    precision: Precision = "fp32"  # the generator's; Inception and segmenter always run fp32
    seed: int = 0
    batch_size: int = 16  # rows per actor call (generation, Inception, segmentation)
    device: Device = "auto"  # auto: one actor per GPU when the cluster has GPUs, else CPU actors
    concurrency: int | None = None  # actors; None: one per GPU, or one per CPU slot leaving one CPU to decoding
    cpus_per_actor: float = 1.0  # CPU actors (GPU actors reserve 1 CPU each)
    decode_cpus: float = 1.0  # per read/decode task
    samples: int = 16  # rows on the results page (the first keys)
    kid_subsets: int = KID_SUBSETS
    kid_subset_size: int = KID_SUBSET_SIZE


@dataclass
class EvalPlan:
    """Checked inputs, loaded files and derived settings: everything :func:`run_evaluation` needs."""

    options: EvalOptions
    split: str
    shards: ShardSet
    model_config: ModelConfig
    checkpoint: dict[str, Any]  # identity: path, format, sha256, per-file sha256
    inception: dict[str, Any] | None  # path, sha256, official
    segmenter: dict[str, Any] | None  # kind, path, sha256, id offset
    num_images: int
    preprocess: PreprocessConfig
    space: LabelSpace
    sets: tuple[str, ...]  # the generated sets: ("generated",) or ("style", "random")
    keys: list[str]  # the evaluated keys, in order
    sample_keys: list[str]
    notes: list[str] = field(default_factory=list)
    payload: dict[str, Any] = field(default_factory=dict, repr=False)  # the files' bytes for the actors
    started: float = field(default_factory=time.monotonic)

    @property
    def resolution(self) -> tuple[int, int]:
        return tuple(self.model_config.generator.output_size)  # type: ignore[return-value]


@dataclass
class EvalResult:
    """What the pipeline computed; :func:`write_results` turns it into files."""

    metrics: dict[str, dict[str, Any]]
    samples: dict[str, dict[str, np.ndarray]]  # key -> set -> (H, W, 3) uint8
    ray: dict[str, Any]
    pipeline_s: float
    metrics_s: float


# ---------------------------------------------------------------------------------------
# Inputs


def eval_preprocess(config: ModelConfig) -> PreprocessConfig:
    """The reference's test-time preprocessing for a model: resize to its input size, no crop, no flip.

    The reference tests with ``load_size = crop_size`` (ADE20K, COCO-Stuff: ``resize_and_crop``
    to a square; Cityscapes: ``fixed`` at its aspect ratio), so nothing is cropped away.
    """
    gen = config.generator
    if gen.aspect_ratio == 1:
        return PreprocessConfig(mode="resize_and_crop", load_size=gen.crop_size, crop_size=gen.crop_size, flip=False)
    return PreprocessConfig(mode="fixed", load_size=gen.crop_size, crop_size=gen.crop_size, aspect_ratio=gen.aspect_ratio, flip=False)


def label_space(labels: LabelConfig) -> LabelSpace:
    """The ids a dataset's label maps hold and those not scored (ADE20K: 0 unlabeled; don't-care ids)."""
    if labels.dataset == "ade20k" and labels.label_nc == 150:
        return ADE20K
    if labels.dataset == "coco_stuff" and labels.label_nc == 182:
        return COCO_STUFF
    ignore = ((0,) if labels.dataset == "ade20k" else ()) + ((labels.dontcare_value,) if labels.contain_dontcare_label else ())
    return LabelSpace(max_label_id(labels) + 1, ignore)


def checkpoint_files(path: Path) -> dict[str, Path]:
    """The files that define a checkpoint's generator (+ encoder): config and weights, no discriminator."""
    if (path / CONFIG_FILE).is_file():
        names = [CONFIG_FILE, WEIGHT_FILES["generator"], WEIGHT_FILES["encoder"]]
    else:
        names = ["opt.txt", NET_FILES["generator"], NET_FILES["encoder"]]
    return {name: path / name for name in names if (path / name).is_file()}


def checkpoint_identity(path: Path, files: dict[str, bytes]) -> dict[str, Any]:
    """Path, format and a sha256 over the config and weight files' own sha256s (names sorted)."""
    per_file = {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())}
    combined = hashlib.sha256("".join(f"{name}:{digest}\n" for name, digest in per_file.items()).encode()).hexdigest()
    return {
        "path": str(path),
        "format": "spade-ray" if CONFIG_FILE in files else "nvlabs",
        "sha256": combined,
        "files": per_file,
    }


def first_keys(shards: ShardSet, n: int) -> list[str]:
    """The split's first ``n`` keys: shards hold their pairs in key order, and the manifest lists them in order."""
    keys: list[str] = []
    for path in shards.paths:
        if len(keys) >= n:
            break
        with shards.filesystem.open_input_file(path) as f:
            keys += [str(k) for k in pq.read_table(f, columns=["key"]).column("key").to_pylist()]
    return keys[:n]


def _load_checkpoint(location: str, select: Select) -> tuple[Path, spade_core.SpadeModel]:
    try:
        path = checkpoint_in(location, select).resolve()
        return path, spade_core.load_checkpoint(path)
    except ValueError as exc:
        raise EvalError(str(exc)) from exc


def _load_inception(opts: EvalOptions) -> tuple[dict[str, Any], bytes]:
    path = Path(opts.inception).expanduser().resolve()  # type: ignore[arg-type]
    if not path.is_file():
        raise EvalError(missing_inception_message(path))
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != FID_WEIGHTS_SHA256 and not opts.allow_any_inception:
        raise EvalError(foreign_inception_message(path, digest))
    try:
        model = load_fid_inception(path, allow_any_inception=True)  # the layout check; the hash was checked above
    except (ValueError, OSError) as exc:
        raise EvalError(str(exc)) from exc
    if model.weights_sha256 != digest:
        raise EvalError(f"Inception weights {path} changed while being read")
    return {"path": str(path), "sha256": digest, "official": digest == FID_WEIGHTS_SHA256, "dims": opts.dims}, data


def missing_inception_message(path: Path) -> str:
    what = "is a directory, not a file" if path.is_dir() else "does not exist"
    return f"Inception weights {path} {what}: FID needs pytorch-fid's {FID_WEIGHTS_FILE} ({FID_WEIGHTS_URL})"


def foreign_inception_message(path: Path, digest: str) -> str:
    return (
        f"Inception weights {path} have sha256 {digest[:16]}..., not pytorch-fid's {FID_WEIGHTS_FILE} "
        f"({FID_WEIGHTS_SHA256[:16]}...): FID from other weights is not comparable with published numbers "
        "(--allow-any-inception accepts them, for tests only)"
    )


def _load_segmenter(opts: EvalOptions, labels: LabelConfig) -> tuple[dict[str, Any], tuple[str, bytes] | None]:
    if opts.oracle:
        if labels.dataset != "ade20k":
            raise EvalError(f"--oracle labels the synthetic ADE20K-layout scenes; these shards hold {labels.dataset} labels")
        from .synthetic import ORACLE_FIT_SCENES, ORACLE_FIT_SEED, ORACLE_FIT_SIZE

        fit = {"scenes": ORACLE_FIT_SCENES, "size": ORACLE_FIT_SIZE, "seed": ORACLE_FIT_SEED}
        return {"kind": "oracle", "fit": fit, "note": "train_job.synthetic.default_oracle(); raw ADE20K ids"}, None
    path = Path(opts.segmenter).expanduser().resolve()  # type: ignore[arg-type]
    offset = opts.segmenter_offset if opts.segmenter_offset is not None else (1 if labels.dataset == "ade20k" else 0)
    try:
        load_segmenter(path, IdMapping(offset=offset))  # checks it loads; the actors load their own copy
    except (ValueError, OSError) as exc:
        raise EvalError(str(exc)) from exc
    data = path.read_bytes()
    info = {"kind": "torch.export" if path.suffix == ".pt2" else "torchscript", "path": str(path),
            "sha256": hashlib.sha256(data).hexdigest(), "id_offset": offset}
    return info, (path.name, data)


def _check_options(opts: EvalOptions) -> None:
    if opts.segmenter and opts.oracle:
        raise EvalError("give --segmenter or --oracle, not both")
    if not (opts.inception or opts.segmenter or opts.oracle):
        raise EvalError("no metric asked for: pass --inception (FID, KID) and/or --segmenter / --oracle (mIoU, pixel accuracy)")
    if opts.dims not in BLOCK_BY_DIMS:
        raise EvalError(f"--dims must be one of {', '.join(map(str, BLOCK_BY_DIMS))}, got {opts.dims}")
    bounds = (("--batch-size", opts.batch_size, 1), ("--samples", opts.samples, 0), ("--kid-subsets", opts.kid_subsets, 1),
              ("--kid-subset-size", opts.kid_subset_size, 2))
    for name, value, low in bounds:
        if value < low:
            raise EvalError(f"{name} must be >= {low}, got {value}")
    if opts.num_images is not None and opts.num_images < 1:
        raise EvalError(f"--num-images must be >= 1, got {opts.num_images}")
    if opts.concurrency is not None and opts.concurrency < 1:
        raise EvalError(f"--concurrency must be >= 1, got {opts.concurrency}")
    if opts.cpus_per_actor <= 0 or opts.decode_cpus <= 0:
        raise EvalError("--cpus-per-actor and --decode-cpus must be > 0")
    if opts.precision not in ("fp32", "bf16"):
        raise EvalError(f"--precision must be fp32 or bf16, got {opts.precision!r}")
    if opts.device not in ("auto", "cpu", "cuda"):
        raise EvalError(f"--device must be auto, cpu or cuda, got {opts.device!r}")


def prepare_evaluation(opts: EvalOptions) -> EvalPlan:
    """Check every input and load every file (no Ray): an :class:`EvalPlan`, or :class:`EvalError`."""
    from .shards import open_shards

    started = time.monotonic()
    _check_options(opts)
    try:
        split = normalize_split(opts.split)
        shards = open_shards(opts.data, split)
    except (DatasetError, ValueError) as exc:
        raise EvalError(str(exc)) from exc
    except OSError as exc:
        raise EvalError(f"cannot read the shards at {opts.data}: {exc}") from exc
    notes: list[str] = []
    n = shards.count
    if opts.num_images is not None and opts.num_images > shards.count:
        notes.append(f"asked for {opts.num_images} images but the {split} split holds {shards.count}: using all {shards.count}")
    elif opts.num_images is not None:
        n = opts.num_images
    if opts.inception and n < 2:
        raise EvalError(f"FID and KID need at least 2 images, got {n} (--num-images, or the size of the {split} split)")
    path, model = _load_checkpoint(opts.checkpoint, opts.select)
    config = model.config
    del model
    if shards.labels.semantic_nc != config.labels.semantic_nc or shards.labels.label_nc != config.labels.label_nc:
        raise EvalError(
            f"the shards in {opts.data} hold {shards.labels.dataset} labels (label_nc {shards.labels.label_nc}, instance maps "
            f"{shards.labels.instance_edges}) but the checkpoint's config.labels says {config.labels.dataset}, label_nc "
            f"{config.labels.label_nc}, instance_edges {config.labels.instance_edges}"
        )
    files = {name: p.read_bytes() for name, p in checkpoint_files(path).items()}
    identity = checkpoint_identity(path, files)
    payload: dict[str, Any] = {"checkpoint": files, "inception": None, "segmenter": None}
    inception = None
    if opts.inception:
        inception, payload["inception"] = _load_inception(opts)
    segmenter = None
    if opts.segmenter or opts.oracle:
        segmenter, payload["segmenter"] = _load_segmenter(opts, shards.labels)

    keys = first_keys(shards, n)
    if len(keys) != n:
        raise EvalError(f"the {split} split's shards hold {len(keys)} rows, but its manifest says {shards.count}")
    sets = ("style", "random") if config.use_vae else ("generated",)
    return EvalPlan(
        options=opts, split=split, shards=shards, model_config=config, checkpoint=identity, inception=inception,
        segmenter=segmenter, num_images=n, preprocess=eval_preprocess(config), space=label_space(shards.labels),
        sets=sets, keys=keys, sample_keys=keys[: opts.samples], notes=notes, payload=payload, started=started,
    )


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
                from .synthetic import default_oracle

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

    from .pipeline import build_dataset

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


# ---------------------------------------------------------------------------------------
# Outputs


def result_record(plan: EvalPlan, result: EvalResult, *, command: Sequence[str] | None = None) -> dict[str, Any]:
    """The content of ``eval.json``."""
    opts = plan.options
    labels = plan.shards.labels
    h, w = plan.resolution
    return {
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": list(command) if command is not None else None,
        "checkpoint": plan.checkpoint,
        "data": {
            "shards": absolute(opts.data),
            "split": plan.split,
            "split_count": plan.shards.count,
            "labels": dataclasses.asdict(labels),
        },
        "num_images": plan.num_images,
        "resolution": {"height": h, "width": w},
        "preprocess": dataclasses.asdict(plan.preprocess),
        "real_images": "the split's images after that preprocessing (the model's input size), through the same pipeline",
        "sets": {name: Z_NOTES[name] for name in plan.sets},
        "seeds": {"seed": opts.seed, "kid": KID_SEED},
        "precision": {"generator": opts.precision, "inception": "fp32", "segmenter": "fp32"},
        "inception": plan.inception,
        "segmenter": plan.segmenter,
        "label_space": {"num_classes": plan.space.num_classes, "ignore_ids": list(plan.space.ignore_ids)},
        "metrics": result.metrics,
        "notes": plan.notes,
        "ray": result.ray,
        "wall_time_s": {
            "total": round(time.monotonic() - plan.started, 3),
            "pipeline": round(result.pipeline_s, 3),
            "metrics": round(result.metrics_s, 3),
            "images_per_s": round(plan.num_images / result.pipeline_s, 3) if result.pipeline_s > 0 else None,
        },
    }


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def _file_names(keys: Sequence[str]) -> dict[str, str]:
    names: dict[str, str] = {}
    taken: set[str] = set()
    for i, key in enumerate(keys):
        name = _UNSAFE.sub("_", key)[:120] or "image"
        if name in taken:
            name = f"{name}_{i}"
        taken.add(name)
        names[key] = f"{name}.png"
    return names


def write_results(plan: EvalPlan, result: EvalResult, *, command: Sequence[str] | None = None) -> dict[str, Any]:
    """Write ``eval.json``, ``index.html`` and the page's PNGs under ``plan.options.out``; returns the record."""
    out = Path(plan.options.out)
    out.mkdir(parents=True, exist_ok=True)
    columns = (LABEL, *plan.sets, REAL)
    for name in (LABEL, REAL, "generated", "style", "random"):  # an earlier run's images: ours to replace
        for old in (out / IMAGES_DIR / name).glob("*.png"):
            old.unlink()
    keys = [k for k in plan.sample_keys if k in result.samples]
    files = _file_names(keys)
    for key in keys:
        for name in columns:
            target = out / IMAGES_DIR / name / files[key]
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.ascontiguousarray(result.samples[key][name])).save(target)
    record = result_record(plan, result, command=command)
    record["samples"] = {"keys": keys, "images": {name: f"{IMAGES_DIR}/{name}/" for name in columns}}
    _atomic_text(out / RESULT_FILE, json.dumps(record, indent=2) + "\n")
    _atomic_text(out / PAGE_FILE, results_page(record, keys, files, columns))
    return record


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fmt(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def results_page(record: dict[str, Any], keys: Sequence[str], files: dict[str, str], columns: Sequence[str]) -> str:
    """A static HTML page: the metrics, then one row per sampled key: colourised label | generated | real."""
    e = html.escape
    metric_rows = []
    for name, m in record["metrics"].items():
        kid = m.get("kid")
        kid_text = f"{kid['mean']:.5f} &plusmn; {kid['std']:.5f}" if kid else "-"
        metric_rows.append(
            f"<tr><td>{e(name)}</td><td>{_fmt(m.get('fid'), 3)}</td><td>{kid_text}</td>"
            f"<td>{_fmt(m.get('miou'))}</td><td>{_fmt(m.get('pixel_accuracy'))}</td></tr>"
        )
    ckpt = record["checkpoint"]
    inc = record["inception"]
    used = record["segmenter"]
    inception_text = "none"
    if inc:
        foreign = "" if inc["official"] else ", NOT pytorch-fid&#39;s weights"
        inception_text = f"{e(inc['path'])} (sha256 {inc['sha256'][:12]}{foreign}), {inc['dims']} dims"
    segmenter_text = "none"
    if used:
        segmenter_text = e(used["kind"]) + (f" {e(used['path'])} (sha256 {used['sha256'][:12]})" if used.get("path") else "")
    facts = [
        f"checkpoint {e(ckpt['path'])} (sha256 {ckpt['sha256'][:12]})",
        f"{record['num_images']} images of the {e(record['data']['split'])} split of {e(str(record['data']['shards']))}, "
        f"{record['resolution']['width']}x{record['resolution']['height']}, generator {e(record['precision']['generator'])}",
        f"Inception: {inception_text}",
        f"segmenter: {segmenter_text}",
        *[e(n) for n in record["notes"]],
    ]
    head = "".join(f"<th>{e(c)}</th>" for c in ("key", *columns))
    rows = "".join(
        f"<tr><td class=key>{e(k)}</td>"
        + "".join(f'<td><img src="{IMAGES_DIR}/{c}/{files[k]}" alt="{e(c)}"></td>' for c in columns)
        + "</tr>\n"
        for k in keys
    )
    title = f"spade-eval: {Path(ckpt['path']).name}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>
<style>body{{font-family:sans-serif;margin:1.5em}} table{{border-collapse:collapse}} td,th{{padding:4px 8px;border:1px solid #ccc}}
.samples img{{width:192px;image-rendering:pixelated}} .key{{font-family:monospace;font-size:small}}</style></head>
<body><h1>{e(title)}</h1>
<table><tr><th>set</th><th>FID</th><th>KID</th><th>mIoU</th><th>pixel accuracy</th></tr>
{''.join(metric_rows)}</table>
<ul>{''.join(f'<li>{f}</li>' for f in facts)}</ul>
<p>Details in <a href="{RESULT_FILE}">{RESULT_FILE}</a>. The real row's mIoU is the segmenter on the real images:
the ceiling for the generated ones.</p>
<table class=samples><tr>{head}</tr>
{rows}</table>
</body></html>
"""


def summary_lines(record: dict[str, Any]) -> list[str]:
    """One line per image set for the console."""
    lines = []
    for name, m in record["metrics"].items():
        parts = []
        if "fid" in m:
            parts.append(f"FID {m['fid']:.3f}  KID {m['kid']['mean']:.5f} +- {m['kid']['std']:.5f}")
        if "miou" in m:
            parts.append(f"mIoU {m['miou']:.4f}  pixel accuracy {m['pixel_accuracy']:.4f}")
        if parts:
            lines.append(f"{name}: " + "  ".join(parts))
    return lines


def evaluate(
    opts: EvalOptions, *, progress: bool = True, stream: TextIO | None = None, command: Sequence[str] | None = None
) -> dict[str, Any]:
    """prepare + run + write (Ray must be initialised): the ``eval.json`` record."""
    plan = prepare_evaluation(opts)
    for note in plan.notes:
        print(f"note: {note}", file=stream or sys.stderr)
    result = run_evaluation(plan, progress=progress, stream=stream)
    return write_results(plan, result, command=command)
