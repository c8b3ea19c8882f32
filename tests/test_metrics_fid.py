"""spade_core.metrics FID: the FID Inception's layout and loading, features, statistics, distance.

The network's state-dict layout is written out below from pytorch-fid's published structure
(torchvision's Inception3 with ``aux_logits=False``, ``num_classes=1008`` and the FID blocks),
so that the real ``pt_inception-2015-12-05-6726825d.pth`` loads strictly. The features are
checked against an independent float64 forward written here from the same table (with the
TensorFlow graph's pools), and the statistics and distance against NumPy / SciPy code here.
Random weights stand in for the real file (``allow_any_inception=True``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from spade_core.metrics import fid as fidlib
from spade_core.metrics import inception as inc
from spade_core.metrics.inception import FIDInceptionV3, load_fid_inception
from spade_core.testing import random_inception_state

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")  # as fast as 2 threads on this 2-core machine, and shares it better

# ---------------------------------------------------------------------------------------
# pytorch-fid's layout: every conv (name, in, out, kernel (h, w), stride, padding (h, w)).
# Each conv is torchvision's BasicConv2d: conv (no bias) + BatchNorm2d(eps=0.001).


def _a(p: str, cin: int, pool: int) -> list[tuple]:
    return [
        (f"{p}.branch1x1", cin, 64, (1, 1), 1, (0, 0)),
        (f"{p}.branch5x5_1", cin, 48, (1, 1), 1, (0, 0)),
        (f"{p}.branch5x5_2", 48, 64, (5, 5), 1, (2, 2)),
        (f"{p}.branch3x3dbl_1", cin, 64, (1, 1), 1, (0, 0)),
        (f"{p}.branch3x3dbl_2", 64, 96, (3, 3), 1, (1, 1)),
        (f"{p}.branch3x3dbl_3", 96, 96, (3, 3), 1, (1, 1)),
        (f"{p}.branch_pool", cin, pool, (1, 1), 1, (0, 0)),
    ]


def _b(p: str, cin: int) -> list[tuple]:
    return [
        (f"{p}.branch3x3", cin, 384, (3, 3), 2, (0, 0)),
        (f"{p}.branch3x3dbl_1", cin, 64, (1, 1), 1, (0, 0)),
        (f"{p}.branch3x3dbl_2", 64, 96, (3, 3), 1, (1, 1)),
        (f"{p}.branch3x3dbl_3", 96, 96, (3, 3), 2, (0, 0)),
    ]


def _c(p: str, c7: int) -> list[tuple]:
    return [
        (f"{p}.branch1x1", 768, 192, (1, 1), 1, (0, 0)),
        (f"{p}.branch7x7_1", 768, c7, (1, 1), 1, (0, 0)),
        (f"{p}.branch7x7_2", c7, c7, (1, 7), 1, (0, 3)),
        (f"{p}.branch7x7_3", c7, 192, (7, 1), 1, (3, 0)),
        (f"{p}.branch7x7dbl_1", 768, c7, (1, 1), 1, (0, 0)),
        (f"{p}.branch7x7dbl_2", c7, c7, (7, 1), 1, (3, 0)),
        (f"{p}.branch7x7dbl_3", c7, c7, (1, 7), 1, (0, 3)),
        (f"{p}.branch7x7dbl_4", c7, c7, (7, 1), 1, (3, 0)),
        (f"{p}.branch7x7dbl_5", c7, 192, (1, 7), 1, (0, 3)),
        (f"{p}.branch_pool", 768, 192, (1, 1), 1, (0, 0)),
    ]


def _d(p: str) -> list[tuple]:
    return [
        (f"{p}.branch3x3_1", 768, 192, (1, 1), 1, (0, 0)),
        (f"{p}.branch3x3_2", 192, 320, (3, 3), 2, (0, 0)),
        (f"{p}.branch7x7x3_1", 768, 192, (1, 1), 1, (0, 0)),
        (f"{p}.branch7x7x3_2", 192, 192, (1, 7), 1, (0, 3)),
        (f"{p}.branch7x7x3_3", 192, 192, (7, 1), 1, (3, 0)),
        (f"{p}.branch7x7x3_4", 192, 192, (3, 3), 2, (0, 0)),
    ]


def _e(p: str, cin: int) -> list[tuple]:
    return [
        (f"{p}.branch1x1", cin, 320, (1, 1), 1, (0, 0)),
        (f"{p}.branch3x3_1", cin, 384, (1, 1), 1, (0, 0)),
        (f"{p}.branch3x3_2a", 384, 384, (1, 3), 1, (0, 1)),
        (f"{p}.branch3x3_2b", 384, 384, (3, 1), 1, (1, 0)),
        (f"{p}.branch3x3dbl_1", cin, 448, (1, 1), 1, (0, 0)),
        (f"{p}.branch3x3dbl_2", 448, 384, (3, 3), 1, (1, 1)),
        (f"{p}.branch3x3dbl_3a", 384, 384, (1, 3), 1, (0, 1)),
        (f"{p}.branch3x3dbl_3b", 384, 384, (3, 1), 1, (1, 0)),
        (f"{p}.branch_pool", cin, 192, (1, 1), 1, (0, 0)),
    ]


CONVS: list[tuple] = [
    ("Conv2d_1a_3x3", 3, 32, (3, 3), 2, (0, 0)),
    ("Conv2d_2a_3x3", 32, 32, (3, 3), 1, (0, 0)),
    ("Conv2d_2b_3x3", 32, 64, (3, 3), 1, (1, 1)),
    ("Conv2d_3b_1x1", 64, 80, (1, 1), 1, (0, 0)),
    ("Conv2d_4a_3x3", 80, 192, (3, 3), 1, (0, 0)),
    *_a("Mixed_5b", 192, 32),
    *_a("Mixed_5c", 256, 64),
    *_a("Mixed_5d", 288, 64),
    *_b("Mixed_6a", 288),
    *_c("Mixed_6b", 128),
    *_c("Mixed_6c", 160),
    *_c("Mixed_6d", 160),
    *_c("Mixed_6e", 192),
    *_d("Mixed_7a"),
    *_e("Mixed_7b", 1280),
    *_e("Mixed_7c", 2048),
]
CONV_BY_NAME = {c[0]: c for c in CONVS}


def expected_layout(*, with_counters: bool) -> dict[str, tuple[int, ...]]:
    """Key -> shape of pytorch-fid's FID Inception state dict (counters: bn.num_batches_tracked)."""
    out: dict[str, tuple[int, ...]] = {}
    for name, cin, cout, (kh, kw), _, _ in CONVS:
        out[f"{name}.conv.weight"] = (cout, cin, kh, kw)
        for part in ("weight", "bias", "running_mean", "running_var"):
            out[f"{name}.bn.{part}"] = (cout,)
        if with_counters:
            out[f"{name}.bn.num_batches_tracked"] = ()
    out["fc.weight"] = (1008, 2048)
    out["fc.bias"] = (1008,)
    return out


def random_state(seed: int = 0, *, with_counters: bool = False) -> dict[str, torch.Tensor]:
    """Random weights in the published layout (not the model's own: a missing key must show)."""
    return random_inception_state(seed, layout=expected_layout(with_counters=with_counters))


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("inception") / "random_inception.pth"
    torch.save(random_state(0), path)  # no num_batches_tracked: like a TensorFlow conversion may be
    return path


@pytest.fixture(scope="module")
def model(weights_file: Path) -> FIDInceptionV3:
    return load_fid_inception(weights_file, allow_any_inception=True)


def _images(seed: int, n: int, size: tuple[int, int]) -> torch.Tensor:
    """Smooth random uint8 images (B, 3, H, W): blobs of colour, not white noise."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, size[0] // 8 + 1, size[1] // 8 + 1, generator=g)
    up = F.interpolate(low, size=size, mode="bilinear", align_corners=False)
    return (up * 255).round().clamp(0, 255).to(torch.uint8)


# ---------------------------------------------------------------------------------------
# Layout and loading


def test_state_dict_layout_is_pytorch_fids() -> None:
    ours = {k: tuple(v.shape) for k, v in FIDInceptionV3().state_dict().items()}
    assert ours == expected_layout(with_counters=True)
    assert len(CONVS) == 94
    # the real file's size (95,628,359 bytes) is its float32 numbers plus a little zip/pickle overhead
    floats = sum(int(np.prod(s)) for s in expected_layout(with_counters=False).values())
    assert 0.99 < floats * 4 / 95_628_359 < 1.0, floats
    assert inc.FID_WEIGHTS_SHA256.startswith("6726825d") and len(inc.FID_WEIGHTS_SHA256) == 64  # torch.hub's name prefix
    assert inc.FID_WEIGHTS_FILE == "pt_inception-2015-12-05-6726825d.pth"


@pytest.mark.parametrize("with_counters", [False, True])
def test_state_dict_of_that_layout_loads_strictly(tmp_path: Path, with_counters: bool) -> None:
    state = random_state(3, with_counters=with_counters)
    with torch.device("meta"):
        bare = FIDInceptionV3()
    bare.load_state_dict(state, strict=True, assign=True)  # plain torch, strict
    path = tmp_path / "w.pth"
    torch.save(state, path)
    m = load_fid_inception(path, allow_any_inception=True)
    assert m.weights_sha256 == inc.file_sha256(path)
    assert not m.training and not any(p.requires_grad for p in m.parameters())
    loaded = m.state_dict()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def test_missing_extra_or_misshapen_keys_fail_clearly(tmp_path: Path) -> None:
    state = random_state(1)
    cases = {
        "missing": {k: v for k, v in state.items() if k != "Mixed_7c.branch_pool.conv.weight"},
        "unexpected": {**state, "AuxLogits.fc.weight": torch.zeros(1000, 768)},
        "wrong shape": {**state, "fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)},
    }
    for word, bad in cases.items():
        with pytest.raises(ValueError, match=f"FID Inception layout.*{word}") as err:
            inc.build_from_state_dict(bad)
        assert inc.FID_WEIGHTS_FILE in str(err.value)
    with pytest.raises(ValueError, match="missing Mixed_7c.branch_pool.conv.weight"):
        inc.build_from_state_dict(cases["missing"])
    # the same through a file, which names it
    path = tmp_path / "extra.pth"
    torch.save(cases["unexpected"], path)
    with pytest.raises(ValueError, match=f"{path}.*unexpected AuxLogits.fc.weight"):
        load_fid_inception(path, allow_any_inception=True)


def test_weight_file_errors(tmp_path: Path, weights_file: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist.*pt_inception-2015-12-05-6726825d.pth.*never downloaded"):
        load_fid_inception(tmp_path / "absent.pth")
    with pytest.raises(FileNotFoundError, match="is a directory"):
        load_fid_inception(tmp_path)
    # right layout, other bytes: refused unless asked for
    with pytest.raises(ValueError, match=f"sha256 {inc.file_sha256(weights_file)}, not pytorch-fid's {inc.FID_WEIGHTS_SHA256}.*allow_any_inception"):
        load_fid_inception(weights_file)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="not a loadable state dict"):
        load_fid_inception(junk, allow_any_inception=True)
    not_tensors = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_tensors)
    with pytest.raises(ValueError, match="state dict of tensors"):
        load_fid_inception(not_tensors, allow_any_inception=True)


@pytest.mark.skipif(not os.environ.get("SPADE_FID_WEIGHTS"), reason="set SPADE_FID_WEIGHTS to pytorch-fid's weight file to check it")
def test_the_real_weight_file_loads_without_allow_any() -> None:
    m = load_fid_inception(os.environ["SPADE_FID_WEIGHTS"])
    assert m.weights_sha256 == inc.FID_WEIGHTS_SHA256


# ---------------------------------------------------------------------------------------
# Features against an independent float64 forward


def _ref_conv(state: dict[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    _, _, _, _, stride, pad = CONV_BY_NAME[name]
    y = F.conv2d(x, state[f"{name}.conv.weight"], stride=stride, padding=pad)
    mean, var = state[f"{name}.bn.running_mean"], state[f"{name}.bn.running_var"]
    gamma, beta = state[f"{name}.bn.weight"], state[f"{name}.bn.bias"]
    y = (y - mean[:, None, None]) / torch.sqrt(var[:, None, None] + 0.001) * gamma[:, None, None] + beta[:, None, None]
    return torch.clamp(y, min=0)


def _tf_avg3(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's 3x3 'SAME' average: the window sum over the count of in-image pixels
    ones = torch.ones_like(x[:, :1])
    k = torch.ones(1, 1, 3, 3, dtype=x.dtype)
    sums = F.conv2d(x.reshape(-1, 1, *x.shape[2:]), k, padding=1).reshape(x.shape)
    return sums / F.conv2d(ones, k, padding=1)


def reference_preprocess(image_uint8: torch.Tensor) -> torch.Tensor:
    """pytorch-fid's input in float64: uint8 -> [0, 1] -> bilinear 299 (no antialias) -> [-1, 1]."""
    x = image_uint8[None].double() / 255
    return F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False, antialias=False) * 2 - 1


def reference_features(state: dict[str, torch.Tensor], inputs: list[torch.Tensor]) -> dict[int, np.ndarray]:
    """{dims: (N, dims)} in float64 of preprocessed (1, 3, H, W) inputs through the graph."""
    s = {k: v.double() for k, v in state.items()}
    c = lambda n, x: _ref_conv(s, n, x)  # noqa: E731
    feats: dict[int, list[np.ndarray]] = {64: [], 192: [], 768: [], 2048: []}
    for x in inputs:
        x = F.max_pool2d(c("Conv2d_2b_3x3", c("Conv2d_2a_3x3", c("Conv2d_1a_3x3", x))), 3, 2)
        feats[64].append(x.mean((2, 3)).numpy())
        x = F.max_pool2d(c("Conv2d_4a_3x3", c("Conv2d_3b_1x1", x)), 3, 2)
        feats[192].append(x.mean((2, 3)).numpy())
        for p in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
            x = torch.cat([
                c(f"{p}.branch1x1", x),
                c(f"{p}.branch5x5_2", c(f"{p}.branch5x5_1", x)),
                c(f"{p}.branch3x3dbl_3", c(f"{p}.branch3x3dbl_2", c(f"{p}.branch3x3dbl_1", x))),
                c(f"{p}.branch_pool", _tf_avg3(x)),
            ], 1)
        p = "Mixed_6a"
        x = torch.cat([
            c(f"{p}.branch3x3", x),
            c(f"{p}.branch3x3dbl_3", c(f"{p}.branch3x3dbl_2", c(f"{p}.branch3x3dbl_1", x))),
            F.max_pool2d(x, 3, 2),
        ], 1)
        for p in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
            d = x
            for i in range(1, 6):
                d = c(f"{p}.branch7x7dbl_{i}", d)
            x = torch.cat([
                c(f"{p}.branch1x1", x),
                c(f"{p}.branch7x7_3", c(f"{p}.branch7x7_2", c(f"{p}.branch7x7_1", x))),
                d,
                c(f"{p}.branch_pool", _tf_avg3(x)),
            ], 1)
        feats[768].append(x.mean((2, 3)).numpy())
        p = "Mixed_7a"
        x = torch.cat([
            c(f"{p}.branch3x3_2", c(f"{p}.branch3x3_1", x)),
            c(f"{p}.branch7x7x3_4", c(f"{p}.branch7x7x3_3", c(f"{p}.branch7x7x3_2", c(f"{p}.branch7x7x3_1", x)))),
            F.max_pool2d(x, 3, 2),
        ], 1)
        for p, pool in (("Mixed_7b", _tf_avg3), ("Mixed_7c", lambda t: F.max_pool2d(t, 3, 1, 1))):
            a = c(f"{p}.branch3x3_1", x)
            b = c(f"{p}.branch3x3dbl_2", c(f"{p}.branch3x3dbl_1", x))
            x = torch.cat([
                c(f"{p}.branch1x1", x),
                c(f"{p}.branch3x3_2a", a), c(f"{p}.branch3x3_2b", a),
                c(f"{p}.branch3x3dbl_3a", b), c(f"{p}.branch3x3dbl_3b", b),
                c(f"{p}.branch_pool", pool(x)),
            ], 1)
        feats[2048].append(x.mean((2, 3)).numpy())
    return {d: np.concatenate(v) for d, v in feats.items()}


def test_network_matches_an_independent_float64_forward(model: FIDInceptionV3) -> None:
    """Every block at a small input (the network is convolutional; 107 px keeps it fast and puts
    many pixels at the borders, where the TensorFlow pools differ from torchvision's)."""
    g = torch.Generator().manual_seed(7)
    inputs = [torch.rand(1, 3, 107, 107, generator=g) * 2 - 1, torch.rand(1, 3, 96, 120, generator=g) * 2 - 1]
    ref = reference_features(random_state(0), [x.double() for x in inputs])
    for dims in (64, 192, 768, 2048):
        ours = torch.cat([model.features(x, dims) for x in inputs]).numpy()
        assert ours.shape == (2, dims)
        scale = np.abs(ref[dims]).max()
        assert scale > 0.1  # the random weights keep activations alive all the way up
        np.testing.assert_allclose(ours, ref[dims], rtol=0, atol=1e-4 * scale, err_msg=f"dims {dims}")
    # the graph's quirks matter: an average pool in Mixed_7c gives other features
    model.Mixed_7c.max_pool = False
    try:
        other = torch.cat([model.features(x) for x in inputs]).numpy()
    finally:
        model.Mixed_7c.max_pool = True
    assert np.abs(other - ref[2048]).max() > 1e-2 * np.abs(ref[2048]).max()


def test_preprocessing_is_pytorch_fids() -> None:
    for size in ((64, 80), (320, 300)):  # up and down (where antialiasing would differ)
        img = _images(1, 1, size)[0]
        ours = FIDInceptionV3.preprocess(fidlib.to_unit_interval(img))
        assert ours.shape == (1, 3, 299, 299) and ours.dtype == torch.float32
        np.testing.assert_allclose(ours.numpy(), reference_preprocess(img).numpy(), rtol=0, atol=2e-5)  # float32 sampling positions
    # uint8 -> [0, 1] is exactly ToTensor's x / 255
    every = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(1, 3, 16, 16)
    assert torch.equal(fidlib.to_unit_interval(every), every.float() / 255)


@pytest.mark.slow
def test_activations_of_images_match_the_independent_forward_end_to_end(model: FIDInceptionV3) -> None:
    """uint8 images of other sizes -> activations at every dims, against the float64 reference (~6 s)."""
    images = [_images(1, 1, (64, 80))[0], _images(4, 1, (320, 300))[0]]
    ref = reference_features(random_state(0), [reference_preprocess(img) for img in images])
    for dims in (64, 192, 768, 2048):
        ours = fidlib.activations(images, model, dims=dims)
        assert ours.shape == (2, dims) and ours.dtype == np.float64
        np.testing.assert_allclose(ours, ref[dims], rtol=0, atol=2e-4 * np.abs(ref[dims]).max(), err_msg=f"dims {dims}")


# ---------------------------------------------------------------------------------------
# Statistics and the Fréchet distance


def numpy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """Independent float64 FID of two feature sets: tr sqrt(S1 S2) from the eigenvalues of S1 S2."""
    mu1, mu2 = a.mean(0), b.mean(0)
    d1, d2 = a - mu1, b - mu2
    s1, s2 = d1.T @ d1 / (len(a) - 1), d2.T @ d2 / (len(b) - 1)
    eig = np.linalg.eigvals(s1 @ s2)  # real and >= 0 for a product of PSD matrices, up to rounding
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(eig.real, 0, None)).sum())


@pytest.fixture(scope="module")
def two_sets(model: FIDInceptionV3) -> tuple[np.ndarray, np.ndarray]:
    """64-dim features of 2 x 16 images (fewer images than dims: singular covariances, as
    small evaluation sets have)."""
    a = fidlib.activations([_images(10, 16, (64, 64))], model, dims=64)
    b = fidlib.activations([_images(11, 16, (64, 64)).flip(-1).roll(5, -2)], model, dims=64)
    return a, b


def test_fid_equals_an_independent_numpy_computation(two_sets: tuple[np.ndarray, np.ndarray]) -> None:
    a, b = two_sets
    sa, sb = fidlib.statistics(a), fidlib.statistics(b)
    np.testing.assert_allclose(sa.mu, a.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sa.sigma, np.cov(a.T), rtol=1e-12)
    assert sa.sigma.dtype == np.float64 and sa.count == 16 and sa.dims == 64
    ours = fidlib.fid_from_statistics(sa, sb)
    assert ours > 1e-3
    assert ours == pytest.approx(numpy_fid(a, b), rel=1e-6)
    # a set against itself: 0
    # a set against itself: 0 up to the square root's rounding (sqrt of ~1e-17 eigenvalues)
    assert abs(fidlib.fid_from_statistics(sa, sa)) < 1e-6 * np.trace(sa.sigma)
    assert abs(fidlib.frechet_distance(sb.mu, sb.sigma, sb.mu, sb.sigma)) < 1e-6 * np.trace(sb.sigma)


def test_frechet_distance_follows_pytorch_fids_branches(monkeypatch: pytest.MonkeyPatch) -> None:
    import scipy.linalg

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 3)), rng.normal(size=(40, 3)) + 0.5
    mu1, s1, mu2, s2 = x.mean(0), np.cov(x.T), y.mean(0), np.cov(y.T)
    exact = numpy_fid(x, y)
    assert fidlib.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(exact, rel=1e-9)

    real_sqrtm = scipy.linalg.sqrtm
    calls: list[np.ndarray] = []

    def non_finite_first(a: np.ndarray) -> np.ndarray:
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(scipy.linalg, "sqrtm", non_finite_first)
    with pytest.warns(RuntimeWarning, match="adding 1e-06"):
        value = fidlib.frechet_distance(mu1, s1, mu2, s2)
    eye = np.eye(3) * 1e-6
    np.testing.assert_array_equal(calls[1], (s1 + eye).dot(s2 + eye))  # eps on both diagonals
    assert value == pytest.approx(exact, rel=1e-5)

    root = real_sqrtm(s1.dot(s2))
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda a: root + 1j * 9e-4 * np.eye(3))  # within 1e-3: real part
    assert fidlib.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(exact, rel=1e-9)
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda a: root + 1j * 2e-3 * np.eye(3))
    with pytest.raises(ValueError, match="Imaginary component|imaginary component"):
        fidlib.frechet_distance(mu1, s1, mu2, s2)
    monkeypatch.setattr(scipy.linalg, "sqrtm", real_sqrtm)
    with pytest.raises(ValueError, match="differ in length"):
        fidlib.frechet_distance(mu1, s1, mu2[:2], s2[:2, :2])
    with pytest.raises(ValueError, match="covariances"):
        fidlib.frechet_distance(mu1, s1, mu2, s2[:2, :2])


def test_statistics_files_use_pytorch_fids_keys(tmp_path: Path, two_sets: tuple[np.ndarray, np.ndarray]) -> None:
    s = fidlib.statistics(two_sets[0], inception_sha256="ab" * 32)
    path = fidlib.save_statistics(tmp_path / "stats.npz", s)
    with np.load(path) as f:  # what pytorch-fid reads
        assert {"mu", "sigma"} <= set(f.files)
        np.testing.assert_array_equal(f["mu"], s.mu)
        np.testing.assert_array_equal(f["sigma"], s.sigma)
    back = fidlib.load_statistics(path)
    assert back.count == 16 and back.inception_sha256 == "ab" * 32
    np.testing.assert_array_equal(back.sigma, s.sigma)
    # a file as pytorch-fid writes it: only mu and sigma
    theirs = tmp_path / "theirs.npz"
    np.savez_compressed(theirs, mu=s.mu, sigma=s.sigma)
    loaded = fidlib.load_statistics(theirs)
    assert loaded.count is None and loaded.inception_sha256 is None and loaded.dims == 64
    # another name than .npz is written where asked
    assert fidlib.save_statistics(tmp_path / "stats.bin", s).name == "stats.bin"
    np.savez(tmp_path / "nomu.npz", sigma=s.sigma)
    with pytest.raises(ValueError, match="lacks mu"):
        fidlib.load_statistics(tmp_path / "nomu.npz")
    np.savez(tmp_path / "shapes.npz", mu=s.mu, sigma=s.sigma[:3])
    with pytest.raises(ValueError, match=r"mu must be \(d,\) and sigma \(d, d\)"):
        fidlib.load_statistics(tmp_path / "shapes.npz")
    with pytest.raises(FileNotFoundError):
        fidlib.load_statistics(tmp_path / "absent.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable"):
        fidlib.load_statistics(tmp_path / "junk.npz")
    with pytest.raises(ValueError, match="at least 2"):
        fidlib.statistics(two_sets[0][:1])


# ---------------------------------------------------------------------------------------
# Directories, inputs, precision


def _write(path: Path, image: torch.Tensor, mode: str = "RGB") -> None:
    Image.fromarray(image.permute(1, 2, 0).numpy()).convert(mode).save(path)


def test_directories_are_read_like_pytorch_fid(tmp_path: Path) -> None:
    imgs = _images(20, 6, (40, 48))
    for name, i in (("b.png", 0), ("a.jpg", 1), ("c.webp", 2), ("d.bmp", 3), ("skip.PNG", 4)):
        _write(tmp_path / name, imgs[i])
    _write(tmp_path / "e.png", imgs[5], mode="L")  # grayscale: converted to RGB
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "sub" / "f.png", imgs[0])
    files = fidlib.list_images(tmp_path)
    assert [f.name for f in files] == ["a.jpg", "b.png", "c.webp", "d.bmp", "e.png"]  # sorted; lower-case extensions only, no recursion
    assert set(fidlib.IMAGE_EXTENSIONS) == {"bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp"}
    e = fidlib.read_image(tmp_path / "e.png")
    assert e.shape == (3, 40, 48) and e.dtype == torch.uint8 and torch.equal(e[0], e[1])
    assert torch.equal(fidlib.read_image(tmp_path / "b.png"), imgs[0])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fidlib.list_images(tmp_path / "absent")
    with pytest.raises(ValueError, match="cannot read image"):
        fidlib.read_image(tmp_path / "notes.txt")


def test_fid_of_paths_directories_and_npz(tmp_path: Path, model: FIDInceptionV3) -> None:
    d1, d2 = tmp_path / "one", tmp_path / "two"
    d1.mkdir()
    d2.mkdir()
    a, b = _images(30, 4, (32, 32)), _images(31, 5, (32, 40))
    for i in range(4):
        _write(d1 / f"{i}.png", a[i])
    for i in range(5):
        _write(d2 / f"{i}.png", b[i])
    result = fidlib.fid_of_paths([d1, d2], model, dims=64)
    want = fidlib.fid_from_statistics(
        fidlib.statistics(fidlib.activations([a], model, dims=64)), fidlib.statistics(fidlib.activations([b], model, dims=64))
    )
    assert result.fid == pytest.approx(want, rel=1e-9)
    assert result.counts == (4, 5) and result.dims == 64 and result.inception_sha256 == model.weights_sha256
    npz = fidlib.save_statistics(tmp_path / "two.npz", fidlib.statistics_of_path(d2, model, dims=64))
    assert fidlib.fid_of_paths([d1, npz], model, dims=64).fid == pytest.approx(want, rel=1e-9)
    with pytest.raises(ValueError, match="64-dim features, not 192"):
        fidlib.fid_of_paths([d1, npz], model, dims=192)
    other = fidlib.save_statistics(tmp_path / "other.npz", fidlib.FIDStatistics(np.zeros(64), np.eye(64), 3, "0" * 64))
    with pytest.raises(ValueError, match="different Inception weights"):
        fidlib.fid_of_paths([npz, other], model, dims=64)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds 0 image"):
        fidlib.fid_of_paths([d1, tmp_path / "empty"], model, dims=64)
    with pytest.raises(ValueError, match="exactly 2"):
        fidlib.fid_of_paths([d1], model, dims=64)


def test_activation_inputs_precision_and_errors(model: FIDInceptionV3) -> None:
    imgs = _images(40, 3, (48, 48))
    want = fidlib.activations([imgs], model, dims=64)
    as_float = imgs.float() / 255
    np.testing.assert_array_equal(fidlib.activations([as_float], model, dims=64), want)
    np.testing.assert_array_equal(fidlib.activations([imgs.numpy()], model, dims=64), want)  # numpy (B, 3, H, W)
    # (3, H, W) items, other batches: the same up to the convolutions' own rounding
    np.testing.assert_allclose(fidlib.activations(iter(imgs), model, dims=64, batch_size=2), want, rtol=0, atol=1e-6 * np.abs(want).max())
    # the module path (forward) is the same computation
    np.testing.assert_allclose(model(as_float, 64).numpy(), want, rtol=0, atol=1e-6 * np.abs(want).max())
    bf16 = fidlib.activations([imgs[:1]], model, dims=64, precision="bf16")  # one: slow on CPUs without AMX
    assert np.abs(bf16 - want[:1]).max() < 0.02 * np.abs(want).max()
    assert np.corrcoef(bf16.ravel(), want[0])[0, 1] > 0.999
    assert fidlib.activations([], model, dims=64).shape == (0, 64)
    for bad, match in (
        (dict(dims=100), "dims must be one of 64, 192, 768, 2048"),
        (dict(precision="fp16"), "precision"),
        (dict(batch_size=0), "batch_size"),
        (dict(device="meta"), "move it first"),
    ):
        with pytest.raises(ValueError, match=match):
            fidlib.activations([imgs], model, **bad)
    for bad_images, match in (
        (imgs.float() / 127.5 - 1, r"\[0, 1\].*\(x \+ 1\) / 2"),
        (imgs[:, :2], "RGB"),
        (imgs.int(), "uint8 or float"),
        ("x", "tensors or numpy arrays"),
    ):
        with pytest.raises(ValueError, match=match):
            fidlib.activations([bad_images], model, dims=64)


@pytest.mark.slow
def test_metrics_need_no_scipy_until_a_distance_is_computed() -> None:
    """The air-gapped bundle has no scipy: importing spade_core, the metrics, the training loop
    and the Serve app must work without it; the Fréchet distance says what to install (~8 s:
    it imports Ray)."""
    code = (
        "import sys; sys.modules['scipy'] = None\n"
        "import numpy as np, spade_core, spade_core.metrics as m, train_job.trainer, serve_app.app\n"
        "assert 'scipy' not in [k for k, v in sys.modules.items() if v is not None and k.startswith('scipy')]\n"
        "try:\n"
        "    m.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2))\n"
        "except ImportError as e:\n"
        "    assert 'spade-ray[eval]' in str(e), e\n"
        "    print('ok')\n"
    )
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
    assert time.perf_counter() - t0 < 120
