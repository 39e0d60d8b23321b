"""deface.unet reproduces MONAI's UNet: same state_dict keys and the same outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deface import unet
from deface.network import TINY_ARCHITECTURE, build_network

SHIPPED = json.loads(next((Path(__file__).resolve().parents[1] / "weights").glob("deface_*.json")).read_text())


@pytest.mark.parametrize("architecture", [TINY_ARCHITECTURE, SHIPPED["architecture"],
                                          {**SHIPPED["architecture"], "num_res_units": 1, "channels": [8, 16, 32],
                                           "strides": [2, 2]}], ids=["tiny", "shipped", "one_res_unit"])
def test_same_keys_and_outputs_as_monai(architecture):
    torch.manual_seed(0)
    reference = build_network(architecture, monai=True).eval()
    assert type(reference).__module__.startswith("monai.")
    with torch.no_grad():  # every parameter random, PReLU slopes too, so no part can hide
        for p in reference.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    ours = build_network(architecture).eval()
    assert isinstance(ours, unet.UNet)
    assert list(ours.state_dict()) == list(reference.state_dict())
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 1, 32, 48, 16)  # non-cubic, every side a multiple of 16
    with torch.no_grad():
        assert torch.allclose(ours(x), reference(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("change", [{"act": "RELU"}, {"norm": "batch"}, {"dropout": 0.1}, {"kernel_size": 5},
                                    {"_target_": "monai.networks.nets.BasicUNet"}])
def test_other_architectures_are_left_to_monai(change):
    assert not unet.supports({**TINY_ARCHITECTURE, **change})


def test_the_shipped_architecture_is_reproduced():
    assert unet.supports(SHIPPED["architecture"]) and unet.supports(TINY_ARCHITECTURE)
