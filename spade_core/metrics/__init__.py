"""Evaluation metrics for generated images: FID, KID, segmentation scores (mIoU, pixel accuracy).

``import spade_core.metrics`` (``spade_core`` itself does not import this package, so that
loading a model stays as fast as before). Pure PyTorch + NumPy; SciPy only for the FID's
matrix square root, imported when a Fréchet distance is computed (``spade-ray[eval]``).

* :mod:`.inception`: pytorch-fid's FID Inception, loading its weight file from a given path.
* :mod:`.fid`: activations, statistics (``.npz``), the Fréchet distance, directories of images.
* :mod:`.kid`: the Kernel Inception Distance over subsets.
* :mod:`.segmentation`: one-confusion-matrix mIoU / pixel accuracy, the segmenter interface,
  segmenters from TorchScript / ``torch.export`` files.
* :mod:`.oracle`: the appearance-based segmenter of the synthetic scenes.
"""

from .fid import (
    IMAGE_EXTENSIONS,
    FIDResult,
    FIDStatistics,
    activations,
    compute_statistics,
    fid_from_statistics,
    fid_of_paths,
    frechet_distance,
    iter_image_files,
    list_images,
    load_statistics,
    read_image,
    save_statistics,
    statistics,
    statistics_of_path,
    to_unit_interval,
)
from .inception import FID_WEIGHTS_FILE, FID_WEIGHTS_SHA256, FID_WEIGHTS_URL, FIDInceptionV3, load_fid_inception
from .kid import KIDResult, kernel_inception_distance, polynomial_mmd2
from .oracle import OracleSegmenter
from .segmentation import (
    ADE20K,
    ADE20K_IDS,
    COCO_STUFF,
    ConfusionMatrix,
    IdMapping,
    LabelSpace,
    SegmentationScores,
    Segmenter,
    TorchSegmenter,
    confusion_matrix,
    load_segmenter,
    mean_iou,
    resize_predictions,
    segmentation_scores,
)

__all__ = [
    "ADE20K",
    "ADE20K_IDS",
    "COCO_STUFF",
    "ConfusionMatrix",
    "FIDInceptionV3",
    "FIDResult",
    "FIDStatistics",
    "FID_WEIGHTS_FILE",
    "FID_WEIGHTS_SHA256",
    "FID_WEIGHTS_URL",
    "IMAGE_EXTENSIONS",
    "IdMapping",
    "KIDResult",
    "LabelSpace",
    "OracleSegmenter",
    "SegmentationScores",
    "Segmenter",
    "TorchSegmenter",
    "activations",
    "compute_statistics",
    "confusion_matrix",
    "fid_from_statistics",
    "fid_of_paths",
    "frechet_distance",
    "iter_image_files",
    "kernel_inception_distance",
    "list_images",
    "load_fid_inception",
    "load_segmenter",
    "load_statistics",
    "mean_iou",
    "polynomial_mmd2",
    "read_image",
    "resize_predictions",
    "save_statistics",
    "segmentation_scores",
    "statistics",
    "statistics_of_path",
    "to_unit_interval",
]
