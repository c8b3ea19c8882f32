"""spade_core.metrics segmentation: one-confusion-matrix mIoU / pixel accuracy, resizing, segmenters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spade_core.metrics import (
    ADE20K,
    ADE20K_IDS,
    COCO_STUFF,
    ConfusionMatrix,
    IdMapping,
    LabelSpace,
    Segmenter,
    TorchSegmenter,
    confusion_matrix,
    load_segmenter,
    mean_iou,
    resize_predictions,
    segmentation_scores,
)
from spade_core.metrics.oracle import OracleSegmenter

# TorchScript is deprecated in torch >= 2.10 but still how many segmenters ship
pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.save` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
]

# Two images, 6 ids, 0 ignored. Class 4 appears nowhere; class 5 is predicted only on an
# ignored pixel; class 0 is predicted on a labelled pixel (a miss).
TARGET = np.array([[[1, 1, 2], [0, 3, 3]], [[2, 2, 0], [3, 3, 3]]])
PRED = np.array([[[1, 2, 2], [1, 3, 0]], [[2, 2, 5], [3, 1, 3]]])
# rows = truth, columns = prediction, counted by hand from the pixels above
BY_HAND = np.zeros((6, 6), np.int64)
for t, p, n in ((1, 1, 1), (1, 2, 1), (2, 2, 3), (3, 3, 3), (3, 0, 1), (3, 1, 1)):
    BY_HAND[t, p] = n


def test_confusion_matrix_miou_and_pixel_accuracy_by_hand() -> None:
    m = ConfusionMatrix(6, ignore_ids=0)
    m.update(PRED[0], TARGET[0]).update(torch.from_numpy(PRED[1]), torch.from_numpy(TARGET[1]))
    np.testing.assert_array_equal(m.matrix, BY_HAND)
    np.testing.assert_array_equal(confusion_matrix(PRED, TARGET, 6, 0), BY_HAND)
    s = m.scores()
    # IoU = tp / (truth + predicted - tp): 1: 1/(2+2-1); 2: 3/(3+4-3); 3: 3/(5+3-3); 0 ignored, 4 and 5 absent
    assert s.iou == pytest.approx({1: 1 / 3, 2: 3 / 4, 3: 3 / 5})
    assert s.miou == pytest.approx((1 / 3 + 3 / 4 + 3 / 5) / 3)
    assert s.pixel_accuracy == pytest.approx(7 / 10) and s.pixels == 10
    # one matrix for the set, not the mean of per-image scores
    # (image 1: 1/2, 1/2, 1/2; image 2: class 1 only predicted 0, 2/2, 2/3)
    per_image = np.mean([mean_iou(PRED[i], TARGET[i], 6, 0) for i in range(2)])
    assert per_image == pytest.approx((0.5 + (0 + 1 + 2 / 3) / 3) / 2) and per_image != pytest.approx(s.miou)
    # accumulating worker by worker is the same
    merged = ConfusionMatrix(6, 0).update(PRED[0], TARGET[0]).merge(ConfusionMatrix(6, 0).update(PRED[1], TARGET[1]))
    np.testing.assert_array_equal(merged.matrix, BY_HAND)


def test_label_spaces_ade20k_and_coco_stuff() -> None:
    assert (ADE20K.num_classes, ADE20K.ignore_ids) == (151, (0,))
    assert (COCO_STUFF.num_classes, COCO_STUFF.ignore_ids) == (182, (255,))
    # ADE20K is the default
    assert ConfusionMatrix().space == ADE20K and mean_iou(PRED, TARGET) == pytest.approx((1 / 3 + 3 / 4 + 3 / 5) / 3)
    # COCO-Stuff: 255 unlabeled (outside the ids), 0 a real class
    target = np.array([[0, 0, 255], [181, 181, 255]])
    pred = np.array([[0, 1, 7], [181, 0, 0]])
    s = ConfusionMatrix.for_space(COCO_STUFF).update(pred, target).scores()
    assert s.pixels == 4 and s.pixel_accuracy == pytest.approx(2 / 4)
    assert s.iou == pytest.approx({0: 1 / 3, 1: 0.0, 181: 1 / 2})  # 7 was predicted on an ignored pixel only


def test_confusion_matrix_errors() -> None:
    m = ConfusionMatrix(6, 0)
    with pytest.raises(ValueError, match="differ in shape.*resize_predictions"):
        m.update(PRED[0][:, :2], TARGET[0])
    with pytest.raises(ValueError, match="labels hold ids outside 0..5.*\\[9\\]"):
        m.update(PRED[0], np.where(TARGET[0] == 3, 9, TARGET[0]))
    with pytest.raises(ValueError, match="predictions hold ids outside 0..5.*id mapping"):
        m.update(PRED[0] + 10, TARGET[0])
    with pytest.raises(ValueError, match="integer ids"):
        m.update(PRED[0].astype(np.float32), TARGET[0])
    with pytest.raises(ValueError, match="no labelled pixels"):
        ConfusionMatrix(6, 0).update(PRED[0], np.zeros_like(TARGET[0])).scores()
    with pytest.raises(ValueError, match="different label spaces"):
        ConfusionMatrix(6, 0).merge(ConfusionMatrix(7, 0))
    with pytest.raises(ValueError, match="num_classes"):
        LabelSpace(0)
    assert m.matrix.sum() == 0  # failed updates count nothing


def test_predictions_are_resized_nearest_to_the_label_size() -> None:
    pred = torch.tensor([[[1, 2], [3, 4]]])
    np.testing.assert_array_equal(
        resize_predictions(pred, (4, 4))[0].numpy(), [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]
    )
    # torch's nearest: source index floor(i * in / out)
    assert resize_predictions(torch.tensor([[[1, 2, 3]]]), (1, 2))[0].tolist() == [[1, 2]]
    assert resize_predictions(torch.tensor([[[1, 2]]]), (1, 3))[0].tolist() == [[1, 1, 2]]
    assert resize_predictions(pred, (2, 2)) is pred
    assert resize_predictions(torch.tensor([[[150]]]), (2, 2)).dtype == torch.int64
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        resize_predictions(pred[0], (4, 4))


# ---------------------------------------------------------------------------------------
# Segmenters from files


class RedLevels(nn.Module):
    """Logits (B, 5, H/2, W/2): class c where the red channel is nearest c / 4; a segmenter stand-in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = F.avg_pool2d(x[:, :1], 2)
        levels = torch.arange(5, dtype=x.dtype, device=x.device).view(1, 5, 1, 1) / 4
        return -((r - levels) ** 2)


def _scene(n: int = 2, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose 2x2 blocks have red levels 0..4 / 4, and their class maps (0..4) at full size."""
    g = torch.Generator().manual_seed(0)
    classes = torch.randint(0, 5, (n, size // 2, size // 2), generator=g)
    classes = classes.repeat_interleave(2, 1).repeat_interleave(2, 2)
    images = torch.rand(n, 3, size, size, generator=g)
    images[:, 0] = classes.float() / 4
    return images, classes


@pytest.fixture(scope="module")
def script_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("segmenters") / "red.pt"
    torch.jit.save(torch.jit.script(RedLevels()), str(path))
    return path


@pytest.fixture(scope="module")
def export_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A torch.export program with a dynamic batch (exporting takes ~4 s: tracing machinery)."""
    path = tmp_path_factory.mktemp("segmenters") / "red.pt2"
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(RedLevels(), (torch.rand(2, 3, 8, 8),), dynamic_shapes=({0: batch},))
    torch.export.save(program, path)
    return path


@pytest.mark.parametrize("kind", ["script", pytest.param("export", marks=pytest.mark.slow)])
def test_torchscript_and_export_segmenters_with_id_mappings(request: pytest.FixtureRequest, kind: str) -> None:
    file = request.getfixturevalue(f"{kind}_file")
    images, classes = _scene(3)
    seg = load_segmenter(file, IdMapping(offset=1))
    assert isinstance(seg, Segmenter)
    logits = seg.logits(images)
    assert logits.shape == (3, 5, 4, 4)
    low = seg.predict(images)
    assert low.shape == (3, 4, 4) and low.dtype == torch.int64
    assert torch.equal(low, classes[:, ::2, ::2] + 1)  # ADE20K-style: output c is dataset id c + 1
    # scored at the label map's resolution (predictions resized nearest), ids 1..5 of an ADE20K-like space
    s = segmentation_scores(seg, [(images, classes + 1)], space=LabelSpace(6, (0,)))
    assert s.miou == 1.0 and s.pixel_accuracy == 1.0 and s.pixels == 3 * 8 * 8
    # uint8 images are scored the same as their [0, 1] floats
    as_uint8 = (images * 255).round().to(torch.uint8)
    assert segmentation_scores(seg, [(as_uint8, classes + 1)], space=LabelSpace(6, (0,))).miou == 1.0
    # an explicit table, and labels twice the image size
    table = IdMapping(table=(10, 20, 30, 40, 50))
    seg2 = TorchSegmenter(file, table)
    big = classes.repeat_interleave(2, 1).repeat_interleave(2, 2) * 10 + 10
    s2 = segmentation_scores(seg2, [(images[:1], big[:1]), (images[1:], big[1:])], space=LabelSpace(51, (0,)))
    assert s2.miou == 1.0 and s2.pixels == 3 * 16 * 16
    assert ADE20K_IDS == IdMapping(offset=1)
    if kind == "export":  # (torch.export's loader takes seconds to import: only here)
        junk = file.with_name("junk.pt2")
        junk.write_bytes(b"junk")
        with pytest.raises(ValueError, match=r"not a loadable torch.export \(.pt2\) model"):
            load_segmenter(junk)


class Broken(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "3d":
            return x[:, 0]
        if self.kind == "batch":
            return x[:1]
        return x  # 3 channels


def test_segmenter_errors(tmp_path: Path, script_file: Path) -> None:
    images, classes = _scene(2)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_segmenter(tmp_path / "absent.pt")
    with pytest.raises(FileNotFoundError, match="is a directory"):
        load_segmenter(tmp_path)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a loadable TorchScript model"):
        load_segmenter(tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="IdMapping"):
        TorchSegmenter(script_file, 1)  # type: ignore[arg-type]
    for kind, match in (("3d", r"logits \(B, C, H, W\) with B = 2, got shape \(2, 8, 8\)"), ("batch", "B = 2, got shape"), ("channels", "3 channels, but its id table maps 5")):
        path = tmp_path / f"{kind}.pt"
        torch.jit.save(torch.jit.script(Broken(kind)), str(path))
        with pytest.raises(ValueError, match=match):
            load_segmenter(path, IdMapping(table=(1, 2, 3, 4, 5))).predict(images)
    with pytest.raises(ValueError, match="offset or a table, not both"):
        IdMapping(offset=1, table=(1, 2))
    with pytest.raises(ValueError, match="non-empty"):
        IdMapping(table=())
    seg = load_segmenter(script_file, IdMapping(offset=1))
    space = LabelSpace(6, (0,))
    with pytest.raises(ValueError, match=r"labels must be \(B, H, W\) for 2 images"):
        segmentation_scores(seg, [(images, classes[:1])], space=space)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        segmentation_scores(seg, [(images * 2 - 1, classes)], space=space)
    with pytest.raises(ValueError, match="predictions hold ids outside 0..4.*id mapping"):
        segmentation_scores(seg, [(images, classes)], space=LabelSpace(5, ()))  # offset 1 gives id 5
    with pytest.raises(ValueError, match="predict"):
        segmentation_scores(object(), [(images, classes)])  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------
# The synthetic scenes' oracle is one such segmenter


def test_the_oracle_is_a_segmenter_of_the_same_interface() -> None:
    from train_job import synthetic as syn

    oracle = syn.default_oracle()
    assert isinstance(oracle, OracleSegmenter) and isinstance(oracle, Segmenter)
    scenes = [syn.generate_scene(np.random.default_rng([5, i]), 64) for i in range(4)]
    images = torch.from_numpy(np.stack([syn.jpeg_round_trip(img) for img, _ in scenes])).permute(0, 3, 1, 2)
    labels = torch.from_numpy(np.stack([lab for _, lab in scenes]))
    direct = syn.segment(images)  # its own call: uint8 tensors
    assert torch.equal(oracle.predict(images.float() / 255), torch.from_numpy(direct))
    s = segmentation_scores(oracle, [(images[:2], labels[:2]), (images[2:], labels[2:])])
    assert s.miou == pytest.approx(mean_iou(direct, labels), rel=1e-12)
    assert s.miou > 0.9
    # labels at twice the size: predictions are resized to them, the score hardly moves
    big = labels.repeat_interleave(2, 1).repeat_interleave(2, 2)
    assert segmentation_scores(oracle, [(images, big)]).miou == pytest.approx(s.miou, rel=1e-9)
    with pytest.raises(ValueError, match="float tensor"):
        oracle.predict(images)
    with pytest.raises(RuntimeError, match="never appeared"):
        OracleSegmenter.fit([(scenes[0][0], scenes[0][1])], [3, 150])
