"""Ray Data streaming: Parquet shards -> decode + augment -> per-worker batches for training.

    read_parquet (the manifest's shards, one read task per shard, file order reshuffled
    each epoch from the seed) -> randomize_block_order -> map_batches(decode + augment)
    -> Ray Train's equal per-worker split -> iter_torch_batches (whole batches only).

Images travel as uint8 (H, W, 3), a quarter of float32; :func:`iter_training_batches`
turns them into the [-1, 1] float tensors the networks take, on the worker.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image
from ray.data.collate_fn import NumpyBatchCollateFn

from spade_core import seeds
from spade_core.preprocess import (
    PreprocessConfig,
    sample_params,
    to_unit_range,
    transform_image_uint8,
    transform_instance,
    transform_label,
)

from .shards import open_shards


def build_dataset(
    root: str,
    *,
    split: str,
    preprocess: PreprocessConfig,
    train: bool = True,
    seed: int | None = 0,
    decode_cpus: float = 1.0,
    decode_batch_size: int = 16,
) -> Any:
    """A lazy Ray Dataset of preprocessed examples: columns ``image`` (uint8 H×W×3),
    ``label`` (int32 H×W raw ids), ``instance`` (int32 H×W, instance-edge datasets only).

    Training: file and block order are reshuffled every execution (epoch), deterministically
    from ``seed`` (``reseed_after_execution``); crops and flips are drawn afresh each epoch.
    """
    import ray.data

    shards = open_shards(root, split)
    columns = ["key", "width", "height", "image", "label"] + (["instance"] if shards.has_instance else [])
    shuffle = ray.data.FileShuffleConfig(seed=seed) if train else None
    # One read task per shard file. Ray 2.60's default Parquet reader (datasource V2) packs
    # files into ~128 MiB read tasks, so a whole epoch became one block decoded by one task
    # and the first batch came at its end; the V1 reader honours override_num_blocks.
    context = ray.data.DataContext.get_current()
    v2, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        ds = ray.data.read_parquet(
            shards.paths, filesystem=shards.filesystem, shuffle=shuffle, override_num_blocks=len(shards.paths)
        ).select_columns(columns)
    finally:
        context.use_datasource_v2 = v2
    if train:
        ds = ds.randomize_block_order(seed=ray.data.RandomSeedConfig(seed=seed))
    return ds.map_batches(
        decode_augment,
        fn_kwargs={"preprocess": preprocess, "train": train, "seed": None if train else seed},
        batch_size=decode_batch_size,
        batch_format="numpy",
        num_cpus=decode_cpus,
    )


def decode_augment(
    batch: dict[str, np.ndarray], *, preprocess: PreprocessConfig, train: bool, seed: int | None
) -> dict[str, np.ndarray]:
    """Decode a batch of encoded pairs and apply the reference's preprocessing.

    With ``seed`` set, each example's crop and flip come from (seed, key) alone (for
    evaluation and tests); otherwise from fresh entropy, so every epoch sees new crops.
    """
    images, labels, instances = [], [], []
    has_instance = "instance" in batch
    for i, key in enumerate(batch["key"]):
        rng = seeds.rng(seed, str(key)) if seed is not None else np.random.default_rng()
        with Image.open(io.BytesIO(batch["image"][i])) as img, Image.open(io.BytesIO(batch["label"][i])) as lab:
            params = sample_params(preprocess, img.size, rng, train=train)
            images.append(transform_image_uint8(img, preprocess, params))
            labels.append(transform_label(lab, preprocess, params).astype(np.int32))
            if has_instance:
                with Image.open(io.BytesIO(batch["instance"][i])) as inst:
                    instances.append(transform_instance(inst, preprocess, params).astype(np.int32))
    out = {"key": np.asarray(batch["key"]), "image": np.stack(images), "label": np.stack(labels)}
    if has_instance:
        out["instance"] = np.stack(instances)
    return out


def iter_training_batches(
    shard: Any,
    *,
    batch_size: int,
    epoch: int,
    seed: int = 0,
    device: str | torch.device = "cpu",
    shuffle_buffer: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of whole batches from a worker's dataset shard.

    Yields ``image`` float32 (B, 3, H, W) in [-1, 1], ``label`` int64 (B, H, W) raw ids and,
    for instance-edge datasets, ``instance`` int64 (B, H, W). ``drop_last`` keeps every
    worker at the same number of steps (DDP's collectives deadlock otherwise; Ray Train
    splits the rows equally).
    """
    for batch in shard.iter_torch_batches(
        batch_size=batch_size,
        drop_last=True,
        local_shuffle_buffer_size=shuffle_buffer or None,
        local_shuffle_seed=seeds.derive_seed(seed, epoch) if shuffle_buffer else None,
        collate_fn=_Collate(),
        device="cpu",
    ):
        yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class _Collate(NumpyBatchCollateFn):
    """uint8 HWC images -> [-1, 1] float CHW; ids -> int64."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return _collate(batch)


def _collate(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    # exactly the reference's ToTensor + Normalize(0.5, 0.5) values
    pixels = torch.from_numpy(np.require(batch["image"], requirements=["C", "W"]))  # Ray hands out read-only arrays
    image = to_unit_range(pixels).permute(0, 3, 1, 2).contiguous()
    out = {"image": image, "label": torch.from_numpy(batch["label"]).long()}
    if "instance" in batch:
        out["instance"] = torch.from_numpy(batch["instance"]).long()
    return out
