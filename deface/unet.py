"""MONAI's 3D ``UNet`` for inference without importing MONAI (which loads all of its subpackages,
matplotlib and scipy.signal among them: about 1.6 s of a cold ``deface-infer``).

The modules and their names reproduce ``monai.networks.nets.UNet`` for the arguments the shipped
weights use (3D, kernel 3, PReLU, instance norm, no dropout, "NDA" order), so its state_dict
loads unchanged; ``tests/test_network.py`` checks keys and outputs against MONAI itself.
``deface.network.build_network`` uses it when ``supports`` says so, and MONAI otherwise.
Training always builds MONAI's class (through Hydra).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# The arguments this reproduction covers, with the values it implements.
SUPPORTED_DEFAULTS: dict[str, Any] = {"spatial_dims": 3, "kernel_size": 3, "up_kernel_size": 3, "act": "PRELU",
                                      "dropout": 0.0, "bias": True, "adn_ordering": "NDA"}
REQUIRED = ("in_channels", "out_channels", "channels", "strides")


def supports(architecture: dict[str, Any]) -> bool:
    """True when ``architecture`` (``_target_`` plus UNet arguments) is one this module builds."""
    args = dict(architecture)
    if args.pop("_target_", None) != "monai.networks.nets.UNet" or not all(k in args for k in REQUIRED):
        return False
    if str(args.pop("norm", "instance")).lower() != "instance":
        return False
    args.pop("num_res_units", None)
    for key in REQUIRED:
        args.pop(key)
    for key, value in args.items():
        want = SUPPORTED_DEFAULTS.get(key, object())
        if (str(value).upper() != want) if key == "act" else (value != want and not (key == "dropout" and value is None)):
            return False
    return len(architecture["channels"]) == len(architecture["strides"]) + 1 >= 2


class _ADN(nn.Sequential):
    """Instance norm ("N") then PReLU ("A"), the names MONAI's ADN block gives them."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.add_module("N", nn.InstanceNorm3d(channels))
        self.add_module("A", nn.PReLU())


class _Convolution(nn.Sequential):
    """A 3x3x3 convolution (``transposed``: stride-2 upsampling), then norm and activation
    unless ``conv_only``."""

    def __init__(self, cin: int, cout: int, stride: int, transposed: bool = False, conv_only: bool = False) -> None:
        super().__init__()
        if transposed:
            conv = nn.ConvTranspose3d(cin, cout, 3, stride=stride, padding=1, output_padding=stride - 1)
        else:
            conv = nn.Conv3d(cin, cout, 3, stride=stride, padding=1)
        self.add_module("conv", conv)
        if not conv_only:
            self.add_module("adn", _ADN(cout))


class _ResidualUnit(nn.Module):
    """``subunits`` convolutions (the first with ``stride``) plus a residual path: a strided
    3x3x3 convolution, a 1x1x1 one for a change of channels, or the identity."""

    def __init__(self, cin: int, cout: int, stride: int, subunits: int, last_conv_only: bool = False) -> None:
        super().__init__()
        self.conv = nn.Sequential()
        channels, s = cin, stride
        for i in range(max(1, subunits)):
            only = last_conv_only and i == max(1, subunits) - 1
            self.conv.add_module(f"unit{i}", _Convolution(channels, cout, s, conv_only=only))
            channels, s = cout, 1
        if stride != 1:
            self.residual: nn.Module = nn.Conv3d(cin, cout, 3, stride, 1)
        elif cin != cout:
            self.residual = nn.Conv3d(cin, cout, 1, 1, 0)
        else:
            self.residual = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.residual(x)


class _Skip(nn.Module):
    """The input and its ``submodule``'s output, concatenated along channels."""

    def __init__(self, submodule: nn.Module) -> None:
        super().__init__()
        self.submodule = submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.submodule(x)], dim=1)


class UNet(nn.Module):
    """``monai.networks.nets.UNet`` for the arguments of ``supports`` (same state_dict keys)."""

    def __init__(self, in_channels: int, out_channels: int, channels: list[int], strides: list[int],
                 num_res_units: int = 0, **_: Any) -> None:
        super().__init__()
        self.res = num_res_units
        self.strides = list(strides)  # as MONAI's UNet has it: the input's side multiple

        def down(cin: int, cout: int, stride: int) -> nn.Module:
            return _ResidualUnit(cin, cout, stride, self.res) if self.res > 0 else _Convolution(cin, cout, stride)

        def up(cin: int, cout: int, stride: int, top: bool) -> nn.Module:
            conv = _Convolution(cin, cout, stride, transposed=True, conv_only=top and self.res == 0)
            if self.res == 0:
                return conv
            return nn.Sequential(conv, _ResidualUnit(cout, cout, 1, 1, last_conv_only=top))

        def block(cin: int, cout: int, chans: list[int], strs: list[int], top: bool) -> nn.Module:
            c = chans[0]
            if len(chans) > 2:
                sub, up_in = block(c, c, chans[1:], strs[1:], False), 2 * c
            else:
                sub, up_in = down(c, chans[1], 1), c + chans[1]
            return nn.Sequential(down(cin, c, strs[0]), _Skip(sub), up(up_in, cout, strs[0], top))

        self.model = block(in_channels, out_channels, list(channels), list(strides), True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)
