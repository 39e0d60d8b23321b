"""The inference wrapper: ``Defacer`` loads the network once and defaces images one by one.

    from deface import Defacer
    d = Defacer(device="auto")
    result = d.deface("sub-01_T1w.nii.gz")     # path, nibabel image or io.Volume
    result.image, result.mask, result.stats
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from deface import MODES, io
from deface.network import build_network, downsampling_factor
from deface.postprocessing import (PostprocessConfig, canonical_masks, protect_also, remove_also, restrict_to,
                                  to_native)
from deface.preprocessing import CanonicalInput, Grid, to_canonical, voxel_sizes

log = logging.getLogger("deface")


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA GPU is available")
    return torch.device(device)


@dataclass
class DefaceResult:
    """What ``Defacer.deface`` returns: the defaced image, the removal mask and per-file stats."""

    volume: io.Volume
    raw: np.ndarray  # defaced stored values, native shape and dtype
    mask: np.ndarray  # (X, Y, Z) bool: voxels replaced in every volume
    stats: dict[str, Any] = field(default_factory=dict)
    to_atlas: np.ndarray | None = None  # world transform image -> atlas, when registered (for --applyto)

    @property
    def image(self) -> nib.spatialimages.SpatialImage:
        return io.output_image(self.volume, self.raw)

    @property
    def mask_image(self) -> nib.Nifti1Image:
        return nib.Nifti1Image(self.mask.astype(np.uint8), self.volume.affine)


def looks_already_defaced(image: np.ndarray, remove: np.ndarray) -> bool:
    """True when the region to remove is mostly exact zeros while the rest of the air is not:
    the mark a defacing tool leaves (a block set to 0 in an otherwise noisy background)."""
    finite = np.nan_to_num(image, nan=0.0)
    air = finite <= 0.05 * float(np.percentile(finite, 99))
    zero = finite == 0
    outside = air & ~remove
    if remove.sum() < 100 or outside.sum() < 100:
        return False
    return bool(zero[remove].mean() > 0.5 and zero[outside].mean() < 0.2)


def background_air(values: np.ndarray, remove: np.ndarray, min_voxels: int = 1000) -> np.ndarray:
    """Values of the image's own air outside ``remove`` (at most 5 % of the 99th percentile), for
    --mode noise. Exact zeros are left out when there is enough real noise, since scanners and
    tools zero-fill parts of the field of view; an image whose air is all zeros gives zeros, the
    only background it has (``noise_from_zero_air`` in the stats)."""
    finite = np.isfinite(values)
    threshold = 0.05 * float(np.percentile(values[finite], 99)) if finite.any() else 0.0
    air = values[finite & (values <= threshold) & ~remove]
    noisy = air[air != 0]
    if noisy.size >= min_voxels:
        return noisy
    return air if air.size else np.zeros(1, np.float32)


class Defacer:
    """Holds the network and the settings; ``deface`` is safe to call for many files.

    ``weights``: a weights folder, .json or .pt (default: the shipped weights).
    ``network`` + ``metadata``: inject a network (tests, fine-tuned models in memory).
    ``atlas_guard``: also protect the brain of a registered atlas (deface.atlas); default on.
    ``post``: postprocessing settings (postprocessing.PostprocessConfig) over the weights' own;
    an unknown key, here or in the weights' metadata, is an error.
    ``mode``: how removed voxels are replaced (``MODES``); "reface" paints a generic face
    (deface.reface) placed by the atlas registration, so it registers even without the guard.
    ``ears``: remove the ears too (deface.anatomy's ear region through the atlas registration,
    outside every protected voxel); off by default, as in fsl_deface.
    The atlas is registered in ``prepare`` (CPU work that the CLI runs in its reader threads,
    beside the network), its brain is protected in ``apply``.
    """

    def __init__(self, weights: str | Path | None = None, device: str = "auto", mode: str = "zero",
                 fill_value: float = 0.0, brain_margin_mm: float | None = None, min_face_ml: float | None = None,
                 mask_from: str = "first", seed: int = 0, network: torch.nn.Module | None = None,
                 metadata: dict[str, Any] | None = None, max_voxels: int = 512**3,
                 atlas_guard: bool | None = None, post: dict[str, Any] | None = None, ears: bool = False) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self.device = resolve_device(device)
        if network is None:
            from deface.weights import load_state_dict

            state, metadata = load_state_dict(weights)
            network = build_network(metadata["architecture"])
            network.load_state_dict(state)
        self.metadata = metadata or {}
        self.network = network.to(self.device).eval()
        pre = self.metadata.get("preprocessing", {})
        self.spacing = float(pre.get("spacing_mm", 2.0))
        self.multiple = int(pre.get("multiple", downsampling_factor(self.metadata.get("architecture", {})) or 16))
        post_overrides = dict(post or {})
        post = dict(self.metadata.get("postprocessing", {}))
        if brain_margin_mm is not None:
            post["brain_margin_mm"] = brain_margin_mm
        if min_face_ml is not None:
            post["min_face_ml"] = min_face_ml
        if atlas_guard is not None:
            post["atlas"] = atlas_guard
        post.update(post_overrides)
        unknown = sorted(set(post) - set(PostprocessConfig.__annotations__))
        if unknown:
            raise ValueError(f"unknown postprocessing setting(s) {', '.join(unknown)}; known: "
                             f"{', '.join(PostprocessConfig.__annotations__)}")
        self.post = PostprocessConfig(**post)
        self.atlas = None
        self.ears = ears
        if self.post.atlas or mode == "reface" or ears:
            from deface.atlas import Atlas

            self.atlas = Atlas.load()
        self.mode, self.fill_value, self.mask_from, self.seed = mode, fill_value, mask_from, seed
        self.max_voxels = max_voxels

    # -- stages -------------------------------------------------------------------------------
    def prepare(self, source: str | Path | nib.spatialimages.SpatialImage | io.Volume) -> tuple[io.Volume, CanonicalInput]:
        """Load (if needed) and bring the reference volume to the canonical grid (CPU work)."""
        if isinstance(source, io.Volume):
            volume = source
        elif isinstance(source, (str, Path)):
            volume = io.load(source, self.max_voxels)
        else:
            volume = io.from_image(source, None, self.max_voxels)
        ref = volume.reference(self.mask_from)
        if not np.isfinite(ref).any() or np.nanmax(ref) == np.nanmin(ref):
            raise io.InputError("the image is constant (all voxels equal): nothing to deface")
        canon = to_canonical(ref, volume.affine, self.spacing, self.multiple)
        if self.atlas is None:
            return volume, canon
        from deface.atlas import Head, euler, head_mi, head_pose, register_atlas, rigid_part, rotation_deg

        t0 = time.perf_counter()
        image, affine = canon.image[0].numpy(), canon.grid.affine
        head = Head(image, affine)  # its outline and top serve the pose search and the fit comparison
        start = head_pose(self.atlas, head)
        reg = register_atlas(self.atlas, image, affine)  # from upright, as validated on heads as scanned
        pose = rigid_part(start[:3, :3])
        if rotation_deg(pose) > self.post.atlas_search_deg:
            # A tilted head is registered from the search's pose too, on a grid turned by it, so the
            # registration's metric region (the top of the head) is this head's top (niivue tilted
            # on the axis-aligned grid: 27 mm off, face recall 0.456 instead of 0.782). The better
            # fit to the intensities is kept: an outline fits some wrong poses well (IXI 296
            # upright came out at 65 degrees).
            seen = to_canonical(ref, volume.affine, self.spacing, self.multiple, rotation=pose)
            searched = register_atlas(self.atlas, seen.image[0].numpy(), seen.grid.affine, start=start)
            if searched.to_atlas is not None and (reg.to_atlas is None or head_mi(head, self.atlas.head, searched.to_atlas)
                                                  < head_mi(head, self.atlas.head, reg.to_atlas)):
                reg = searched
        if reg.to_atlas is not None:
            turn = rigid_part(reg.to_atlas[:3, :3])
            if rotation_deg(turn) > self.post.atlas_upright_deg:  # the network sees the head upright
                turned = euler(self.post.atlas_upright_pitch_deg, 0.0, 0.0) @ turn
                canon = to_canonical(ref, volume.affine, self.spacing, self.multiple, rotation=turned)
        canon.to_atlas, canon.registration = reg.to_atlas, reg.status
        canon.registration_s = time.perf_counter() - t0
        return volume, canon

    @torch.inference_mode()
    def predict(self, inputs: list[CanonicalInput]) -> list[torch.Tensor]:
        """Class probabilities (C, X, Y, Z) on CPU for a batch of canonical inputs (padded together)."""
        shape = np.max([c.image.shape[1:] for c in inputs], axis=0)
        batch = torch.zeros((len(inputs), 1, *shape), dtype=torch.float32)
        for i, c in enumerate(inputs):
            x, y, z = c.image.shape[1:]
            batch[i, :, :x, :y, :z] = c.image
        batch = batch.to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            logits = self.network(batch)
        probs = torch.softmax(logits.float(), 1).cpu()
        return [probs[i, :, : c.image.shape[1], : c.image.shape[2], : c.image.shape[3]] for i, c in enumerate(inputs)]

    def apply(self, volume: io.Volume, canon: CanonicalInput, probs: torch.Tensor) -> DefaceResult:
        """Masks from probabilities, then the replaced voxels; brain protection is applied here."""
        t0 = time.perf_counter()
        masks = canonical_masks(probs, self.spacing, self.post, canon.inside, canon.image[0])
        if self.atlas is not None and canon.registration == "off":
            raise ValueError("the atlas guard and --mode reface need the input from Defacer.prepare "
                             "(it registers the atlas)")
        wants_ears = self.ears and canon.to_atlas is not None and not masks.brain_only
        guarded = self.post.atlas and canon.to_atlas is not None and (bool(masks.remove.any()) or wants_ears)
        if guarded or wants_ears:
            from deface.anatomy import ear_region_mni, face_region_mni
            from deface.atlas import atlas_points, brain_on_grid

            mni = atlas_points(canon.to_atlas, canon.grid)
        if guarded:
            guard = brain_on_grid(self.atlas, canon.to_atlas, canon.grid, self.post.atlas_threshold)
            masks = protect_also(masks, guard, self.post.atlas_margin_mm, self.spacing)
            masks = restrict_to(masks, torch.from_numpy(face_region_mni(mni, self.post.atlas_face_margin_mm)))
            if self.post.atlas_complete and masks.face_found:  # completes a face, never starts one
                tissue = (canon.image[0] > self.post.tissue_threshold) & canon.inside
                masks = remove_also(masks, torch.from_numpy(face_region_mni(mni)) & tissue)
        if wants_ears:  # after the atlas guard, so its brain is protected from the ears' removal too
            masks = remove_also(masks, torch.from_numpy(ear_region_mni(mni)) & canon.inside)
        # Without a registration (stats say why) only the network protects the brain.
        native = Grid(tuple(volume.raw.shape[:3]), volume.affine)
        remove, box, protected = to_native(masks, canon.grid, native)
        raw = self.replace(volume, remove, canon.to_atlas)
        changed = (raw != volume.raw).reshape(raw.shape[:3] + (-1,)).any(-1)
        brain_changed = int((changed[box] & protected).sum()) if box is not None else 0
        voxel_ml = float(np.abs(np.linalg.det(volume.affine[:3, :3]))) / 1000.0
        removed = int(changed.sum())  # what "removed" means to a user: voxels whose value changed
        stats = {
            # a mask that lies on zero-valued air changes nothing: that image has no face to remove
            "face_found": masks.face_found and removed > 0,
            "brain_only": masks.brain_only,
            "already_defaced": bool(remove.any()) and looks_already_defaced(volume.reference(self.mask_from), remove),
            "face_ml_predicted": round(masks.face_ml, 2),
            "removed_ml": round(removed * voxel_ml, 2),
            "removed_voxels": removed,
            "mask_voxels": int(remove.sum()),
            "brain_voxels_changed": brain_changed,
            "changed_outside_mask": int((changed & ~remove).sum()),
            "noise_from_zero_air": self.mode == "noise" and bool(remove.any())
            and not bool(np.any(background_air(volume.reference(self.mask_from), remove) != 0)),
            "mode": self.mode_for(canon.to_atlas),  # the mode used: reface falls back to zero unregistered
            "reface_fallback": self.mode_for(canon.to_atlas) != self.mode,
            "ears_removed": wants_ears,
            "atlas_registration": canon.registration,
            "atlas_s": round(canon.registration_s, 3),
            "postprocess_s": round(time.perf_counter() - t0, 3),
        }
        return DefaceResult(volume, raw, remove, stats, canon.to_atlas)

    def mode_for(self, to_atlas: np.ndarray | None) -> str:
        """The replacement mode used for an image: ``self.mode``, or "zero" for --mode reface
        without a registration (nothing to place the generic face with)."""
        return "zero" if self.mode == "reface" and to_atlas is None else self.mode

    def replace(self, volume: io.Volume, remove: np.ndarray, to_atlas: np.ndarray | None = None) -> np.ndarray:
        """Stored values with the ``remove`` voxels replaced in every volume, per ``self.mode``.
        ``to_atlas`` (image -> atlas world) places the generic face of --mode reface; without
        it that mode writes zeros (the stats' "mode" says so)."""
        raw = volume.raw.copy()
        if not remove.any():
            return raw
        flat = raw.reshape(raw.shape[:3] + (-1,))
        rng = np.random.default_rng(self.seed)
        mode = self.mode_for(to_atlas)
        if mode == "reface":
            from deface import reface

            voxel_mm = voxel_sizes(volume.affine)
            box = reface.box_of(remove, np.ceil(2 * reface.BLEND_MM / np.maximum(voxel_mm, 1e-3)) + 1)
            head = reface.load_generic_head()
            ref = volume.reference(self.mask_from)
            finite = np.isfinite(ref)
            tissue = finite & (ref > 0.1 * float(np.percentile(ref[finite], 99))) if finite.any() else finite
            placed = reface.fit_depth(head, to_atlas, volume.affine, box, tissue, remove)
            weights = reface.class_weights(head, placed, volume.affine, box)
        for t in range(flat.shape[3]):
            vol = flat[..., t]
            if mode == "reface":
                sub = vol[box]
                sub[remove[box]] = volume.to_raw(reface.reface_values(volume.scaled(sub), remove[box], weights,
                                                                      voxel_mm))
                vol[box] = sub
            elif mode == "zero":
                vol[remove] = volume.to_raw(np.zeros(1))[0]
            elif mode == "fill":
                vol[remove] = volume.to_raw(np.full(1, self.fill_value))[0]
            elif mode == "noise":
                air = background_air(volume.scaled(vol), remove)
                vol[remove] = volume.to_raw(rng.choice(air, size=int(remove.sum()), replace=True))
            elif mode == "blur":
                box = tuple(slice(max(s.min() - 8, 0), s.max() + 9) for s in np.nonzero(remove))
                sigma = 6.0 / np.maximum(voxel_sizes(volume.affine), 1e-3)
                from scipy.ndimage import gaussian_filter

                smooth = gaussian_filter(volume.scaled(vol[box]), sigma)
                sub = vol[box]
                sub[remove[box]] = volume.to_raw(smooth[remove[box]])
                vol[box] = sub
        return flat.reshape(raw.shape)

    def deface(self, source: str | Path | nib.spatialimages.SpatialImage | io.Volume,
               probs: torch.Tensor | None = None) -> DefaceResult:
        """Deface one image. ``probs`` (C, X, Y, Z on the canonical grid) bypasses the network."""
        t0 = time.perf_counter()
        volume, canon = self.prepare(source)
        t1 = time.perf_counter()
        if probs is None:
            probs = self.predict([canon])[0]
        t2 = time.perf_counter()
        result = self.apply(volume, canon, probs)
        result.stats.update(load_preprocess_s=round(t1 - t0, 3), network_s=round(t2 - t1, 3))
        return result

