"""The segmentation network: a MONAI 3D U-Net, rebuilt from a plain architecture dict, and the
one way it looks at a head (``probabilities``: the wrapper's view, also training's validation).

Training builds it through Hydra (``model.net._target_``); inference rebuilds it from the
same dict stored in the weights' metadata, without Hydra.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
import torch

from deface.preprocessing import head_frame

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


@torch.inference_mode()
def probabilities(network: torch.nn.Module, images: list[torch.Tensor], input_shape: tuple[int, int, int] | None,
                  multiple: int, spacing: float, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """Class probabilities (C, X, Y, Z), on CPU, of a batch of normalised canonical images (1, X, Y, Z)
    as the wrapper sees them: each whole, or through a window fitted to its head (``spacing`` mm
    voxels) where its grid is larger than the training patch ``input_shape``
    (``preprocessing.head_frame``; the whole grid without a shape),
    padded together with zeros to a common shape; background (1) wherever the window does not reach.
    Training validates through this too, so its Dice is the wrapper's view (a sliding window pads a
    small grid up to the patch, which the wrapper does not)."""
    device = torch.device(device)
    windows = [head_frame(img, input_shape, multiple, spacing) if input_shape else tuple(slice(0, n) for n in img.shape[1:])
               for img in images]
    sizes = [tuple(s.stop - s.start for s in w) for w in windows]
    # at least two multiples a side: the deepest level's instance norm needs more than one voxel
    shape = np.maximum(np.max(sizes, axis=0), 2 * multiple)
    batch = torch.zeros((len(images), 1, *shape), dtype=torch.float32)
    for i, (img, w, (x, y, z)) in enumerate(zip(images, windows, sizes)):
        batch[i, :, :x, :y, :z] = img[(slice(None), *w)]
    batch = batch.to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = network(batch)
    probs = torch.softmax(logits.float(), 1).cpu()
    out = []
    for i, (img, w, (x, y, z)) in enumerate(zip(images, windows, sizes)):
        p = torch.zeros((probs.shape[1], *img.shape[1:]), dtype=probs.dtype)
        p[0] = 1.0  # air beyond the window
        p[(slice(None), *w)] = probs[i, :, :x, :y, :z]
        out.append(p)
    return out


def downsampling_factor(architecture: dict[str, Any]) -> int:
    """The multiple every input side must have (product of the U-Net strides)."""
    factor = 1
    for s in architecture.get("strides", []):
        factor *= int(s if isinstance(s, int) else max(s))
    return factor
