"""Surface renders of a head from its MRI, shaded like a plaster bust, without OpenGL.

The image is resampled to a 1 mm RAS grid, smoothed and thresholded into a head mask; for each
view the mask is rotated about the superior axis and a ray is cast from the front: the depth of
the first head voxel, turned into a shaded picture from the depth map's normals. This is the
skin surface a re-identification attack reconstructs (Schwarz et al., NEJM 2019).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from deface.preprocessing import Grid, canonical_grid, resample

VIEWS = {"front": 0.0, "left45": 45.0, "right45": -45.0, "profile": 90.0}


def render_grid(shape: tuple[int, ...], affine: np.ndarray, spacing: float = 1.0) -> Grid:
    """The RAS grid a head of this grid is rendered on (labels resampled to it line up with the picture)."""
    return canonical_grid(Grid(tuple(shape[:3]), affine), spacing=spacing, multiple=1, max_size=320)


def head_surface_volume(data: np.ndarray, affine: np.ndarray, spacing: float = 1.0, threshold: float | None = None
                        ) -> tuple[torch.Tensor, float]:
    """(head mask as float (X, Y, Z) on ``render_grid``, the threshold used).

    The threshold defaults to 12 % of the 99th percentile of the smoothed image, so any
    contrast works; pass the original's threshold to render a defaced image the same way.
    """
    grid = render_grid(data.shape, affine, spacing)
    x = torch.from_numpy(np.nan_to_num(np.asarray(data, np.float32), nan=0.0, posinf=0.0, neginf=0.0))
    vol = resample(x[None], affine, grid)[0].numpy()
    vol = ndi.gaussian_filter(vol, 1.0)
    if threshold is None:
        threshold = 0.12 * float(np.percentile(vol, 99))
    mask = vol > threshold
    lab, n = ndi.label(mask)
    if n > 1:  # the head, not specks of noise in the air
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        mask = sizes[lab] >= 0.05 * sizes.max()
    return torch.from_numpy(mask.astype(np.float32)), threshold


def depth_map(mask: torch.Tensor, yaw_deg: float) -> np.ndarray:
    """Distance (voxels) from the front plane to the surface along anterior->posterior rays,
    after turning the head by ``yaw_deg`` about the superior axis; nan where a ray hits nothing.
    Returned as (Z, X) with superior at the top."""
    X, Y, Z = mask.shape
    n = int(np.ceil(np.sqrt(X**2 + Y**2)))
    a = np.deg2rad(yaw_deg)
    # Output ray grid: u across (x), depth along -y (front first), z up; rotate into the volume.
    u = torch.linspace(-(n - 1) / 2, (n - 1) / 2, n)
    depth = torch.linspace((n - 1) / 2, -(n - 1) / 2, n)
    zz = torch.linspace(-(Z - 1) / 2, (Z - 1) / 2, Z)
    U, D, H = torch.meshgrid(u, depth, zz, indexing="ij")
    xs = np.cos(a) * U - np.sin(a) * D
    ys = np.sin(a) * U + np.cos(a) * D
    coords = torch.stack([H / ((Z - 1) / 2), ys / ((Y - 1) / 2), xs / ((X - 1) / 2)], -1)  # grid_sample: (z, y, x)
    sampled = F.grid_sample(mask[None, None], coords[None].float(), align_corners=True, padding_mode="zeros")[0, 0]
    hit = sampled > 0.5  # (n, n_depth, Z)
    first = torch.argmax(hit.to(torch.uint8), dim=1).float()
    first[~hit.any(1)] = float("nan")
    return np.flipud(np.fliplr(first.numpy().T))  # superior up, subject's right on the left


def shade(depth: np.ndarray) -> np.ndarray:
    """A plaster-bust picture (uint8) from a depth map: Lambert shading of the depth normals."""
    d = np.where(np.isnan(depth), np.nanmax(depth) if np.isfinite(depth).any() else 0, depth)
    d = ndi.gaussian_filter(d, 0.7)
    gz, gx = np.gradient(d)
    normal = np.stack([-gx, gz, -np.ones_like(d)], -1)
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    light = np.array([-0.35, 0.45, -0.82])
    light /= np.linalg.norm(light)
    value = 0.12 + 0.88 * np.clip(normal @ light, 0, 1)
    value[np.isnan(depth)] = 0.0
    return (value * 255).astype(np.uint8)


def render_views(data: np.ndarray, affine: np.ndarray, views: dict[str, float] | None = None,
                 threshold: float | None = None, spacing: float = 1.0) -> tuple[dict[str, np.ndarray], float]:
    """({view name: uint8 picture}, threshold) for a 3D image; works for any orientation/voxel size.
    One picture pixel is ``spacing`` mm."""
    mask, threshold = head_surface_volume(data, affine, spacing=spacing, threshold=threshold)
    return {name: shade(depth_map(mask, yaw)) for name, yaw in (views or VIEWS).items()}, threshold
