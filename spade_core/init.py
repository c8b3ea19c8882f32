"""Weight initialisation for training from scratch, as the reference does it."""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize


def init_weights(net: nn.Module, *, gain: float = 0.02) -> None:
    """Xavier-normal (gain 0.02) conv and linear weights, zero biases, BatchNorm scale ~ N(1, 0.02).

    Spectral-normed layers get the same init on their unnormalised weight: in the reference
    the derived ``weight`` shares storage with ``weight_orig`` when the init runs.
    """
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            if m.weight is not None:
                nn.init.normal_(m.weight, 1.0, gain)
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            if parametrize.is_parametrized(m, "weight"):
                nn.init.xavier_normal_(m.parametrizations.weight.original, gain=gain)
            else:
                nn.init.xavier_normal_(m.weight, gain=gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
