"""The FID Inception network: pytorch-fid's port of TensorFlow's 2015-12-05 Inception v3 graph.

FID numbers are only comparable when they come from the same network on the same input, so
this is our own definition of exactly the network ``pytorch-fid`` (``--dims`` 64 / 192 / 768 /
2048) and ``torch-fidelity`` run, with the state-dict layout of their weight file
``pt_inception-2015-12-05-6726825d.pth`` (torchvision's ``Inception3`` key names, no
``AuxLogits``, a 1008-class ``fc``). No torchvision: every block is written out here.

What differs from torchvision's ImageNet Inception v3 (the TensorFlow graph's quirks):

* the 3 x 3 average pools of the A, C and E blocks leave padded zeros out of the average
  (``count_include_pad=False``, as TensorFlow's average pool does);
* the last E block (``Mixed_7c``) pools its pool branch with a max pool, not an average;
* the classifier has 1008 outputs (it is kept only so that the file loads strictly).

Input (:meth:`FIDInceptionV3.forward`): RGB in [0, 1], any size; it is resized to 299 x 299
(bilinear, ``align_corners=False``, no antialiasing) and mapped to [-1, 1], as pytorch-fid's
``InceptionV3(resize_input=True, normalize_input=True)`` does. The output is the chosen
block's activations, spatially averaged to one vector per image:

====  ==========================================================
dims  features
====  ==========================================================
64    after the first max pool (block 0)
192   after the second max pool (block 1)
768   after ``Mixed_6e``, the input of the (absent) aux classifier (block 2)
2048  after the final average pool (block 3): the standard FID features
====  ==========================================================

:func:`load_fid_inception` reads the weight file from a path the caller gives (it is never
downloaded), checks its sha256 and loads it with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..weights import read_state_dict, state_mismatch

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_FILE}"
# The whole sha256 of that file (95,628,359 bytes); torch.hub's name carries its first 8 hex digits.
# torch-fidelity's weights-inception-2015-12-05-6726825d.pth is the same file.
FID_WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"

INPUT_SIZE = 299
# pytorch-fid's --dims -> the block whose (averaged) output they are
BLOCK_BY_DIMS: dict[int, int] = {64: 0, 192: 1, 768: 2, 2048: 3}
NUM_CLASSES = 1008


def _check_dims(dims: int) -> int:
    if dims not in BLOCK_BY_DIMS:
        raise ValueError(f"dims must be one of {', '.join(map(str, BLOCK_BY_DIMS))} (pytorch-fid's --dims), got {dims!r}")
    return BLOCK_BY_DIMS[dims]


class ConvBN(nn.Module):
    """Conv (no bias) + batch norm (eps 1e-3, TensorFlow's) + ReLU: torchvision's ``BasicConv2d`` keys."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], **kwargs: int | tuple[int, int]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, bias=False, **kwargs)  # type: ignore[arg-type]
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow averages only over the pixels inside the image at the borders
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):
    """35 x 35 block (``Mixed_5b/c/d``): 1x1, 5x5, double 3x3 and pool branches."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBN(in_channels, 64, 1)
        self.branch5x5_1 = ConvBN(in_channels, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(in_channels, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_tf_avg_pool(x))], 1)


class BlockB(nn.Module):
    """35 -> 17 reduction (``Mixed_6a``): strided 3x3, double 3x3 and max-pool branches."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = ConvBN(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class BlockC(nn.Module):
    """17 x 17 block (``Mixed_6b..e``): factorised 7x7 branches (1x7 / 7x1) and a pool branch."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = ConvBN(in_channels, 192, 1)
        self.branch7x7_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = conv(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_tf_avg_pool(x))], 1)


class BlockD(nn.Module):
    """17 -> 8 reduction (``Mixed_7a``): 3x3 and 7x7-then-3x3 strided branches, max pool."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = ConvBN(in_channels, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(in_channels, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class BlockE(nn.Module):
    """8 x 8 block (``Mixed_7b``, ``Mixed_7c``): split 1x3 / 3x1 branches; the pool is the FID quirk.

    ``max_pool``: the graph's last block (``Mixed_7c``) max-pools its pool branch where the
    paper and torchvision average; ``Mixed_7b`` averages (without the padded zeros).
    """

    def __init__(self, in_channels: int, *, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(in_channels, 320, 1)
        self.branch3x3_1 = ConvBN(in_channels, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(in_channels, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(s),
                self.branch3x3_2b(s),
                self.branch3x3dbl_3a(d),
                self.branch3x3dbl_3b(d),
                self.branch_pool(pooled),
            ],
            1,
        )


class FIDInceptionV3(nn.Module):
    """The FID Inception (module docstring): ``model(images, dims)`` -> ``(B, dims)`` float features.

    Freshly built it has PyTorch's default random init; :func:`load_fid_inception` fills
    it with the weight file. ``weights_sha256`` records which file it holds (None: not loaded).
    """

    def __init__(self) -> None:
        super().__init__()
        self.weights_sha256: str | None = None
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = BlockA(192, pool_features=32)
        self.Mixed_5c = BlockA(256, pool_features=64)
        self.Mixed_5d = BlockA(288, pool_features=64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b = BlockC(768, channels_7x7=128)
        self.Mixed_6c = BlockC(768, channels_7x7=160)
        self.Mixed_6d = BlockC(768, channels_7x7=160)
        self.Mixed_6e = BlockC(768, channels_7x7=192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b = BlockE(1280, max_pool=False)
        self.Mixed_7c = BlockE(2048, max_pool=True)
        self.fc = nn.Linear(2048, NUM_CLASSES)  # never used for features; part of the file's layout

    @staticmethod
    def preprocess(images: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1] (B, 3, H, W) float -> the network's input: 299 x 299 bilinear, then [-1, 1]."""
        x = F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return 2 * x - 1

    def blocks(self, x: torch.Tensor, last: int = 3) -> list[torch.Tensor]:
        """Outputs of blocks 0..last (feature maps, not averaged) for a preprocessed input."""
        out = []
        x = F.max_pool2d(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))), kernel_size=3, stride=2)
        out.append(x)
        if last >= 1:
            x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), kernel_size=3, stride=2)
            out.append(x)
        if last >= 2:
            for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e):
                x = block(x)
            out.append(x)
        if last >= 3:
            x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
            out.append(F.adaptive_avg_pool2d(x, (1, 1)))
        return out

    def features(self, x: torch.Tensor, dims: int = 2048) -> torch.Tensor:
        """(B, dims) float32 features of a preprocessed input (:meth:`preprocess`)."""
        block = _check_dims(dims)
        # pytorch-fid averages the lower blocks' maps to 1 x 1 (block 3 already is); in float32
        # also under autocast
        return F.adaptive_avg_pool2d(self.blocks(x, block)[block].float(), (1, 1)).flatten(1)

    def forward(self, images: torch.Tensor, dims: int = 2048) -> torch.Tensor:
        """(B, 3, H, W) RGB float in [0, 1] -> (B, dims) features, as pytorch-fid computes them."""
        if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"images must be a float tensor (B, 3, H, W) in [0, 1], got {images.dtype} {tuple(images.shape)}")
        return self.features(self.preprocess(images), dims)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            h.update(piece)
    return h.hexdigest()


def _where_to_get() -> str:
    return (
        f"FID needs pytorch-fid's Inception weights {FID_WEIGHTS_FILE} (sha256 {FID_WEIGHTS_SHA256}), from "
        f"{FID_WEIGHTS_URL}; they are never downloaded at run time: fetch the file once and pass its path"
    )


def load_fid_inception(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    allow_any_inception: bool = False,
) -> FIDInceptionV3:
    """A frozen :class:`FIDInceptionV3` in eval mode from pytorch-fid's weight file at ``path``.

    The file's sha256 must be :data:`FID_WEIGHTS_SHA256`; ``allow_any_inception=True``
    accepts another file of the same layout (e.g. random weights in tests, a re-export) and
    the model's ``weights_sha256`` says which file it was, so results can record it. Every
    key must be there with pytorch-fid's shape, and nothing else; ``*.num_batches_tracked``
    may be absent (eval never reads it). FileNotFoundError when there is no file,
    ValueError when it is another file or not a state dict of that layout.
    """
    file = Path(path)
    if not file.is_file():
        what = "is a directory, not a file" if file.is_dir() else "does not exist"
        raise FileNotFoundError(f"Inception weights {file} {what}; {_where_to_get()}")
    digest = file_sha256(file)
    if digest != FID_WEIGHTS_SHA256 and not allow_any_inception:
        raise ValueError(
            f"Inception weights {file} have sha256 {digest}, not pytorch-fid's {FID_WEIGHTS_SHA256}: FID from "
            f"other weights is not comparable with published numbers (pass allow_any_inception=True to use them "
            f"anyway); {_where_to_get()}"
        )
    state = read_state_dict(file, what="Inception weights", hint=_where_to_get())
    model = build_from_state_dict(state, source=str(file))
    model.weights_sha256 = digest
    return model.to(device)


def build_from_state_dict(state: dict[str, torch.Tensor], *, source: str = "state dict") -> FIDInceptionV3:
    """A frozen eval-mode :class:`FIDInceptionV3` holding ``state`` (loaded strictly; see :func:`load_fid_inception`)."""
    # Built on the meta device and filled by assignment: no random init of 24M weights to throw away.
    with torch.device("meta"):
        model = FIDInceptionV3()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = dict(state)
    for key in expected:
        # A TensorFlow conversion need not carry the batch-norm step counters; strict loading does.
        if key.endswith(".num_batches_tracked") and key not in state:
            state[key] = torch.zeros((), dtype=torch.long)
    problems = state_mismatch(state, expected)
    if problems:
        raise ValueError(
            f"Inception weights {source} do not match pytorch-fid's FID Inception layout (torchvision Inception3 "
            f"keys, no AuxLogits, fc 2048 -> {NUM_CLASSES}): {problems}; {_where_to_get()}"
        )
    # float32 whatever the file holds (bf16 is an autocast choice at run time, not a weight format)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.requires_grad_(False).eval()
