"""SyncBatchNorm on the CPU: plain batch norm alone, global-batch batch norm under gloo."""

from __future__ import annotations

import copy
import os
import socket
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import spade_core
from spade_core import (
    SPADE,
    DiscriminatorConfig,
    GeneratorConfig,
    LabelConfig,
    ModelConfig,
    SpadeConfig,
    SyncBatchNorm,
    convert_sync_batchnorm,
)
from spade_core import syncbn

TOL = 1e-5
BN_VARIANTS = [
    dict(),
    dict(momentum=None),
    dict(affine=False),
    dict(track_running_stats=False),
    dict(momentum=0.3, eps=1e-3),
]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


def _pair(**kwargs: object) -> tuple[nn.BatchNorm2d, SyncBatchNorm]:
    bn = nn.BatchNorm2d(3, **kwargs)
    if bn.affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    sync = SyncBatchNorm(3, **kwargs)
    sync.load_state_dict(bn.state_dict())
    return bn, sync


def _assert_same_state(bn: nn.Module, sync: nn.Module) -> None:
    a, b = bn.state_dict(), sync.state_dict()
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert _max_diff(a[key], b[key]) <= TOL, key


# ---------------------------------------------------------------------------------------
# Fast: one process


@pytest.mark.parametrize("kwargs", BN_VARIANTS, ids=lambda k: ",".join(f"{a}={v}" for a, v in k.items()) or "default")
def test_outside_a_group_it_is_batchnorm(kwargs: dict) -> None:
    bn, sync = _pair(**kwargs)
    assert list(sync.state_dict()) == list(bn.state_dict())
    for _ in range(3):
        x = torch.randn(4, 3, 5, 6) * 2 + 1
        assert torch.equal(bn(x), sync(x))
    _assert_same_state(bn, sync)
    bn.eval(), sync.eval()
    x = torch.randn(2, 3, 5, 6)
    assert torch.equal(bn(x), sync(x))


@pytest.mark.parametrize("kwargs", BN_VARIANTS, ids=lambda k: ",".join(f"{a}={v}" for a, v in k.items()) or "default")
def test_cpu_sync_math_matches_batchnorm(kwargs: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """The gloo code path with a one-rank 'all-reduce' is batch norm: output, grads, running stats."""
    monkeypatch.setattr(syncbn._AllReduceSum, "apply", lambda t, group: t)  # a one-rank group
    bn, sync = _pair(**kwargs)
    for _ in range(3):
        x = (torch.randn(4, 3, 5, 6) * 2 + 1).requires_grad_()
        xs = x.detach().clone().requires_grad_()
        w = torch.randn(4, 3, 5, 6)
        out, out_s = bn(x), syncbn._cpu_sync_batch_norm(sync, xs)
        assert _max_diff(out, out_s) <= TOL
        (out * w).sum().backward()
        (out_s * w).sum().backward()
        assert _max_diff(x.grad, xs.grad) <= TOL
        for p, q in zip(bn.parameters(), sync.parameters()):
            assert _max_diff(p.grad, q.grad) <= TOL
    _assert_same_state(bn, sync)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_sync_low_precision_inputs(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(syncbn._AllReduceSum, "apply", lambda t, group: t)  # a one-rank group
    bn, sync = _pair()
    x = (torch.randn(4, 3, 5, 6) * 3 + 2).to(dtype)
    ref = bn(x.float())
    out = syncbn._cpu_sync_batch_norm(sync, x)
    assert out.dtype == dtype
    assert _max_diff(ref, out) <= 0.05
    _assert_same_state(bn, sync)  # stats from the (exactly representable) low-precision values
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = nn.Conv2d(3, 3, 1)(torch.randn(2, 3, 4, 4))
        assert syncbn._cpu_sync_batch_norm(sync, y).dtype == y.dtype


def test_convert_keeps_device_dtype_and_parameters() -> None:
    net = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm2d(4, affine=False, track_running_stats=False)
    )
    net = net.double()
    net[1].weight.requires_grad_(False)
    weight = net[1].weight
    net.eval()
    out = convert_sync_batchnorm(net)
    assert out is net and isinstance(net[1], SyncBatchNorm) and isinstance(net[2], SyncBatchNorm)
    assert net[1].weight is weight and not net[1].weight.requires_grad
    assert net[1].running_mean.dtype == torch.float64 and net[1].num_batches_tracked.dtype == torch.long
    assert not net[1].training and net[2].running_mean is None
    assert isinstance(convert_sync_batchnorm(nn.BatchNorm2d(2)), SyncBatchNorm)


def _tiny_config() -> ModelConfig:
    return ModelConfig(
        labels=LabelConfig(label_nc=4, contain_dontcare_label=False),
        generator=GeneratorConfig(ngf=8, crop_size=64),
        discriminator=DiscriminatorConfig(ndf=8),
    )


def test_convert_generator() -> None:
    gen = spade_core.build_model(_tiny_config(), discriminator=False, seed=0).generator
    with torch.no_grad():  # non-trivial running stats
        for m in gen.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(7)
    original = copy.deepcopy(gen)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in gen.modules())
    assert n_bn > 0
    assert any(isinstance(m, nn.BatchNorm2d) and not m.affine for m in gen.modules())  # SPADE's param_free_norm

    converted = convert_sync_batchnorm(gen)
    # every batch norm is now ours (a BatchNorm2d subclass, which DDP accepts on the CPU)
    assert all(isinstance(m, SyncBatchNorm) for m in converted.modules() if isinstance(m, nn.BatchNorm2d))
    assert sum(isinstance(m, SyncBatchNorm) for m in converted.modules()) == n_bn
    a, b = original.state_dict(), converted.state_dict()
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key

    seg = nn.functional.one_hot(torch.randint(0, 4, (2, 64, 64)), 4).permute(0, 3, 1, 2).float()
    original.eval(), converted.eval()
    with torch.no_grad():
        assert torch.equal(original(seg), converted(seg))
    original.train(), converted.train()
    with torch.no_grad():
        assert torch.equal(original(seg), converted(seg))
    for key, value in original.state_dict().items():
        assert torch.equal(value, converted.state_dict()[key]), key


# ---------------------------------------------------------------------------------------
# Slow: 2 processes x batch 2 (gloo) against 1 process x batch 4 (BatchNorm2d)

WORLD = 2


class _SpadeNet(nn.Module):
    """conv -> SPADE (param-free batch norm) -> affine BatchNorm2d -> conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, 6, 3, padding=1)
        self.spade = SPADE(norm_nc=6, label_nc=4, config=SpadeConfig(norm="batch", hidden=8))
        self.bn = nn.BatchNorm2d(6)
        self.conv_out = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        return self.conv_out(torch.relu(self.bn(self.spade(self.conv_in(x), seg))))


def _make_case(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(5)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=g)
        bn.bias.uniform_(-0.5, 0.5, generator=g)
    net = _SpadeNet()
    seg = nn.functional.one_hot(torch.randint(0, 4, (4, 12, 12), generator=g), 4).permute(0, 3, 1, 2).float()
    return {
        "bn_state": bn.state_dict(),
        "bn_x": [torch.randn(4, 5, 6, 7, generator=g) * 2 + 1 for _ in range(2)],
        "bn_w": [torch.randn(4, 5, 6, 7, generator=g) for _ in range(2)],
        "net_state": net.state_dict(),
        "net_x": torch.randn(4, 3, 6, 6, generator=g),
        "net_seg": seg,
        "net_w": torch.randn(4, 2, 6, 6, generator=g),
    }


def _bn_step(bn: nn.Module, x: torch.Tensor, w: torch.Tensor) -> dict:
    x = x.clone().requires_grad_()
    out = bn(x)
    (out * w).sum().backward()
    return {"out": out.detach(), "x_grad": x.grad}


def _net_step(net: nn.Module, x: torch.Tensor, seg: torch.Tensor, w: torch.Tensor) -> dict:
    x = x.clone().requires_grad_()
    out = net(x, seg)
    (out * w).sum().backward()  # a sum over the batch: additive over ranks
    return {"out": out.detach(), "x_grad": x.grad}


def _run(case: dict, rank: int | None) -> dict:
    """One step of each case on the batch slice of ``rank`` (all of it when None)."""
    part = slice(None) if rank is None else slice(2 * rank, 2 * rank + 2)
    bn = nn.BatchNorm2d(5)
    bn.load_state_dict(case["bn_state"])
    net = _SpadeNet()
    net.load_state_dict(case["net_state"])
    if rank is not None:
        bn, net = convert_sync_batchnorm(bn), convert_sync_batchnorm(net)
    res: dict = {"bn": [], "net": None}
    for x, w in zip(case["bn_x"], case["bn_w"]):  # two steps: momentum applied twice
        res["bn"].append(_bn_step(bn, x[part], w[part]))
    res["net"] = _net_step(net, case["net_x"][part], case["net_seg"][part], case["net_w"][part])
    grads = {"bn." + k: p.grad for k, p in bn.named_parameters()}
    grads.update({"net." + k: p.grad for k, p in net.named_parameters()})
    if rank is not None:  # local contributions -> the gradient of the global (summed) loss
        for g in grads.values():
            dist.all_reduce(g)
    res["grads"] = grads
    res["state"] = {"bn." + k: v for k, v in bn.state_dict().items()}
    res["state"].update({"net." + k: v for k, v in net.state_dict().items()})
    return res


def _worker(rank: int, port: int, tmp: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    try:
        res = _run(torch.load(Path(tmp) / "case.pt"), rank)
        torch.save(res, Path(tmp) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list[dict]]:
    tmp = tmp_path_factory.mktemp("syncbn")
    case = _make_case()
    torch.save(case, tmp / "case.pt")
    mp.spawn(_worker, args=(_free_port(), str(tmp)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]
    return _run(case, None), ranks


def _cat(ranks: list[dict], get: Callable[[dict], torch.Tensor]) -> torch.Tensor:
    return torch.cat([get(r) for r in ranks])


@pytest.mark.slow
def test_two_processes_bare_sync_batchnorm(distributed_results: tuple[dict, list[dict]]) -> None:
    ref, ranks = distributed_results
    for step in range(2):
        for key in ("out", "x_grad"):
            assert _max_diff(ref["bn"][step][key], _cat(ranks, lambda r: r["bn"][step][key])) <= TOL, (step, key)
    for name in ("bn.weight", "bn.bias"):
        assert ref["grads"][name].abs().max() > 1e-3  # a non-trivial loss
        for r in ranks:
            assert _max_diff(ref["grads"][name], r["grads"][name]) <= TOL, name
    for name in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked"):
        for r in ranks:
            assert _max_diff(ref["state"][name], r["state"][name]) <= TOL, name
    assert ranks[0]["state"]["bn.num_batches_tracked"].item() == 2


@pytest.mark.slow
def test_two_processes_spade_network(distributed_results: tuple[dict, list[dict]]) -> None:
    ref, ranks = distributed_results
    for key in ("out", "x_grad"):
        assert _max_diff(ref["net"][key], _cat(ranks, lambda r: r["net"][key])) <= TOL, key
    net_grads = [k for k in ref["grads"] if k.startswith("net.")]
    assert len(net_grads) == 12  # conv_in, mlp_shared, mlp_gamma, mlp_beta, bn, conv_out
    for name in net_grads:
        for r in ranks:
            assert _max_diff(ref["grads"][name], r["grads"][name]) <= TOL, name
    for name, value in ref["state"].items():
        if name.startswith("net."):
            for r in ranks:
                assert _max_diff(value, r["state"][name]) <= TOL, name
