"""The inputs of ``spade-eval run``, checked and loaded without Ray: options, the plan, and the shared dataclasses.

:func:`prepare_evaluation` checks every option and input (the shards' split and labels, the
checkpoint, pytorch-fid's Inception weights, the segmenter or the synthetic oracle) and
loads every file the actors need into an :class:`EvalPlan`; errors are :class:`EvalError`,
one line each. :class:`EvalResult` is what :func:`train_job.evaluate.run_evaluation`
computes and :func:`train_job.eval_report.write_results` writes; ``REAL`` and ``LABEL`` name
the image sets besides the generated ones. Also the model's test-time preprocessing
(:func:`eval_preprocess`) and a dataset's label space (:func:`label_space`), which
evaluation inside training uses too.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow.parquet as pq

import spade_core
from spade_core.checkpoint import CONFIG_FILE, WEIGHT_FILES
from spade_core.config import LabelConfig, ModelConfig
from spade_core.metrics import ADE20K, COCO_STUFF, IdMapping, LabelSpace, load_fid_inception, load_segmenter
from spade_core.metrics.inception import BLOCK_BY_DIMS, FID_WEIGHTS_FILE, FID_WEIGHTS_SHA256, FID_WEIGHTS_URL
from spade_core.metrics.kid import KID_SUBSET_SIZE, KID_SUBSETS
from spade_core.nvlabs import NET_FILES
from spade_core.runs import Select, checkpoint_in
from spade_core.preprocess import PreprocessConfig

from .datasets import DatasetError, max_label_id, normalize_split

if TYPE_CHECKING:
    from .shards import ShardSet

Precision = Literal["fp32", "bf16"]
Device = Literal["auto", "cpu", "cuda"]
REAL = "real"
LABEL = "label"  # the colourised label maps on the results page


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
    """Checked inputs, loaded files and derived settings: everything :func:`~train_job.evaluate.run_evaluation` needs."""

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
    """What the pipeline computed; :func:`~train_job.eval_report.write_results` turns it into files."""

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
        from .synthetic.oracle import ORACLE_FIT_SCENES, ORACLE_FIT_SEED, ORACLE_FIT_SIZE

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
