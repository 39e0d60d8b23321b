"""Training samples in the spirit of SynthSeg/SynthStrip, written in plain torch.

A sample starts from a subject on a 1 mm RAS grid: either BrainWeb tissue classes (random
intensity per class: T1-, T2-, PD-, FLAIR-, CT-like or fully random contrast) or a real
image (gamma, inversion, random monotone curve). Both then go through the same spatial
augmentation (small or large rotations, any of the 48 axis flips/permutations, scaling,
elastic warp) straight onto the 2 mm training grid, then partial-volume and thick-slice
blur, bias field, Rician noise, field-of-view crops (with or without neck, a face cut by the
edge), and occasionally a skull-stripped or already-defaced variant with no face label.
Intensities end normalised exactly as at inference (preprocessing.normalize_intensity).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from deface import BACKGROUND, BRAIN, FACE
from deface.preprocessing import Grid, normalize_intensity, sampling_grid

# Mean intensity per BrainWeb class for the contrast presets:
# bg, CSF, GM, WM, fat, muscle, skin, skull, vessel, connective, dura, marrow
PRESETS = {
    "t1": [0.0, 0.15, 0.45, 0.7, 0.95, 0.35, 0.5, 0.05, 0.6, 0.6, 0.35, 0.8],
    "t2": [0.0, 0.95, 0.55, 0.4, 0.6, 0.2, 0.35, 0.03, 0.2, 0.5, 0.3, 0.5],
    "pd": [0.0, 0.85, 0.75, 0.6, 0.8, 0.45, 0.6, 0.05, 0.4, 0.6, 0.5, 0.7],
    "flair": [0.0, 0.05, 0.6, 0.45, 0.8, 0.3, 0.45, 0.03, 0.2, 0.5, 0.35, 0.6],
    "ct": [0.0, 0.25, 0.32, 0.3, 0.15, 0.3, 0.3, 1.0, 0.35, 0.25, 0.3, 0.8],
}
N_TISSUES, N_LABELS = 12, 4
AXIS_CODES = [(p, s) for p in itertools.permutations(range(3)) for s in itertools.product([1, -1], repeat=3)]


@dataclass
class Subject:
    """One training subject on an axis-aligned RAS grid (``affine``)."""

    name: str
    labels: torch.Tensor  # (X, Y, Z) uint8: 0 background, 1 face, 2 brain
    affine: np.ndarray
    tissue: torch.Tensor | None = None  # (X, Y, Z) uint8 BrainWeb classes, for synthesis
    image: torch.Tensor | None = None  # (X, Y, Z) a real scan: values in [0, 1.5] once times image_scale
    image_scale: float = 1.0  # the cache keeps images as uint8 (a quarter of float32's memory)

    centre: np.ndarray = field(init=False)
    codes: torch.Tensor | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        # World centre of the labelled head (face + brain), the centre of the training patch.
        idx = torch.nonzero(self.labels > 0).float().mean(0).numpy()
        self.centre = self.affine[:3, :3] @ idx + self.affine[:3, 3]
        if self.tissue is not None:
            if int(self.tissue.max()) >= N_TISSUES or int(self.labels.max()) >= N_LABELS:
                raise ValueError(f"{self.name}: tissue classes must be < {N_TISSUES}, labels < {N_LABELS}")
            # Tissue class and label in one byte, so one nearest-neighbour sampling serves both.
            self.codes = self.tissue * N_LABELS + self.labels

    def float_image(self, box: tuple[slice, slice, slice] | None = None) -> torch.Tensor:
        """The real image (or a box of it) as float32 in [0, 1.5]; never a view that could be
        scaled in place."""
        image = self.image if box is None else self.image[box]
        if self.image_scale == 1.0:
            return image.float()
        return image.to(torch.float32, copy=True).mul_(self.image_scale)


@dataclass
class SynthConfig:
    """Probabilities and ranges of the augmentations (the Hydra data config mirrors this)."""

    patch: tuple[int, int, int] = (112, 128, 128)
    spacing: float = 2.0
    p_large_rotation: float = 0.15
    p_axis_permutation: float = 0.15
    max_small_rotation_deg: float = 15.0
    scale: tuple[float, float] = (0.85, 1.15)
    max_shift_mm: float = 25.0
    elastic_mm: float = 4.0
    p_random_contrast: float = 0.4
    p_inversion: float = 0.2
    p_thick_slices: float = 0.4
    max_slice_mm: float = 8.0
    max_bias: float = 0.5
    max_noise: float = 0.06
    p_crop: float = 0.5
    p_skull_stripped: float = 0.08
    p_defaced: float = 0.05
    p_real_classes: float = 0.0  # a real head's intensity clusters as tissue classes, random intensity each
    p_face_cut: float = 0.0  # field of view cut through the face: below at the mouth/nose, or in front at the nose
    presets: dict = field(default_factory=lambda: PRESETS)


def random_rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """A rotation matrix with each Euler angle uniform in +-max_deg."""
    a, b, c = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def spatial_transform(cfg: SynthConfig, rng: np.random.Generator, centre: np.ndarray) -> Grid:
    """The training grid: voxel -> world (subject space), rotated, scaled and shifted."""
    rot = random_rotation(rng, cfg.max_small_rotation_deg)
    u = rng.uniform()
    if u < cfg.p_large_rotation:
        rot = random_rotation(rng, 180.0)
    elif u < cfg.p_large_rotation + cfg.p_axis_permutation:
        perm, signs = AXIS_CODES[rng.integers(len(AXIS_CODES))]
        rot = (np.eye(3)[list(perm)] * np.array(signs)[:, None]) @ rot
    scale = rng.uniform(*cfg.scale, size=3)
    linear = rot @ np.diag(scale * cfg.spacing)
    centre = centre + rng.uniform(-cfg.max_shift_mm, cfg.max_shift_mm, 3)
    half = (np.array(cfg.patch) - 1) / 2.0
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = centre - linear @ half
    return Grid(tuple(cfg.patch), affine)


def smooth_field(shape: tuple[int, ...], channels: int, nodes: int, gen: torch.Generator) -> torch.Tensor:
    """A smooth random field (channels, *shape): Gaussian noise on ``nodes``^3, upsampled."""
    coarse = torch.randn((1, channels, nodes, nodes, nodes), generator=gen)
    return F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)[0]


def gaussian_blur_axis(x: torch.Tensor, sigma: float, axis: int) -> torch.Tensor:
    """Blur (1, X, Y, Z) along one spatial axis with a Gaussian of ``sigma`` voxels."""
    if sigma < 0.3:
        return x
    r = max(int(math.ceil(3 * sigma)), 1)
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sigma) ** 2)
    k = (k / k.sum()).to(x.device)
    shape = [1, 1, 1, 1, 1]
    shape[2 + axis] = k.numel()
    pad = [0, 0, 0, 0, 0, 0]
    pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
    y = F.pad(x[None], pad, mode="replicate")
    return F.conv3d(y, k.view(shape))[0]


def random_contrast(cfg: SynthConfig, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and texture std per BrainWeb class: a preset contrast (jittered) or fully random."""
    n = 12
    if rng.uniform() < cfg.p_random_contrast:
        means = rng.uniform(0, 1, n)
        means[0] = rng.uniform(0, 0.15)
    else:
        preset = list(cfg.presets.values())[rng.integers(len(cfg.presets))]
        means = np.clip(np.array(preset) + rng.normal(0, 0.08, n), 0, 1)
    stds = rng.uniform(0, 0.06, n)
    return torch.tensor(means, dtype=torch.float32), torch.tensor(stds, dtype=torch.float32)


def random_classes(image: torch.Tensor, rng: np.random.Generator, gen: torch.Generator) -> torch.Tensor:
    """SynthSeg-style contrast for a real head: its intensity clusters (4-8 quantile bins of the
    head's intensities) become tissue classes, each given a random mean and texture; air stays dark.
    So a real T1 face comes out T2-, PD-, FLAIR-, CT-like or in no known contrast at all."""
    head = image > 0.05
    values = image[head]
    if values.numel() < 1000:
        return image
    k = int(rng.integers(4, 9))
    sample = values[torch.randint(values.numel(), (min(values.numel(), 200_000),), generator=gen)]
    edges = torch.quantile(sample, torch.linspace(0, 1, k + 1)[1:-1])
    classes = torch.bucketize(image, edges)
    means = torch.tensor(rng.uniform(0.05, 1.0, k), dtype=torch.float32)
    stds = torch.tensor(rng.uniform(0.0, 0.05, k), dtype=torch.float32)
    out = means[classes] + stds[classes] * torch.randn(image.shape, generator=gen)
    return torch.where(head, out.clamp(min=0), image * 0.2)


def face_cut(labels: torch.Tensor, grid: Grid, rng: np.random.Generator) -> torch.Tensor | None:
    """A field of view (bool mask on the patch) that a real scan cuts through the face: from
    below at a level between the chin and the nose bridge (mouth and nose cuts), or from the
    front through the nose; along the patch axis nearest the head's superior or anterior
    direction, as a scanner's field of view is a box in its own axes. None without a face."""
    face = torch.nonzero(labels == FACE)
    if len(face) < 100:
        return None
    below = rng.uniform() < 0.7
    direction = grid.affine[2 if below else 1, :3]  # world S (or A) per voxel step along each axis
    axis = int(np.argmax(np.abs(direction)))
    sign = 1.0 if direction[axis] > 0 else -1.0
    pos = face[:, axis].float() * sign
    level = torch.quantile(pos, float(rng.uniform(0.2, 0.6) if below else rng.uniform(0.8, 0.97)))
    coord = torch.arange(labels.shape[axis], dtype=torch.float32) * sign
    keep = coord >= level if below else coord < level
    shape = [1, 1, 1]
    shape[axis] = -1
    return keep.view(shape).expand(labels.shape)


def augment_real(image: torch.Tensor, cfg: SynthConfig, rng: np.random.Generator,
                 gen: torch.Generator | None = None) -> torch.Tensor:
    """Random tissue classes (``cfg.p_real_classes``), gamma, random monotone curve and contrast
    inversion of a real [0, 1] image."""
    x = image.clamp(0, 1.5)
    if gen is not None and rng.uniform() < cfg.p_real_classes:
        x = random_classes(x, rng, gen)
    x = x.clamp(min=0) ** float(np.exp(rng.uniform(-0.5, 0.5)))
    if rng.uniform() < 0.3:
        knots = np.sort(rng.uniform(0, 1, 4))
        xp = np.concatenate([[0], np.sort(rng.uniform(0, 1, 4)), [1.5]])
        fp = np.concatenate([[0], knots, [1.5]])
        x = torch.from_numpy(np.interp(x.numpy(), xp, fp).astype(np.float32)).reshape(x.shape)
    if rng.uniform() < cfg.p_inversion:
        head = x > 0.1
        x = torch.where(head, 1.05 - x.clamp(max=1.0), x)
    return x


def crop_box(shape: tuple[int, ...], rng: np.random.Generator) -> torch.Tensor:
    """A random field-of-view box mask: tight crops, no neck, or a face cut by the edge."""
    box = torch.ones(shape, dtype=torch.bool)
    for axis, n in enumerate(shape):
        lo = int(rng.uniform(0, 0.3) * n) if rng.uniform() < 0.5 else 0
        hi = int(rng.uniform(0, 0.3) * n) if rng.uniform() < 0.5 else 0
        sl = [slice(None)] * 3
        sl[axis] = slice(0, lo)
        box[tuple(sl)] = False
        sl[axis] = slice(n - hi, n)
        box[tuple(sl)] = False
    return box


def source_box(coords: torch.Tensor, shape: tuple[int, int, int]) -> tuple[tuple[slice, slice, slice], torch.Tensor]:
    """The box of a (X, Y, Z) source that ``grid_sample`` coordinates (1, *patch, 3; align_corners)
    reach, and the coordinates normalised to that box: sampling the box gives what sampling the
    whole source gives (zero padding included), and only the box is made float."""
    low, high = coords.reshape(-1, 3).aminmax(dim=0)
    box, gain, offset = [], [0.0] * 3, [0.0] * 3
    for axis in range(3):
        n, c = shape[axis], 2 - axis  # grid_sample's channels are the array's axes reversed
        half = 0.5 * (n - 1)
        lo = min(max(math.floor((float(low[c]) + 1) * half), 0), n - 2)
        hi = max(min(math.floor((float(high[c]) + 1) * half) + 2, n), lo + 2)
        box.append(slice(lo, hi))
        # x -> index (x + 1) * half -> box index - lo -> normalised over hi - lo voxels
        gain[c] = half * 2.0 / (hi - lo - 1)
        offset[c] = (half - lo) * 2.0 / (hi - lo - 1) - 1.0
    return tuple(box), (coords * torch.tensor(gain)).add_(torch.tensor(offset))


def synthesize(subject: Subject, cfg: SynthConfig, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One training pair: image (1, *patch) float32 and labels (*patch) int64."""
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    if subject.tissue is not None:
        means, stds = random_contrast(cfg, rng)
    grid = spatial_transform(cfg, rng, subject.centre)
    shape = tuple(subject.labels.shape)
    coords = sampling_grid(subject.affine, shape, grid)
    if cfg.elastic_mm > 0:
        disp = smooth_field(cfg.patch, 3, 5, gen).permute(1, 2, 3, 0)[None]
        scale = torch.tensor([2.0 / (s - 1) for s in shape[::-1]])
        coords = coords + disp * rng.uniform(0, cfg.elastic_mm) * scale
    inside = (coords.abs() <= 1).all(-1)[0]
    # Only the box the patch reaches is read from the 1 mm source (and made float).
    box, coords = source_box(coords, shape)
    if subject.tissue is not None:
        source = torch.from_numpy(np.take(means.numpy(), subject.tissue[box].numpy()))  # uint8 indices
    else:
        source = subject.float_image(box)
    image = F.grid_sample(source[None, None], coords, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
    nearest = subject.codes if subject.codes is not None else subject.labels
    nearest = F.grid_sample(nearest[box][None, None].float(), coords, mode="nearest", padding_mode="zeros",
                            align_corners=True)[0, 0].long()
    labels = nearest % N_LABELS if subject.codes is not None else nearest
    if subject.tissue is not None:
        tissue = nearest // N_LABELS
        image = image + stds[tissue][None] * torch.randn(image.shape, generator=gen)
    else:
        image = augment_real(image[0], cfg, rng, gen)[None]
    sigma = rng.uniform(0.0, 0.8)
    for axis in range(3):
        image = gaussian_blur_axis(image, sigma, axis)

    if rng.uniform() < cfg.p_thick_slices:
        thickness = rng.uniform(3.0, cfg.max_slice_mm)
        image = gaussian_blur_axis(image, thickness / 2.355 / cfg.spacing, int(rng.integers(3)))
    image = image * torch.exp(smooth_field(cfg.patch, 1, 4, gen) * rng.uniform(0, cfg.max_bias))
    sigma = rng.uniform(0, cfg.max_noise)
    image = torch.sqrt((image + sigma * torch.randn(image.shape, generator=gen)) ** 2
                       + (sigma * torch.randn(image.shape, generator=gen)) ** 2)

    if rng.uniform() < cfg.p_crop:
        inside &= crop_box(cfg.patch, rng)
    if rng.uniform() < cfg.p_face_cut:
        cut = face_cut(torch.where(inside, labels, torch.zeros_like(labels)), grid, rng)
        if cut is not None:
            inside &= cut
    u = rng.uniform()
    if u < cfg.p_skull_stripped:
        brain = F.max_pool3d((labels == BRAIN).float()[None, None], 3, 1, 1)[0, 0] > 0
        inside &= brain
        labels = torch.where(labels == FACE, torch.full_like(labels, BACKGROUND), labels)
    elif u < cfg.p_skull_stripped + cfg.p_defaced:
        face = labels == FACE
        image = torch.where(face[None], torch.zeros_like(image), image)
        labels = torch.where(face, torch.full_like(labels, BACKGROUND), labels)
    labels = torch.where(inside, labels, torch.full_like(labels, BACKGROUND))
    image = torch.where(inside[None], image, torch.zeros_like(image))
    return normalize_intensity(image, inside[None]).float(), labels
