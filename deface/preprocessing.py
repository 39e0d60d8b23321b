"""Map a native image onto the network's canonical grid and back.

The canonical grid is axis-aligned RAS with isotropic spacing (2 mm by default), its origin
snapped to a world lattice so that the same head in any axis order or oblique affine lands
on the same grid. Resampling is done in world space with ``torch.nn.functional.grid_sample``,
which handles all 48 axis codes and oblique affines with one code path.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Grid:
    """A voxel grid: ``shape`` (3 ints) and the voxel-to-world ``affine`` (4x4, RAS mm)."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    @property
    def spacing(self) -> np.ndarray:
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Voxel edge lengths (mm) along each array axis."""
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


def acquisition_rotation(affine: np.ndarray) -> np.ndarray:
    """The rotation (3x3, world -> grid axes, as ``canonical_grid`` takes it) that lines a grid up
    with the image's own voxel axes, each taken as the world axis it is closest to: the identity
    for an image stored along the world axes, the obliquity of a slab planned on the head."""
    directions = np.asarray(affine, float)[:3, :3] / voxel_sizes(affine)
    # world axis i of voxel axis j: the pairing most aligned overall (each world axis once)
    pairing = max(itertools.permutations(range(3)), key=lambda p: sum(abs(directions[p[j], j]) for j in range(3)))
    frame = np.zeros((3, 3))
    for j, i in enumerate(pairing):
        frame[:, i] = np.sign(directions[i, j]) * directions[:, j]
    return rigid_part(frame).T  # voxel axes need not be orthogonal


def rigid_part(linear: np.ndarray) -> np.ndarray:
    """The rotation nearest to a 3x3 linear map (polar decomposition)."""
    u, _, vt = np.linalg.svd(linear)
    return u @ np.diag([1.0, 1.0, float(np.sign(np.linalg.det(u @ vt)))]) @ vt


def world_bbox(grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """World-space (RAS) bounding box of the voxel *centres* of ``grid``."""
    corners = np.array(np.meshgrid(*[[0, s - 1] for s in grid.shape], indexing="ij")).reshape(3, -1)
    world = grid.affine[:3, :3] @ corners + grid.affine[:3, 3:4]
    return world.min(axis=1), world.max(axis=1)


def canonical_grid(native: Grid, spacing: float = 2.0, multiple: int = 16, max_size: int = 256,
                   rotation: np.ndarray | None = None) -> Grid:
    """The RAS grid at ``spacing`` mm covering ``native``, padded to ``multiple`` voxels.

    The origin sits on the world lattice ``k * spacing`` so that reorderings of the same image
    give the same canonical grid. Fields of view beyond ``max_size`` voxels are centred and cut.
    ``rotation`` (3x3, world -> grid axes) turns the grid: its axes are then the rotated RAS
    axes (a tilted head seen upright), the lattice theirs.
    """
    rot = np.eye(3) if rotation is None else np.asarray(rotation, float)
    turned = np.eye(4)
    turned[:3, :3] = rot
    lo, hi = world_bbox(Grid(native.shape, turned @ native.affine))
    lo = np.floor(lo / spacing) * spacing
    hi = np.ceil(hi / spacing) * spacing
    n = np.round((hi - lo) / spacing).astype(int) + 1
    shape = np.minimum(((n + multiple - 1) // multiple) * multiple, max_size)
    # Centre the field of view in the padded grid, keeping the lattice.
    shift = np.floor((shape - n) / 2.0)
    origin = lo - shift * spacing
    affine = np.eye(4)
    affine[:3, :3] = np.diag([spacing] * 3)
    affine[:3, 3] = origin
    return Grid(tuple(int(s) for s in shape), affine if rotation is None else np.linalg.inv(turned) @ affine)


FRAME_THRESHOLD = 0.1  # normalised intensity above which a canonical voxel counts as head for ``head_frame``
FRAME_MIN_SHARE = 0.02  # ... and a slice as part of the head: this share of the fullest slice's such voxels
FRAME_MARGIN = 8  # voxels of air the network's window keeps on each side of the head's box ...
FRAME_MIN_MM = (192.0, 256.0, 256.0)  # ... in a window at least this large (IXI's field of view, x y z)


def head_frame(image: torch.Tensor, shape: tuple[int, int, int], multiple: int, spacing: float
               ) -> tuple[slice, slice, slice]:
    """Where the network looks at a normalised canonical ``image`` (C, X, Y, Z), as slices of its
    grid of ``spacing`` mm voxels. A grid no larger than ``shape`` (the training patch) along every
    axis is seen whole; a larger one through a window fitted to the head: the head's box plus
    ``FRAME_MARGIN`` voxels of air a side, at least ``FRAME_MIN_MM``, rounded up to ``multiple``,
    centred on the head and inside the grid. Never padded, never cutting the head.

    The network learned on heads whose grid held little air around them, and its instance norms
    take their statistics over the whole input: the same head with 40 mm more air on every side
    was seen differently (IXI 015: 2,275 mL of brain predicted instead of 1,414 seen whole). A
    window of the patch's size on the head (2026-12-06 (b) to (f)) held more air than the heads
    came with: IXI 296 with a wide field of view kept the ear's remains and was matched. The window
    fitted to the head sees it as scanned; without the minimum a skull-stripped brain filled it
    and was called face three times as often (docs/evaluation.md 2026-12-06 (g)). Padding a
    smaller grid up to the patch was tried (2026-12-06 (b)): it makes the network call more of a
    cut or tight face brain, which the brain margin then keeps."""
    size = np.array(image.shape[1:])
    if np.all(size <= np.asarray(shape)):  # no axis longer than the patch: the whole grid, no head to find
        return tuple(slice(0, int(n)) for n in size)
    head = (image[0] > FRAME_THRESHOLD).numpy()
    lo, hi = np.zeros(3, int), size.copy()
    for axis in range(3):
        counts = head.sum(axis=tuple(a for a in range(3) if a != axis))
        rows = np.nonzero(counts >= max(1.0, FRAME_MIN_SHARE * counts.max()))[0]
        if rows.size:
            lo[axis], hi[axis] = rows[0], rows[-1] + 1
    least = np.ceil(np.asarray(FRAME_MIN_MM) / spacing - 1e-6).astype(int)
    box = np.maximum(hi - lo + 2 * FRAME_MARGIN, least)
    box = np.minimum(size, -(-box // multiple) * multiple)
    start = np.clip((lo + hi) // 2 - box // 2, 0, size - box)
    return tuple(slice(int(s), int(s + b)) for s, b in zip(start, box))


def antialias(data: torch.Tensor, affine: np.ndarray, spacing: float) -> tuple[torch.Tensor, np.ndarray]:
    """Average-pool ``data`` (C, X, Y, Z) along axes finer than half ``spacing``.

    Returns the pooled data and its affine; avoids aliasing when a 1 mm scan is sampled at 2 mm.
    """
    k = np.maximum(np.floor(spacing / voxel_sizes(affine) + 1e-3), 1).astype(int)
    k = np.minimum(k, np.array(data.shape[1:4]))  # never wider than the image itself
    if np.all(k == 1):
        return data, affine
    pooled = F.avg_pool3d(data[None], kernel_size=tuple(k), stride=tuple(k), ceil_mode=True)[0]
    scale = np.eye(4)
    scale[:3, :3] = np.diag(k)
    scale[:3, 3] = (k - 1) / 2.0
    return pooled, affine @ scale


def sampling_grid(src_affine: np.ndarray, src_shape: tuple[int, ...], dst: Grid,
                  dst_box: tuple[slice, slice, slice] | None = None) -> torch.Tensor:
    """Normalised ``grid_sample`` coordinates of ``dst`` voxel centres in the source array.

    ``dst_box`` restricts the result to a sub-box of ``dst`` (native back-mapping touches only
    the face region). Returns a (1, X, Y, Z, 3) float32 tensor for align_corners=True.
    """
    box = dst_box or tuple(slice(0, s) for s in dst.shape)
    m = np.linalg.inv(src_affine) @ dst.affine
    axes = [np.arange(b.start, b.stop, dtype=np.float64) for b in box]
    out = torch.empty((1, *(len(a) for a in axes), 3), dtype=torch.float32)
    # src_index = M[:3,:3] @ dst_index + M[:3,3], normalised: the per-axis terms are summed once at
    # full size in float64 (exact ties stay ties in any axis order), then written as float32 into
    # the output's channel (grid_sample wants (x, y, z) = array axes 2, 1, 0).
    for r in range(3):
        tx, ty, tz = (torch.from_numpy(m[r, a] * axes[a]) for a in range(3))
        plane = tx[:, None] + (ty + m[r, 3])[None, :]
        full = plane[:, :, None] + tz[None, None, :]
        out[0, ..., 2 - r] = full.mul_(2.0 / max(src_shape[r] - 1, 1)).sub_(1.0)
    return out


def resample(data: torch.Tensor, src_affine: np.ndarray, dst: Grid, mode: str = "bilinear",
             dst_box: tuple[slice, slice, slice] | None = None) -> torch.Tensor:
    """Resample ``data`` (C, X, Y, Z) from ``src_affine`` onto ``dst`` (or a box of it).

    Points outside the source field of view get 0. ``mode`` is ``bilinear`` (trilinear) or
    ``nearest``.
    """
    grid = sampling_grid(src_affine, tuple(data.shape[1:]), dst, dst_box).to(data.device)
    out = F.grid_sample(data[None].float(), grid, mode=mode, padding_mode="zeros", align_corners=True)
    return out[0]


def fov_mask(src_affine: np.ndarray, src_shape: tuple[int, ...], dst: Grid) -> torch.Tensor:
    """Boolean (X, Y, Z) mask of ``dst`` voxels that fall inside the source field of view."""
    grid = sampling_grid(src_affine, src_shape, dst)[0]
    half = torch.tensor([1.0 / max(s - 1, 1) for s in src_shape[::-1]])
    return ((grid >= -1 - half) & (grid <= 1 + half)).all(dim=-1)


def normalize_intensity(image: torch.Tensor, inside: torch.Tensor | None = None,
                        low: float = 0.5, high: float = 99.5) -> torch.Tensor:
    """Scale ``image`` to about [0, 1] by robust percentiles; voxels outside ``inside`` become 0."""
    values = image[inside] if inside is not None else image.reshape(-1)
    values = values[torch.isfinite(values)]
    if values.numel() == 0:
        return torch.zeros_like(image)
    if values.numel() > 1_000_000:
        step = values.numel() // 1_000_000 + 1
        values = values[::step]
    # numpy selects (partition) where torch.quantile sorts: same linear interpolation, 3x faster.
    lo, hi = (float(v) for v in np.percentile(values.float().numpy(), [low, high]))
    out = ((image - lo) / max(hi - lo, 1e-6)).clamp(-0.5, 1.5)
    out = torch.nan_to_num(out, nan=0.0, posinf=1.5, neginf=-0.5)
    if inside is not None:
        out = torch.where(inside, out, torch.zeros_like(out))
    return out


SAMPLE_VOXELS = 250_000  # every n-th voxel, about this many, for the two steps' percentiles (a gate, a level, a shift)
OFFSET_SHARE = 0.05  # a darkest level further from 0 than this share of the intensity range is an offset


def without_offset(data: torch.Tensor) -> torch.Tensor:
    """``data`` with its darkest level (0.5th percentile) moved to 0 when that level lies clearly
    off 0 (air stored at 5000, or at -0.5 in a z-scored image); unchanged otherwise (air at 0, as in
    every scanner image here). Resampling pads outside the field of view with zeros, and the
    voxels at its edge mix them in: above air's level they became the normaliser's low percentile
    (a head stored with 5000 added came out "no face found", nothing removed)."""
    values = data.reshape(-1)[:: max(1, data.numel() // SAMPLE_VOXELS)]
    lo, hi = (float(v) for v in np.percentile(values.numpy(), [0.5, 99.5]))
    if abs(lo) > OFFSET_SHARE * max(hi - lo, 1e-6):
        return data - lo
    return data


NOISY_AIR_GATE = 0.05  # median step between the array's faces and the layer inside, as a share of the 99.5th pct
NOISY_AIR_LEVEL = 0.16  # ... and its 5^3 mean above which a voxel connected to the array's edge is noise


def quiet_background(data: np.ndarray) -> np.ndarray:
    """``data`` (X, Y, Z, float, finite) with a salt-and-pepper background set to 0, as the network and the
    registration expect air; unchanged unless its edges are such noise (an MP2RAGE UNI image's air
    spans the whole intensity range: 0.25-0.28 of the 99.5th percentile; every image in ../shared
    is at most 0.013).

    Noise is where a voxel's difference from its 3x3x3 median, averaged over 5x5x5, is large
    (tissue is smooth at that scale, edges included) in one piece with the array's edges; small
    islands left in it go too. A head with such air was seen as a grey box: the atlas registration
    was implausible and 6,600 voxels of deepbet's brain were removed (a simulated UNI IXI 052)."""
    from scipy import ndimage as ndi

    values = data.reshape(-1)[:: max(1, data.size // SAMPLE_VOXELS)]
    hi = float(np.percentile(values, 99.5)) if values.size else 0.0
    if not np.isfinite(hi) or hi <= 0 or min(data.shape) < 8:
        return data
    steps = []  # each face's voxels against their neighbours one voxel in: noise differs, air and tissue do not
    for axis in range(3):
        edge = np.moveaxis(data, axis, 0)
        steps += [np.abs(edge[0] - edge[1]).ravel(), np.abs(edge[-1] - edge[-2]).ravel()]
    if float(np.median(np.concatenate(steps))) <= NOISY_AIR_GATE * hi:
        return data
    residual = ndi.uniform_filter(np.abs(data - ndi.median_filter(data, size=3)), size=5)
    labels, _ = ndi.label(residual > NOISY_AIR_LEVEL * hi)
    edges = np.concatenate([np.moveaxis(labels, axis, 0)[side].ravel() for axis in range(3) for side in (0, -1)])
    air = np.isin(labels, np.unique(edges[edges > 0]))
    pieces, n = ndi.label(~air)
    if n:
        sizes = np.bincount(pieces.ravel())[1:]
        air |= np.isin(pieces, 1 + np.nonzero(sizes < 0.05 * sizes.max())[0])
    return np.where(air, 0.0, data).astype(data.dtype, copy=False)


# a fitted first-order field ranging more than this (97.5th / 2.5th percentile over the head) is flattened
BIAS_GATE = 2.3
BIAS_ORDER = 2  # ... by a field of this polynomial order (in log intensity)


def _log_field_fit(values: np.ndarray, coords: tuple[np.ndarray, ...], order: int, rounds: int = 4) -> np.ndarray:
    """Coefficients of a polynomial (of ``order``, in the coordinates) fitted to log ``values``,
    each round on the voxels within one median absolute deviation of the last fit: the dominant
    tissue, whose intensity should be one level throughout the head."""
    design = np.stack([np.broadcast_to(t, values.shape) for t in _monomials(coords, order)], -1)
    y = np.log(values)
    keep = np.ones(y.size, bool)
    for _ in range(rounds):
        coef = np.linalg.lstsq(design[keep], y[keep], rcond=None)[0]
        residual = y - design @ coef
        centre = np.median(residual[keep])
        keep = np.abs(residual - centre) < np.median(np.abs(residual[keep] - centre)) + 1e-6
    return coef


def _monomials(coords: tuple[np.ndarray, ...], order: int) -> list[np.ndarray]:
    """The terms x^i y^j z^k (i + j + k <= order) of coordinates that broadcast together."""
    x, y, z = coords
    return [x**i * y**j * z**k
            for i in range(order + 1) for j in range(order + 1 - i) for k in range(order + 1 - i - j)]


def _polynomial(coords: tuple[np.ndarray, ...], coef: np.ndarray, order: int) -> np.ndarray:
    """The polynomial with ``coef`` (in ``_monomials``' order) at ``coords``."""
    return sum(c * term for c, term in zip(coef, _monomials(coords, order)))


def _dominant_tissue(x: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """Every second voxel's intensity inside the head (away from its edge, above the darkest
    tissue) of a normalised (X, Y, Z) ``x``, and their coordinates scaled to [-1, 1] over ``x``."""
    from scipy import ndimage as ndi

    coarse = x[::2, ::2, ::2]
    tissue = ndi.binary_erosion(ndi.gaussian_filter(coarse, 1.0) > 0.1, iterations=2) & (coarse > 0.05)
    axes = [np.linspace(-1.0, 1.0, n)[::2] for n in x.shape]
    return coarse[tissue], tuple(axis[i] for axis, i in zip(axes, np.nonzero(tissue)))


def bias_strength(x: np.ndarray) -> float:
    """How many times brighter the same tissue is on one side of a normalised head (X, Y, Z) than on
    the other: the 97.5th / 2.5th percentile over the head of a first-order field fitted to it
    (1.0 when there is too little tissue to tell)."""
    return _strength(*_dominant_tissue(x))


def _strength(values: np.ndarray, points: tuple[np.ndarray, ...]) -> float:
    """``bias_strength`` of the dominant tissue's ``values`` at ``points``."""
    if values.size < 1000:
        return 1.0
    gauge = _polynomial(points, _log_field_fit(values, points, 1), 1)
    return float(np.exp(np.percentile(gauge, 97.5) - np.percentile(gauge, 2.5)))


def flatten_bias(image: torch.Tensor) -> torch.Tensor:
    """A normalised canonical ``image`` (1, X, Y, Z) divided by its smooth intensity field when that
    field is strong (an uncorrected receive-coil bias); unchanged otherwise.

    ``bias_strength`` gauges the field against ``BIAS_GATE``. The same 13 validation heads times a
    field from 0.3 to 1.6 reach 2.60-4.08 as acquired, down to 1.90 when 3 mm or cut at the mouth (a
    biased s20 FLAIR cut at the mouth, 2.39, lost 29 deepbet brain voxels unflattened, none
    flattened); the 34 evaluation heads as scanned, in three other contrasts and six acquisitions
    reach 2.49 (6 of 952 versions above the gate: a tight NiChart T1, IXI 484 cut at the mouth),
    the 213 heads of ../shared 2.97 (4 NiChart T1s above). A second-order fit to the dominant
    tissue's log intensity then removes the field, clamped to its range over the head so the air
    stays dark. Such a field moved the atlas registration of a stroke T2 4.5 mm (up to 12.8) into
    the frontal lobe, and with the network's errors 9,807 of its brain voxels were removed;
    flattened, none."""
    x = image[0].numpy()
    values, points = _dominant_tissue(x)
    if _strength(values, points) <= BIAS_GATE:
        return image
    coef = _log_field_fit(values, points, BIAS_ORDER)
    at_tissue = _polynomial(points, coef, BIAS_ORDER)
    grid = np.ix_(*[np.linspace(-1.0, 1.0, n) for n in x.shape])
    log_field = np.broadcast_to(_polynomial(grid, coef, BIAS_ORDER), x.shape).clip(at_tissue.min(), at_tissue.max())
    flat = x / np.exp(log_field - np.median(at_tissue))
    return torch.from_numpy(flat.astype(np.float32))[None]


@dataclass(frozen=True)
class CanonicalInput:
    """The network input on the canonical grid and what is needed to map results back."""

    image: torch.Tensor  # (1, X, Y, Z) float32, normalised
    grid: Grid
    inside: torch.Tensor  # (X, Y, Z) bool: inside the native field of view


def native_intensities(volume: np.ndarray) -> np.ndarray:
    """A 3D native volume (float, scaled values) as ``to_canonical`` resamples it: float32, non-finite
    values 0, salt-and-pepper air quieted (``quiet_background``), an offset removed (``without_offset``).
    A caller that needs several grids of one image cleans it once and passes ``cleaned=True`` to
    ``to_canonical`` (a UNI-like head took 5 s each time)."""
    data = np.array(volume, dtype=np.float32, order="C")  # a copy of its own, cleaned in place
    bad = ~np.isfinite(data)
    if bad.any():
        data[bad] = 0.0
    return without_offset(torch.from_numpy(quiet_background(data))[None])[0].numpy()


def to_canonical(volume: np.ndarray, affine: np.ndarray, spacing: float = 2.0, multiple: int = 16,
                 max_size: int = 256, rotation: np.ndarray | None = None, cleaned: bool = False) -> CanonicalInput:
    """Bring a 3D native volume (float, scaled values) to the canonical network input
    (``rotation``: see ``canonical_grid``; ``cleaned``: ``volume`` came from ``native_intensities``)."""
    data = torch.from_numpy(volume if cleaned else native_intensities(volume))[None]
    grid = canonical_grid(Grid(tuple(volume.shape[:3]), np.asarray(affine, float)), spacing, multiple, max_size,
                          rotation)
    pooled, pooled_affine = antialias(data, np.asarray(affine, float), spacing)
    image = resample(pooled, pooled_affine, grid)
    inside = fov_mask(pooled_affine, tuple(pooled.shape[1:]), grid)
    image = normalize_intensity(image, inside[None])
    flat = flatten_bias(image)
    if flat is not image:
        image = normalize_intensity(flat, inside[None])
    return CanonicalInput(image, grid, inside)
