"""Evaluation during training: rank 0 scores the generator on a fixed validation subset.

    check_eval_data (the driver, at job start): the split is in the shards' manifest and
        holds ``eval.num_images`` pairs
    ValidationSet.load: the split's first N pairs in key order, decoded by the data pipeline's
        own :func:`~train_job.pipeline.decode_augment` with the model's test-time preprocessing
        (:func:`~train_job.eval_inputs.eval_preprocess`: resize to the model's input, no crop, no
        flip): the same images as ``spade-eval run --num-images N`` scores
    TrainingEvaluator: built once on rank 0 (Inception weights and the segmenter loaded, the
        real images' Inception features and statistics computed once); each call generates the
        subset with the given generator in eval mode, fp32 (VAE models: z = mu of the encoder on
        the real image, ``spade-eval``'s "style" set) and returns fid, kid, kid_std, miou and
        pixel_accuracy as ``spade-eval run`` computes them (same spade_core.metrics functions,
        label space and id offsets).

Pure PyTorch + pyarrow on the worker: no Ray Data pipeline is started for it (the subset is
small and read once, and a second pipeline would compete with training's for CPUs).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import nn

from spade_core.metrics import (
    ConfusionMatrix,
    IdMapping,
    activations,
    fid_from_statistics,
    kernel_inception_distance,
    load_fid_inception,
    load_segmenter,
    resize_predictions,
    statistics,
    to_unit_interval,
)
from spade_core.metrics.inception import FID_WEIGHTS_SHA256
from spade_core.preprocess import to_uint8, to_unit_range
from spade_core.semantics import classes_for

from .config import TrainConfig
from .eval_inputs import eval_preprocess, label_space
from .metrics import sample_grid
from .pipeline import decode_augment
from .shards import ShardSet, open_shards
from .steps import semantics_of


def check_eval_data(cfg: TrainConfig) -> ShardSet | None:
    """The evaluation split's shards, checked against the config (None when eval is off): a
    ValueError naming ``eval.split`` / ``eval.num_images`` otherwise."""
    ev = cfg.eval
    if not ev.enabled:
        return None
    try:
        shards = open_shards(cfg.data.shards, ev.split)
    except ValueError as exc:
        raise ValueError(
            f"eval.split {ev.split!r}: {exc}. Prepare it (python -m train_job.prepare ... --split {ev.split} "
            f"--out {cfg.data.shards}) or set eval.every_steps: 0"
        ) from exc
    if shards.count < ev.num_images:
        raise ValueError(
            f"eval.num_images is {ev.num_images} but the {ev.split!r} split in {cfg.data.shards} holds {shards.count} pairs: "
            f"lower eval.num_images to at most {shards.count}"
        )
    return shards


@dataclass
class ValidationSet:
    """Decoded pairs: ``images`` uint8 (N, H, W, 3), ``labels`` int32 (N, H, W), ``instance`` likewise or None."""

    keys: list[str]
    images: np.ndarray
    labels: np.ndarray
    instance: np.ndarray | None

    def __len__(self) -> int:
        return len(self.keys)

    def images_chw(self) -> torch.Tensor:
        """The real images as uint8 (N, 3, H, W)."""
        return torch.from_numpy(self.images).permute(0, 3, 1, 2)

    @classmethod
    def load(cls, shards: ShardSet, n: int, *, cfg: TrainConfig, chunk: int = 64) -> ValidationSet:
        """The first ``n`` pairs: shards hold their pairs in key order and the manifest lists shards in order."""
        columns = ["key", "width", "height", "image", "label"] + (["instance"] if shards.has_instance else [])
        rows: dict[str, list[Any]] = {c: [] for c in columns}
        for path in shards.paths:
            if len(rows["key"]) >= n:
                break
            with shards.filesystem.open_input_file(path) as f:
                table = pq.read_table(f, columns=columns)
            for c in columns:
                rows[c] += table.column(c).to_pylist()
        if len(rows["key"]) < n:
            raise ValueError(f"the evaluation split's shards hold {len(rows['key'])} rows, fewer than eval.num_images ({n})")
        preprocess = eval_preprocess(cfg.model)
        parts: list[dict[str, np.ndarray]] = []
        for start in range(0, n, chunk):
            batch = {c: np.asarray(rows[c][start : min(start + chunk, n)], dtype=object) for c in columns}
            parts.append(decode_augment(batch, preprocess=preprocess, train=False, seed=cfg.data.seed))
        return cls(
            keys=[str(k) for part in parts for k in part["key"]],
            images=np.concatenate([p["image"] for p in parts]),
            labels=np.concatenate([p["label"] for p in parts]),
            instance=np.concatenate([p["instance"] for p in parts]) if shards.has_instance else None,
        )


@dataclass
class EvalOutcome:
    values: dict[str, float | None]  # fid, kid, kid_std, miou, pixel_accuracy (those asked for)
    seconds: float
    grid: np.ndarray | None  # label | generated | real of the first eval.sample_rows pairs


class TrainingEvaluator:
    """Scores a generator on the fixed subset; see the module docstring."""

    def __init__(self, cfg: TrainConfig, *, device: torch.device, shards: ShardSet | None = None) -> None:
        ev = cfg.eval
        t0 = time.perf_counter()
        self.cfg, self.device = cfg, device
        self.metrics = ev.chosen_metrics
        shards = shards or open_shards(cfg.data.shards, ev.split)
        self.data = ValidationSet.load(shards, ev.num_images, cfg=cfg)
        self.space = label_space(shards.labels)
        self.classes = classes_for(cfg.model.labels)
        self.inception = None
        self.real_features: np.ndarray | None = None
        if "fid" in self.metrics or "kid" in self.metrics:
            if "fid" in self.metrics:
                import scipy.linalg  # noqa: F401 - fail now, not at the first evaluation after hours of training
            self.inception = load_fid_inception(ev.inception, device=device, allow_any_inception=ev.allow_any_inception)  # type: ignore[arg-type]
            self.real_features = self._features(self._batches(self.data.images_chw()))
            self.real_stats = statistics(self.real_features, inception_sha256=self.inception.weights_sha256)
        self.segmenter: Any = None
        self.real_scores: dict[str, float] = {}
        if "miou" in self.metrics:
            if ev.oracle:
                from .synthetic.oracle import default_oracle

                self.segmenter = default_oracle()
            else:
                # as spade-eval: ADE20K networks' 150 outputs are ids 1..150
                offset = ev.segmenter_offset if ev.segmenter_offset is not None else (1 if shards.labels.dataset == "ade20k" else 0)
                self.segmenter = load_segmenter(ev.segmenter, IdMapping(offset=offset), device=device)  # type: ignore[arg-type]
            scores = self._segmentation(self._batches(self.data.images_chw())).scores()
            self.real_scores = {"miou": scores.miou, "pixel_accuracy": scores.pixel_accuracy}  # the generated images' ceiling
        self.setup_s = time.perf_counter() - t0

    def describe(self) -> str:
        ev = self.cfg.eval
        parts = [f"eval every {ev.every_steps} steps on the first {len(self.data)} pairs of {ev.split!r}: {', '.join(self.metrics)}"]
        if self.inception is not None:
            official = self.inception.weights_sha256 == FID_WEIGHTS_SHA256
            parts.append(f"Inception {ev.dims} dims{'' if official else ' (NOT pytorch-fid weights: FID not comparable)'}")
        if self.real_scores:
            parts.append(f"real images score mIoU {self.real_scores['miou']:.3f} (the ceiling)")
        return "; ".join(parts) + f"; set up in {self.setup_s:.1f}s"

    def _batches(self, tensors: torch.Tensor) -> list[torch.Tensor]:
        step = self.cfg.eval.batch_size
        return [tensors[i : i + step] for i in range(0, len(tensors), step)]

    def _features(self, batches: list[torch.Tensor]) -> np.ndarray:
        assert self.inception is not None
        return activations(batches, self.inception, dims=self.cfg.eval.dims, batch_size=self.cfg.eval.batch_size)

    def _segmentation(self, batches: list[torch.Tensor]) -> ConfusionMatrix:
        matrix = ConfusionMatrix.for_space(self.space)
        start = 0
        with torch.inference_mode():
            for images in batches:
                labels = torch.from_numpy(self.data.labels[start : start + len(images)]).long()
                pred = self.segmenter.predict(to_unit_interval(images, self.device))
                matrix.update(resize_predictions(pred, labels.shape[-2:]).cpu(), labels)
                start += len(images)
        return matrix

    def generate(self, generator: nn.Module, encoder: nn.Module | None) -> list[torch.Tensor]:
        """The subset generated as uint8 (B, 3, H, W) batches, in eval mode (the modes are restored).

        The generator takes the label maps as a :class:`~spade_core.labelmap.LabelMap` (label
        convs as gathers: the same function as the one-hot input, ~7x faster at the tiny preset).
        """
        out = []
        with _eval_mode(generator, encoder), torch.inference_mode():
            for start in range(0, len(self.data), self.cfg.eval.batch_size):
                stop = min(start + self.cfg.eval.batch_size, len(self.data))
                batch = {"label": torch.from_numpy(self.data.labels[start:stop]).long().to(self.device)}
                if self.data.instance is not None:
                    batch["instance"] = torch.from_numpy(self.data.instance[start:stop]).long().to(self.device)
                semantics = semantics_of(batch, self.cfg.model.labels, as_label_map=True)
                z = None
                if encoder is not None:  # z = mu of the real image's style (deterministic)
                    z, _ = encoder(to_unit_range(self.data.images_chw()[start:stop]).to(self.device))
                out.append(to_uint8(generator(semantics, z=z)))
        return out

    def __call__(self, generator: nn.Module, encoder: nn.Module | None = None) -> EvalOutcome:
        t0 = time.perf_counter()
        fakes = self.generate(generator, encoder)
        values: dict[str, float | None] = {}
        if self.inception is not None:
            assert self.real_features is not None
            feats = self._features(fakes)
            if "fid" in self.metrics:
                try:
                    values["fid"] = fid_from_statistics(self.real_stats, statistics(feats, inception_sha256=self.inception.weights_sha256))
                except ValueError as exc:  # a complex square root: reported, training goes on
                    print(f"warning: FID not computed: {exc}", flush=True)
                    values["fid"] = None
            if "kid" in self.metrics:
                kid = kernel_inception_distance(self.real_features, feats)
                values["kid"], values["kid_std"] = kid.mean, kid.std
        if self.segmenter is not None:
            scores = self._segmentation(fakes).scores()
            values["miou"], values["pixel_accuracy"] = scores.miou, scores.pixel_accuracy
        grid = None
        rows = min(self.cfg.eval.sample_rows, len(self.data))
        if rows:
            real = to_unit_range(self.data.images_chw()[:rows])
            fake = to_unit_range(torch.cat(fakes)[:rows])
            grid = sample_grid(torch.from_numpy(self.data.labels[:rows]).long(), fake, real, self.classes, max_rows=rows)
        return EvalOutcome(values, time.perf_counter() - t0, grid)


@contextlib.contextmanager
def _eval_mode(*nets: nn.Module | None) -> Iterator[None]:
    """Eval mode (running statistics, no spectral-norm update) for the block; training modes restored after."""
    modes = [(net, net.training) for net in nets if net is not None]
    for net, _ in modes:
        net.eval()
    try:
        yield
    finally:
        for net, was_training in modes:
            net.train(was_training)
