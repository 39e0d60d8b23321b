"""The segmentation network: a MONAI 3D U-Net, rebuilt from a plain architecture dict.

Training builds it through Hydra (``model.net._target_``); inference rebuilds it from the
same dict stored in the weights' metadata, without Hydra.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

ALLOWED_PREFIXES = ("monai.networks.nets.",)

# A tiny net for tests where the weights don't matter.
TINY_ARCHITECTURE: dict[str, Any] = {
    "_target_": "monai.networks.nets.UNet",
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 3,
    "channels": [4, 8, 16],
    "strides": [2, 2],
    "num_res_units": 0,
    "norm": "instance",
}


def build_network(architecture: dict[str, Any], monai: bool = False) -> torch.nn.Module:
    """Instantiate the network described by ``architecture`` (``_target_`` plus arguments).

    Only MONAI network classes are accepted, so a metadata file cannot run arbitrary code. A
    MONAI UNet that ``deface.unet`` reproduces is built from there (same state_dict, no MONAI
    import: 1.6 s less for a cold process) unless ``monai`` asks for MONAI's own class.
    """
    args = dict(architecture)
    target = args.pop("_target_")
    if not target.startswith(ALLOWED_PREFIXES):
        raise ValueError(f"refusing to build network {target!r}: only {ALLOWED_PREFIXES} are allowed")
    from deface import unet

    if not monai and unet.supports(architecture):
        return unet.UNet(**args)
    module_name, cls_name = target.rsplit(".", 1)
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(**args)


def downsampling_factor(architecture: dict[str, Any]) -> int:
    """The multiple every input side must have (product of the U-Net strides)."""
    factor = 1
    for s in architecture.get("strides", []):
        factor *= int(s if isinstance(s, int) else max(s))
    return factor
