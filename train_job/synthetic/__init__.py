"""Procedural ADE20K-layout scenes, an oracle segmenter that labels them by appearance, and a dataset writer.

* :mod:`.scenes`: outdoor scenes as layered shapes, every region labelled with its real
  ADE20K class id, each class rendered with its own base colour and texture.
* :mod:`.oracle`: :class:`spade_core.metrics.oracle.OracleSegmenter` fitted on such scenes
  (:func:`fit_oracle`, :func:`default_oracle`, :func:`segment`): the metric of the project's
  learning benchmark.
* :mod:`.dataset`: :func:`write_dataset`, an ADE20K folder of generated scenes (JPEG + raw-id
  PNG) with a manifest; image i of a split depends only on (seed, split, i).
* ``python -m train_job.synthetic`` (:mod:`.cli`): its command line.

Importing this package does not import torch (scene writers run in spawned processes):
spade_core is imported only when the oracle is fitted or class names are asked for.
"""

from __future__ import annotations

from .dataset import GENERATOR_VERSION, MANIFEST, PREFIX, ROOT, SPLIT_CODE, scene_rng, split_dirs, write_dataset
from .oracle import ORACLE_FIT_SCENES, ORACLE_FIT_SEED, ORACLE_FIT_SIZE, default_oracle, fit_oracle, fitting_scenes, segment
from .scenes import (
    BUILDING,
    CLASS_IDS,
    FENCE,
    FIELD,
    GRASS,
    JPEG_QUALITY,
    MIN_SIZE,
    MOUNTAIN,
    ROAD,
    ROCK,
    SAND,
    SEA,
    SKY,
    SKYSCRAPER,
    STYLE_BY_ID,
    STYLES,
    TREE,
    WATER,
    ClassStyle,
    class_names,
    generate_layout,
    generate_scene,
    jpeg_round_trip,
    render,
)

from .cli import main

__all__ = [
    "main",
    "BUILDING",
    "CLASS_IDS",
    "ClassStyle",
    "FENCE",
    "FIELD",
    "GENERATOR_VERSION",
    "GRASS",
    "JPEG_QUALITY",
    "MANIFEST",
    "MIN_SIZE",
    "MOUNTAIN",
    "ORACLE_FIT_SCENES",
    "ORACLE_FIT_SEED",
    "ORACLE_FIT_SIZE",
    "PREFIX",
    "ROAD",
    "ROCK",
    "ROOT",
    "SAND",
    "SEA",
    "SKY",
    "SKYSCRAPER",
    "SPLIT_CODE",
    "STYLES",
    "STYLE_BY_ID",
    "TREE",
    "WATER",
    "class_names",
    "default_oracle",
    "fit_oracle",
    "fitting_scenes",
    "generate_layout",
    "generate_scene",
    "jpeg_round_trip",
    "render",
    "scene_rng",
    "segment",
    "split_dirs",
    "write_dataset",
]

