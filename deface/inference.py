"""The inference wrapper: ``Defacer`` loads the network once and defaces images one by one.

    from deface import Defacer
    d = Defacer(device="auto")
    result = d.deface("sub-01_T1w.nii.gz")     # path, nibabel image or io.Volume
    result.image, result.mask, result.stats
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np
import torch

from deface import FACE, MODES, io
from deface.network import build_network, downsampling_factor, probabilities
from deface.postprocessing import (CanonicalMasks, PostprocessConfig, canonical_masks, class_map, cut_band,
                                  filled_tissue_ml, grow, protect_also, remove_also, restrict_to,
                                  skull_stripped_excess_ml, tissue_signal, to_native)
from deface.preprocessing import (CanonicalInput, Grid, acquisition_rotation, native_intensities, rigid_part,
                                  to_canonical, voxel_sizes)

if TYPE_CHECKING:
    from deface.atlas import Registration

DEFERRED = "deferred"  # Registration.status: prepare left it to apply (the image may be brain-only)
NOT_NEEDED = "not needed (skull-stripped)"  # ... and apply found it skull-stripped: nothing is removed
# ... or its registration failed or was refused, so whether it is a head cut short or a skull-stripped
# brain is unknown: nothing is removed (the status goes on with the registration's own)
UNREGISTERED = "failed on an image no larger than a brain, left whole"

log = logging.getLogger("deface")
# matplotlib (QC pictures) and dlib (face check) are not thread-safe: one writer thread at a time
# (two at once crashed the interpreter with a segmentation fault in the container's test run).
QC_LOCK = threading.Lock()


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA GPU is available")
    return torch.device(device)


@dataclass
class Regions:
    """The canonical-grid regions that ``Defacer.apply`` composes into what is removed, kept apart
    so that a probe can ask which of them keeps a voxel (scripts/kept_face.py, kept_render.py).
    Without a registration only ``network`` is set."""

    network: CanonicalMasks  # the network's removal and protected brain (+ margin)
    atlas: torch.Tensor | None = None  # the registered atlas brain grown by its margins: protected
    atlas_margin_mm: float | None = None  # ... the margin in front (``Defacer.atlas_front_margin``)
    allowed: torch.Tensor | None = None  # the registered face region + margins: nothing removed outside
    complete: torch.Tensor | None = None  # tissue in the face region: removed where not protected
    ears: torch.Tensor | None = None  # the registered ear region in the field of view: removed likewise
    brain_beyond_reach_ml: float = 0.0  # the network's brain beyond ``atlas_network_reach_mm`` over the face
    brain_beyond_reach_cut_ml: float = 0.0  # ... of it within ``cut_band_mm`` of the field of view's edge
    face_in_atlas_brain: float | None = None  # share of the network's face inside the registered atlas brain

    def removal(self) -> CanonicalMasks:
        """The network's masks with the atlas brain protected, removal kept to the allowed region,
        then the face completed and the ears added (never where protected)."""
        masks = self.network
        if self.atlas is not None:
            masks = protect_also(masks, self.atlas)
        if self.allowed is not None:
            masks = restrict_to(masks, self.allowed)
        for region in (self.complete, self.ears):
            if region is not None:
                masks = remove_also(masks, region)
        return masks


@dataclass
class DefaceResult:
    """What ``Defacer.deface`` returns: the defaced image, the removal mask and per-file stats."""

    volume: io.Volume
    raw: np.ndarray  # defaced stored values, native shape and dtype
    mask: np.ndarray  # (X, Y, Z) bool: voxels replaced in every volume
    stats: dict[str, Any] = field(default_factory=dict)
    to_atlas: np.ndarray | None = None  # world transform image -> atlas, when registered (for --applyto)
    probs: torch.Tensor | None = None  # the network's class probabilities (C, X, Y, Z) on ``grid``
    grid: Grid | None = None  # the canonical grid
    regions: Regions | None = None  # what was removed and protected on ``grid``, region by region

    @property
    def image(self) -> nib.spatialimages.SpatialImage:
        return io.output_image(self.volume, self.raw)

    @property
    def mask_image(self) -> nib.Nifti1Image:
        return nib.Nifti1Image(self.mask.astype(np.uint8), self.volume.affine)


def looks_already_defaced(image: np.ndarray, remove: np.ndarray) -> bool:
    """True when the region to remove is mostly exact zeros while the rest of the air is not:
    the mark a defacing tool leaves (a block set to 0 in an otherwise noisy background)."""
    if remove.sum() < 100 or (image[remove] == 0).mean() <= 0.5:  # most of it holds signal: a face
        return False
    # every 27th voxel: the same level and fractions, no copy of the whole image
    sample, removed = image[::3, ::3, ::3], remove[::3, ::3, ::3]
    finite = sample[np.isfinite(sample)]
    if finite.size == 0:
        return False
    threshold = 0.05 * float(np.percentile(finite, 99))
    with np.errstate(invalid="ignore"):
        outside = ~removed & ((sample <= threshold) | np.isnan(sample))  # air (NaN counts as air)
    if outside.sum() < 100:
        return False
    return bool((sample[outside] == 0).mean() < 0.2)


def changed_voxels(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """(X, Y, Z) bool: voxels whose value differs in any volume; a NaN left NaN is unchanged
    (NaN != NaN would report every NaN of the input, brain included, as changed)."""
    differ = new != old
    if np.issubdtype(old.dtype, np.floating):
        differ &= ~(np.isnan(new) & np.isnan(old))
    return differ.reshape(old.shape[:3] + (-1,)).any(-1)


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


@dataclass
class Job:
    """One image for ``Defacer.predict_from_files`` and where its outputs go. ``dst`` None: nothing
    is written and the ``DefaceResult`` is kept in the outcome (the Python API, evaluation)."""

    source: str | Path | nib.spatialimages.SpatialImage | io.Volume
    dst: Path | None = None
    mask: Path | None = None  # --save-mask: where the removal mask goes
    applyto: list[tuple[Path, Path]] = field(default_factory=list)  # (co-registered image, its output)
    name: str = ""  # for messages; default: the source path

    def __post_init__(self) -> None:
        self.name = self.name or (str(self.source) if isinstance(self.source, (str, Path)) else "image")


@dataclass
class Outcome:
    """What happened to one ``Job``: status "done", "no face", "brain only", "left whole" or "failed",
    a one-line summary, the stats, the wall-clock seconds from the start of its read to its last output."""

    name: str
    status: str
    details: str
    stats: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    result: DefaceResult | None = None
    error: Exception | None = None
    report_row: dict[str, Any] | None = None  # with ``qc``: the QC report's row


def registration_image(canon: CanonicalInput) -> np.ndarray:
    """The network input's intensities clipped to [0, 1] (up to the 99.5th percentile), as the atlas
    is registered to them: the fit's mutual information bins the whole range, so the brightest 0.5 %
    (fat, vessels, markers) moved its optimum (NiChart s21 T1: 20 degrees as stored, 7 after a
    rescale that clipped that tail)."""
    return canon.image[0].numpy().clip(0.0, 1.0)


def axis_aligned(affine: np.ndarray) -> np.ndarray:
    """A grid's ``affine`` made axis-aligned once more after a turn into a frame and back (the
    rounding leaves ~1e-16 off the diagonal, which the atlas code, axis-aligned, does not accept)."""
    out = np.array(affine, float)
    out[:3, :3] = np.diag(np.diag(out[:3, :3]))
    return out


def outcome_of(name: str, stats: dict[str, Any]) -> tuple[str, str]:
    """(status, summary) of one defaced image from its stats; logs what the user must check."""
    if str(stats.get("atlas_registration", "off")).startswith(UNREGISTERED):
        reason = stats["atlas_registration"][len(UNREGISTERED):].strip(" ()")  # the registration's own status
        log.warning("%s: no larger than a brain, and the atlas registration %s: it may be skull-stripped, "
                    "so nothing was removed; check it (a head cut short keeps its face)", name, reason)
        return "left whole", f"nothing removed (registration {reason})"
    if stats.get("atlas_registration", "off") not in ("ok", "off", NOT_NEEDED):
        log.warning("%s: atlas registration %s: only the network protects the brain; check the output",
                    name, stats["atlas_registration"])
    if stats.get("atlas_network_disagree"):
        log.warning("%s: %.0f %% of what the network calls face lies inside the registered atlas brain, which "
                    "is protected: the face may be only partly removed; check the output",
                    name, 100 * stats["face_in_atlas_brain"])
    if stats.get("reface_fallback"):
        log.warning("%s: --mode reface needs the atlas registration, which did not succeed: zeros were written", name)
    if stats.get("noise_from_zero_air"):
        log.warning("%s: the image's air is all zeros, so --mode noise wrote zeros (as --mode zero)", name)
    if stats.get("already_defaced"):
        log.warning("%s: looks already defaced (the face region is mostly zeros): check the output", name)
    if stats.get("brain_only"):
        log.warning("%s: looks brain-only (skull-stripped): nothing removed", name)
    elif not stats["face_found"]:
        log.warning("%s: no face found, nothing removed (skull-stripped, already defaced or not a head?)", name)
    msg = (f"face {'found' if stats['face_found'] else 'NOT found'}, removed {stats['removed_ml']:.1f} mL, "
           f"brain voxels changed {stats['brain_voxels_changed']}")
    return ("brain only" if stats.get("brain_only") else "done" if stats["face_found"] else "no face"), msg


def progress_bar(total: int, enabled: bool):
    """A tqdm bar on stderr when ``enabled`` (and tqdm is installed), else a stand-in."""
    if enabled:
        try:
            from tqdm import tqdm

            return tqdm(total=total, unit="file", file=sys.stderr)
        except ImportError:
            pass

    class _Silent:
        def update(self, n: int = 1) -> None: ...
        def close(self) -> None: ...

    return _Silent()


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
    outside every protected voxel, and only from an image in which a face is found); default
    (None): whenever the atlas guard is on. Unlike fsl_deface's default: an unchanged ear and the
    side of the head were what the recogniser found and matched in the profile renders of the
    validation heads (docs/evaluation.md).
    The atlas is registered in ``prepare`` (CPU work that the CLI runs in its reader threads,
    beside the network), its brain is protected in ``apply``; an image small enough to be a
    skull-stripped brain is registered in ``apply`` instead, and only if it is a head.
    """

    def __init__(self, weights: str | Path | None = None, device: str = "auto", mode: str = "zero",
                 fill_value: float = 0.0, brain_margin_mm: float | None = None, min_face_ml: float | None = None,
                 mask_from: str = "first", seed: int = 0, network: torch.nn.Module | None = None,
                 metadata: dict[str, Any] | None = None, max_voxels: int = 512**3,
                 atlas_guard: bool | None = None, post: dict[str, Any] | None = None, ears: bool | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self.device = resolve_device(device)
        if network is None:
            from deface.weights import load_state_dict

            state, metadata = load_state_dict(weights)
            network = build_network(metadata["architecture"])
            network.load_state_dict(state)
        self.metadata = metadata or {}
        if metadata is not None:
            from deface.weights import validate_metadata

            validate_metadata(metadata)
        self.network = network.to(self.device).eval()
        pre = self.metadata.get("preprocessing", {})
        self.spacing = float(pre.get("spacing_mm", 2.0))
        self.multiple = int(pre.get("multiple", downsampling_factor(self.metadata.get("architecture", {})) or 16))
        shape = pre.get("input_shape")  # the training patch; without it the whole canonical grid is seen
        self.input_shape = None if shape is None else tuple(int(n) for n in shape)
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
        self.ears = self.post.atlas if ears is None else ears
        if self.post.atlas or mode == "reface" or self.ears:
            from deface.atlas import Atlas

            self.atlas = Atlas.load()
        self.mode, self.fill_value, self.mask_from, self.seed = mode, fill_value, mask_from, seed
        self.max_voxels = max_voxels

    # -- stages -------------------------------------------------------------------------------
    def prepare(self, source: str | Path | nib.spatialimages.SpatialImage | io.Volume
                ) -> tuple[io.Volume, CanonicalInput, Registration | None]:
        """Load (if needed), bring the reference volume to the canonical grid and register the
        atlas to it (CPU work): (volume, network input, the atlas registration or None without an
        atlas). An image with no more tissue than a skull-stripped brain can have
        (``brain_only_max_tissue_ml``) is not registered here: its registration says "deferred",
        and ``apply`` registers it only if the network finds a head, not a brain alone (the
        registration is most of a head's time, and a brain-only image is left whole anyway)."""
        if isinstance(source, io.Volume):
            volume = source
        elif isinstance(source, (str, Path)):
            volume = io.load(source, self.max_voxels)
        else:
            volume = io.from_image(source, None, self.max_voxels)
        ref = volume.reference(self.mask_from)
        if not np.isfinite(ref).any():
            raise io.InputError("the image has no finite values (all NaN or Inf): nothing to deface")
        if np.nanmax(ref) == np.nanmin(ref):
            raise io.InputError("the image is constant (all voxels equal): nothing to deface")
        ref = native_intensities(ref)
        frame = self.acquisition_frame(volume)
        canon = to_canonical(ref, volume.affine, self.spacing, self.multiple,
                             rotation=None if frame is None else frame[:3, :3], cleaned=True)
        if self.atlas is None:
            return volume, canon, None
        from deface.atlas import Registration

        signal = tissue_signal(canon.image[0], canon.inside, self.post).numpy()
        if filled_tissue_ml(signal, self.spacing) <= self.post.brain_only_max_tissue_ml:
            return volume, canon, Registration(None, DEFERRED, 0.0)
        canon, registration = self.register(volume, canon, ref)
        return volume, canon, registration

    def register(self, volume: io.Volume, canon: CanonicalInput, ref: np.ndarray | None = None,
                 nod: bool = False) -> tuple[CanonicalInput, Registration]:
        """Register the atlas to ``canon`` of ``volume`` (as ``prepare`` made it: axis-aligned in the
        image's ``acquisition_frame``): (the network input, turned upright when the head is far
        tilted, or ``canon`` itself; the registration, its ``seconds`` counting the pose search
        too). ``ref``: the reference volume through ``native_intensities``, if the caller has it.
        ``nod``: a poor upright fit is tried again nodded (``atlas_restart_pitch_deg``), as for a head
        cut short (no more tissue than a brain), whose outline leaves pitch loose.
        The work is done in the acquisition frame, the answer given in the world."""
        frame = self.acquisition_frame(volume)
        if frame is None:
            return self._register(volume.affine, volume, canon, ref, nod)
        seen = CanonicalInput(canon.image, Grid(canon.grid.shape, axis_aligned(frame @ canon.grid.affine)), canon.inside)
        turned, registration = self._register(frame @ volume.affine, volume, seen, ref, nod)
        if registration.to_atlas is not None:
            registration = replace(registration, to_atlas=registration.to_atlas @ frame)
        if turned is seen:
            return canon, registration
        back = np.linalg.inv(frame)
        return CanonicalInput(turned.image, Grid(turned.grid.shape, back @ turned.grid.affine), turned.inside), registration

    def _register(self, native_affine: np.ndarray, volume: io.Volume, canon: CanonicalInput,
                  ref: np.ndarray | None, nod: bool = False) -> tuple[CanonicalInput, Registration]:
        """``register`` in a frame where ``canon`` is axis-aligned and the image's affine is
        ``native_affine``; the results are in that frame."""
        from deface.atlas import (GOOD_FIT_MI, Head, euler, head_mi, head_poses, head_top_centre, register_atlas,
                                  roll_yaw_deg, rotation_about, rotation_deg)

        t0 = time.perf_counter()
        image, affine = registration_image(canon), canon.grid.affine
        head = Head(image, affine)  # its outline and top serve the fit comparison and the pose search
        reg = register_atlas(self.atlas, image, affine, head=head)  # from upright, as validated on heads as scanned
        reg_mi = reg.mi  # on this axis-aligned grid, as head_mi(head, ...) would give it
        far = False  # turned far from the atlas pose by the kept registration, found by the pose search
        upright = reg.to_atlas is not None and rotation_deg(rigid_part(reg.to_atlas[:3, :3])) <= self.post.atlas_upright_deg
        pitch = self.post.atlas_restart_pitch_deg
        if nod and pitch > 0 and reg.to_atlas is not None and not (upright and reg_mi < GOOD_FIT_MI):
            first, centre = reg.to_atlas, head_top_centre(head)
            for angle in (-pitch, pitch):
                start = first @ rotation_about(euler(angle, 0.0, 0.0), centre)
                nodded = register_atlas(self.atlas, image, affine, start=start, head=head)
                if nodded.to_atlas is not None and nodded.mi < reg_mi:
                    reg, reg_mi = nodded, nodded.mi
            upright = rotation_deg(rigid_part(reg.to_atlas[:3, :3])) <= self.post.atlas_upright_deg
        if not (upright and reg_mi < GOOD_FIT_MI):
            # Not a well-fitting upright registration (FLAIRs, IXI 212 and the s21 T1 as scanned, the
            # tilted versions at MI -0.09 to -0.26): search the pose. A head the search finds tilted is
            # registered from the search's pose too, on a grid turned by it, so the registration's
            # metric region (the top of the head) is this head's top (niivue tilted on the
            # axis-aligned grid: 27 mm off, face recall 0.456 instead of 0.782). The better fit to the
            # intensities is kept: an outline fits some wrong poses well (IXI 296 upright came out
            # at 65 degrees).
            starts = head_poses(self.atlas, head, self.post.atlas_search_candidates)
            pose = rigid_part(starts[0][:3, :3])
            if (reg.to_atlas is None  # refused (asymmetric, implausible) or failed: any pose will do better
                    or rotation_deg(pose) > self.post.atlas_search_deg
                    or roll_yaw_deg(pose) > self.post.atlas_search_roll_yaw_deg):
                if ref is None:
                    ref = native_intensities(volume.reference(self.mask_from))
                # registered from each of the search's best distinct poses: the outline alone fits some
                # wrong poses best (s21 FLAIR tilted: 26 mm off at the face from the best outline's
                # start, 8 mm from the second's, whose whole-head MI is 0.02 better)
                kept_mi = reg_mi - self.post.atlas_search_mi_margin
                for start in starts:
                    seen = to_canonical(ref, native_affine, self.spacing, self.multiple, rotation=rigid_part(start[:3, :3]),
                                        cleaned=True)
                    searched = register_atlas(self.atlas, registration_image(seen), seen.grid.affine, start=start)
                    if searched.to_atlas is None:
                        continue
                    mi = head_mi(head, self.atlas.head, searched.to_atlas)
                    if mi < kept_mi:
                        reg, kept_mi = searched, mi
                # the outline must look tilted too: a steep FLAIR's was upright (s19, registered 31 deg)
                far = reg.to_atlas is not None and (rotation_deg(rigid_part(reg.to_atlas[:3, :3]))
                                                    > self.post.atlas_upright_deg)
        # With ``atlas_upright_roll_yaw_deg`` set (off by default), a head rolled or turned is seen
        # upright however it was registered: heads as scanned are nodded, seldom turned.
        turn = rigid_part(reg.to_atlas[:3, :3]) if reg.to_atlas is not None else np.eye(3)
        if far or roll_yaw_deg(turn) > self.post.atlas_upright_roll_yaw_deg:
            if ref is None:
                ref = native_intensities(volume.reference(self.mask_from))
            turned = euler(self.post.atlas_upright_pitch_deg, 0.0, 0.0) @ turn
            canon = to_canonical(ref, native_affine, self.spacing, self.multiple, rotation=turned, cleaned=True)
        return canon, replace(reg, seconds=time.perf_counter() - t0)

    def predict(self, inputs: list[CanonicalInput]) -> list[torch.Tensor]:
        """Class probabilities (C, X, Y, Z) on CPU for a batch of canonical inputs, each seen
        through a window fitted to its head where its grid is larger than the training patch
        (``input_shape``; ``network.probabilities``)."""
        return probabilities(self.network, [c.image for c in inputs], self.input_shape, self.multiple, self.spacing,
                             self.device)

    def apply(self, volume: io.Volume, canon: CanonicalInput, probs: torch.Tensor,
              registration: Registration | None = None) -> DefaceResult:
        """Masks from probabilities, then the replaced voxels; brain protection is applied here.
        ``registration``: ``prepare``'s, needed whenever this Defacer has an atlas (a deferred one
        is done here, unless the image is brain-only)."""
        if self.atlas is not None and registration is None:
            raise ValueError("the atlas guard and --mode reface need the registration from Defacer.prepare")
        # an image no larger than a brain that is registered as a head is a head cut short (at the mouth)
        cut_short = registration is not None and registration.status == DEFERRED
        if cut_short:
            canon, probs, registration = self.register_unless_brain_only(volume, canon, probs)
        t0 = time.perf_counter()
        to_atlas = registration.to_atlas if registration is not None else None
        # A registered image was judged before: too much tissue for a brain alone (``prepare``), or
        # not skull-stripped by the network's first pass (``register_unless_brain_only``). A second
        # pass on a grid turned upright is not asked again (s19 FLAIR cut at the mouth: its face far
        # from the brain 73 mL on the first pass, 44.6 on the turned one, under the 45 mL limit).
        known = None if registration is None else (registration.status == NOT_NEEDED
                                                   or registration.status.startswith(UNREGISTERED))
        regions = self.regions(canon, probs, to_atlas, brain_only=known, cut_short=cut_short)
        masks = regions.removal()
        if masks.face_found and self.atlas is not None:
            # What is left to remove once the brain is protected must hold a face's worth of tissue:
            # on a skull-stripped image the brain-only rule missed (a stroke T2 made PD-like: the network
            # calls 120 mL of its brain face), the removal lies on air but for a few brain voxels at its rim.
            tissue = tissue_signal(canon.image[0], canon.inside, self.post)
            if float((masks.remove & tissue).sum()) * self.spacing**3 / 1000.0 < self.post.min_face_ml:
                masks = replace(masks, remove=torch.zeros_like(masks.remove), face_found=False)
        # Without a registration (stats say why) only the network protects the brain.
        native = Grid(tuple(volume.raw.shape[:3]), volume.affine)
        remove, box, protected = to_native(masks, canon.grid, native)
        raw = self.replace(volume, remove, to_atlas)
        changed = changed_voxels(raw, volume.raw)
        brain_changed = int((changed[box] & protected).sum()) if box is not None else 0
        voxel_ml = float(np.abs(np.linalg.det(volume.affine[:3, :3]))) / 1000.0
        removed = int(changed.sum())  # what "removed" means to a user: voxels whose value changed
        stats = {
            # a mask that lies on zero-valued air changes nothing: that image has no face to remove
            "face_found": masks.face_found and removed > 0,
            "brain_only": masks.brain_only,
            "already_defaced": bool(remove.any()) and looks_already_defaced(volume.reference(self.mask_from), remove),
            "face_ml_predicted": round(masks.face_ml, 2),
            "brain_dropped_ml": round(masks.brain_dropped_ml, 2),
            "network_brain_confused": masks.brain_confused,  # its "brain" larger than any brain: not trusted
            "atlas_margin_front_mm": regions.atlas_margin_mm,
            "brain_beyond_reach_ml": round(regions.brain_beyond_reach_ml, 2),
            "brain_beyond_reach_cut_ml": round(regions.brain_beyond_reach_cut_ml, 2),
            "face_in_atlas_brain": (None if regions.face_in_atlas_brain is None
                                    else round(regions.face_in_atlas_brain, 3)),
            "atlas_network_disagree": (regions.face_in_atlas_brain is not None and masks.face_found
                                       and regions.face_in_atlas_brain > self.post.atlas_disagreement_warn),
            "removed_ml": round(removed * voxel_ml, 2),
            "removed_voxels": removed,
            "mask_voxels": int(remove.sum()),
            "brain_voxels_changed": brain_changed,
            "changed_outside_mask": int((changed & ~remove).sum()),
            "noise_from_zero_air": self.mode == "noise" and bool(remove.any())
            and not bool(np.any(background_air(volume.reference(self.mask_from), remove) != 0)),
            "mode": self.mode_for(to_atlas),  # the mode used: reface falls back to zero unregistered
            "reface_fallback": self.mode_for(to_atlas) != self.mode and removed > 0,
            "ears_removed": regions.ears is not None,
            "atlas_registration": registration.status if registration is not None else "off",
            "atlas_s": round(registration.seconds, 3) if registration is not None else 0.0,
            "atlas_symmetry": (round(registration.symmetry, 3) if registration is not None
                               and np.isfinite(registration.symmetry) else None),
            "postprocess_s": round(time.perf_counter() - t0, 3),
        }
        return DefaceResult(volume, raw, remove, stats, to_atlas, probs, canon.grid, regions)

    def regions(self, canon: CanonicalInput, probs: torch.Tensor, to_atlas: np.ndarray | None,
                brain_only: bool | None = None, cut_short: bool = False) -> Regions:
        """The regions ``apply`` removes and protects for the network's ``probs`` on ``canon``,
        through the registration ``to_atlas`` (image -> atlas world; None: the network alone);
        ``brain_only``: whether the image is known to be brain-only (None: judge it), see
        ``canonical_masks``; ``cut_short``: a head with no more tissue than a brain (cut at the
        mouth), whose atlas brain may get a wider margin in front (``atlas_margin_cut_mm``)."""
        guard = support = None
        if self.post.atlas and to_atlas is not None:
            from deface.atlas import brain_on_grid

            guard = brain_on_grid(self.atlas, to_atlas, canon.grid, self.post.atlas_threshold)
            support = grow(guard, self.post.atlas_brain_support_mm, self.spacing)
        masks = canonical_masks(probs, self.spacing, self.post, canon.inside, canon.image[0], support,
                                brain_only=brain_only)
        regions = Regions(masks)
        # the ears go with a face: an image where none is found (skull-stripped, no head) stays whole
        wants_ears = self.ears and to_atlas is not None and masks.face_found
        guarded = self.post.atlas and to_atlas is not None and (bool(masks.remove.any()) or wants_ears)
        if not (guarded or wants_ears):
            return regions
        from deface.anatomy import ear_region_mni, face_region_mni
        from deface.atlas import atlas_points

        mni = atlas_points(to_atlas, canon.grid)
        if guarded:
            face = class_map(probs) == FACE
            if bool(face.any()):
                regions.face_in_atlas_brain = float((face & guard).sum()) / float(face.sum())
            front = torch.from_numpy(mni[..., 1] >= self.post.atlas_front_y_mm)  # over the eyes and brows
            regions.atlas, regions.atlas_margin_mm = self.atlas_protection(guard, masks.protect, front, cut_short)
            regions.allowed = torch.from_numpy(face_region_mni(mni, self.post.atlas_face_margin_mm,
                                                               self.post.atlas_face_bottom_margin_mm))
            protect = masks.protect
            if self.post.atlas_network_reach_mm > 0:
                beyond = regions.allowed & front & ~grow(guard, self.post.atlas_network_reach_mm, self.spacing)
                band = None  # found only where the network has brain beyond the reach (most heads: none)
                if masks.brain is not None and bool((brain_beyond := masks.brain & beyond).any()):
                    ml = self.spacing**3 / 1000.0
                    regions.brain_beyond_reach_ml = float(brain_beyond.sum()) * ml
                    band = cut_band(canon.inside, self.post, self.spacing)
                    if band is not None:
                        regions.brain_beyond_reach_cut_ml = float((brain_beyond & band).sum()) * ml
                if masks.brain_confused or (regions.brain_beyond_reach_ml <= self.post.atlas_network_reach_max_ml
                                            and regions.brain_beyond_reach_cut_ml
                                            <= self.post.atlas_network_reach_cut_max_ml):
                    protect = protect & ~beyond
                elif band is not None:  # the registration is off over the face: the network's brain alone
                    # protects it, more widely near a cut field of view, where the network sees the anatomy cut off
                    near_cut = band & regions.allowed & front
                    protect = protect | (grow(masks.brain, self.post.cut_brain_margin_mm, self.spacing) & near_cut)
            if protect is not masks.protect:
                regions.network = replace(masks, remove=masks.remove & ~protect, protect=protect)
            if self.post.atlas_complete and masks.face_found:  # completes a face, never starts one
                tissue = tissue_signal(canon.image[0], canon.inside, self.post)
                regions.complete = torch.from_numpy(face_region_mni(mni)) & tissue
        if wants_ears:  # protected from like the face: the atlas brain too
            regions.ears = torch.from_numpy(ear_region_mni(mni)) & canon.inside
        return regions

    def register_unless_brain_only(self, volume: io.Volume, canon: CanonicalInput, probs: torch.Tensor
                                   ) -> tuple[CanonicalInput, torch.Tensor, Registration]:
        """The registration ``prepare`` deferred: none for an image the network's masks call
        skull-stripped, with or without a face found (status ``NOT_NEEDED``: nothing is removed from
        it either way), else ``register`` (with the network run again when the head is turned
        upright for it); an image whose tissue then lies ``within_atlas_brain`` is skull-stripped
        too (``NOT_NEEDED``, the registration's seconds kept), and so is one the first look nearly
        called so (``brain_only_band_*``) unless its fit is clearly a head's. One whose registration fails or is
        refused is left whole too (``UNREGISTERED``): without the atlas nothing tells a head cut short
        from a stripped brain whose rim the network calls face (the s20 FLAIR skull-stripped, T2-like:
        every fit refused, 47,567 brain voxels removed by the network alone; docs/evaluation.md
        2026-12-07 (c)). Returns (canon, probs, registration) for ``apply``."""
        from deface.atlas import Registration

        excess_ml = skull_stripped_excess_ml(probs, self.spacing, self.post, canon.inside, canon.image[0],
                                             max(self.post.brain_only_ml, self.post.brain_only_band_ml))
        if excess_ml < self.post.brain_only_ml:
            return canon, probs, Registration(None, NOT_NEEDED, 0.0)
        band = excess_ml < self.post.brain_only_band_ml  # nearly called skull-stripped: only a clear head is defaced
        turned, registration = self.register(volume, canon, nod=True)
        if registration.to_atlas is None:
            return canon, probs, replace(registration, status=f"{UNREGISTERED} ({registration.status})")
        symmetric = not band or registration.symmetry >= self.post.brain_only_band_min_symmetry
        limit_ml = self.post.brain_only_band_atlas_ml if band else self.post.brain_only_atlas_ml
        if not symmetric or self.within_atlas_brain(canon, registration.to_atlas, limit_ml):
            return canon, probs, replace(registration, to_atlas=None, status=NOT_NEEDED)
        if turned is not canon:
            probs = self.predict([turned])[0]
        return turned, probs, registration

    def within_atlas_brain(self, canon: CanonicalInput, to_atlas: np.ndarray, limit_ml: float | None = None) -> bool:
        """True when no more than ``limit_ml`` (default ``brain_only_atlas_ml``) of ``canon``'s tissue lies beyond
        ``brain_only_atlas_mm`` of the atlas brain registered to it (``to_atlas``): no face reaches
        out of such an image, whatever the network called face (a skull-stripped brain whose bright
        rim it took for one). Asked only of images with no more tissue than a brain has."""
        from scipy.ndimage import binary_fill_holes

        from deface.atlas import brain_on_grid

        brain = brain_on_grid(self.atlas, to_atlas, canon.grid, self.post.atlas_threshold)
        tissue = torch.from_numpy(binary_fill_holes(tissue_signal(canon.image[0], canon.inside, self.post).numpy()))
        beyond = tissue & ~grow(brain, self.post.brain_only_atlas_mm, self.spacing)
        limit = self.post.brain_only_atlas_ml if limit_ml is None else limit_ml
        return float(beyond.sum()) * self.spacing**3 / 1000.0 <= limit

    def acquisition_frame(self, volume: io.Volume) -> np.ndarray | None:
        """The world turned (4x4) so that the image's own voxel axes run along its axes
        (``acquisition_rotation``): the network's grid and the registration follow the slab as it
        was planned on the head. None when they lie within ``acquisition_frame_deg`` of the world's
        already (then the world's axes are used, as for every head stored straight)."""
        from deface.atlas import rotation_deg

        rotation = acquisition_rotation(volume.affine)
        if rotation_deg(rotation) <= self.post.acquisition_frame_deg:
            return None
        frame = np.eye(4)
        frame[:3, :3] = rotation
        return frame

    def atlas_protection(self, atlas_brain: torch.Tensor, network_protected: torch.Tensor, front: torch.Tensor,
                         cut_short: bool = False) -> tuple[torch.Tensor, float]:
        """(the region the registered atlas brain protects, the margin used in front): the atlas brain
        grown by ``atlas_margin_mm``, by ``atlas_front_margin`` where it lies in ``front`` (the voxels
        in front of MNI y = ``atlas_front_y_mm``, through ``atlas_points``)."""
        front_mm = self.atlas_front_margin(atlas_brain & front, network_protected, cut_short)
        if front_mm == self.post.atlas_margin_mm:
            return grow(atlas_brain, front_mm, self.spacing), front_mm
        return (grow(atlas_brain & front, front_mm, self.spacing)
                | grow(atlas_brain & ~front, self.post.atlas_margin_mm, self.spacing)), front_mm

    def atlas_front_margin(self, front_brain: torch.Tensor, network_protected: torch.Tensor,
                           cut_short: bool = False) -> float:
        """The margin around the registered atlas brain in front of MNI y = ``atlas_front_y_mm`` (over
        the eyes and brows; ``front_brain``: the atlas brain there): ``atlas_margin_front_mm`` where the
        network's protected brain covers at least ``atlas_cover_min`` of it, else ``atlas_margin_mm``
        as everywhere else (the network missed brain there, so the atlas alone stands between the
        removal and it), or ``atlas_margin_cut_mm`` if wider on a head ``cut_short`` (at the mouth),
        whose registration places the frontal pole less surely. Brain the network misses further
        back (a field of view cut at the mouth clips the cerebellum) is protected by the wider margin
        there whatever this says."""
        total = int(front_brain.sum())
        covered = int((front_brain & network_protected).sum()) / total if total else 1.0
        if covered >= self.post.atlas_cover_min:
            return self.post.atlas_margin_front_mm
        return max(self.post.atlas_margin_mm, self.post.atlas_margin_cut_mm) if cut_short else self.post.atlas_margin_mm

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
                                                                      voxel_mm, rng=rng))
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

    def apply_to(self, result: DefaceResult, other: Path, out: Path, scrub: bool = False,
                 force: bool = False) -> None:
        """Deface the co-registered image ``other`` with ``result``'s mask (resampled when its grid
        differs) and write it to ``out`` (--applyto)."""
        from deface.preprocessing import resample

        vol = io.load(other)
        if vol.raw.shape[:3] == result.mask.shape and np.allclose(vol.affine, result.volume.affine, atol=1e-4):
            mask = result.mask
        else:
            mask = resample(torch.from_numpy(result.mask.astype(np.float32))[None], result.volume.affine,
                            Grid(tuple(vol.raw.shape[:3]), vol.affine))[0].numpy() >= 0.5
        raw = self.replace(vol, mask, result.to_atlas)
        if out.exists() and not force:
            raise FileExistsError(f"{out} exists; use --force")
        io.save(io.scrub_header(vol) if scrub else vol, raw, out)

    def deface(self, source: str | Path | nib.spatialimages.SpatialImage | io.Volume,
               probs: torch.Tensor | None = None) -> DefaceResult:
        """Deface one image and return the result (nothing written); raises what went wrong.
        ``probs`` (C, X, Y, Z on the canonical grid) bypasses the network (tests)."""
        if probs is None:
            done = self.predict_from_files([Job(source)], workers=0)[0]
            if done.error is not None:
                raise done.error
            return done.result
        volume, canon, registration = self.prepare(source)
        return self.apply(volume, canon, probs, registration)

    def predict_from_files(self, jobs: list[Job], batch_size: int = 1, workers: int = 1, scrub: bool = False,
                           force: bool = False, qc: float | None = None, show_progress: bool = False
                           ) -> list[Outcome]:
        """Deface every job: the one pipeline behind deface-infer, ``deface.predict`` and evaluation.

        Reading and preprocessing (with the atlas registration) run up to ``workers`` batches ahead
        in ``workers`` threads while the network takes ``batch_size`` images at a time;
        postprocessing and writing run behind it in ``workers`` threads (``workers=0``: everything
        in the caller's thread).
        ``scrub`` clears header free text in what is written; ``force`` lets --applyto outputs be
        overwritten (the caller decides about the main outputs); ``qc``: render resolution in mm
        for a QC picture beside each output and a report row. One failing file never stops the
        others: its outcome says "failed" and why. Outcomes come back in the order of ``jobs``.
        """
        outcomes: list[Outcome | None] = [None] * len(jobs)
        bar = progress_bar(len(jobs), show_progress)
        redirect = nullcontext()
        if show_progress:
            try:
                from tqdm.contrib.logging import logging_redirect_tqdm  # log lines above the bar, never into it

                redirect = logging_redirect_tqdm()
            except ImportError:
                pass
        readers = ThreadPoolExecutor(workers) if workers else None
        writers = ThreadPoolExecutor(workers) if workers else None

        def submit(pool, fn, *a):
            if pool is None:
                from concurrent.futures import Future

                fut = Future()
                fut.set_result(fn(*a))
                return fut
            return pool.submit(fn, *a)

        batches = [list(range(i, min(i + batch_size, len(jobs)))) for i in range(0, len(jobs), batch_size)]
        reading: dict[int, list] = {}
        ahead = max(workers, 1)  # batches read at once: each registration leaves cores free (see atlas)

        def read_ahead(b: int) -> None:
            if b < len(batches):
                reading[b] = [submit(readers, self._read, jobs[i]) for i in batches[b]]

        with redirect:
            try:
                for b in range(ahead):
                    read_ahead(b)
                writes = []
                for b, batch in enumerate(batches):
                    prepared = [f.result() for f in reading.pop(b)]
                    read_ahead(b + ahead)
                    ok = []
                    for i, (p, err) in zip(batch, prepared):
                        if p is None:
                            outcomes[i] = self._failed(jobs[i], err, 0.0)
                        else:
                            ok.append((i, p))
                    if ok:
                        t0 = time.perf_counter()
                        try:
                            probs = self.predict([p[1] for _, p in ok])
                        except Exception as exc:
                            for i, (_, _, _, started, _) in ok:
                                outcomes[i] = self._failed(jobs[i], exc, time.perf_counter() - started, "network: ")
                            ok, probs = [], []
                        net_s = (time.perf_counter() - t0) / max(len(ok), 1)
                        for (i, (volume, canon, registration, started, read_s)), pr in zip(ok, probs):
                            writes.append((i, submit(writers, self._finish, jobs[i], volume, canon, registration,
                                                     pr, (started, read_s, net_s), scrub, force, qc)))
                    bar.update(len(batch))
                for i, fut in writes:
                    outcomes[i] = fut.result()
            finally:
                for pool in (readers, writers):
                    if pool is not None:
                        pool.shutdown(wait=True, cancel_futures=True)
                bar.close()
        return outcomes

    def _read(self, job: Job):
        """((volume, canonical input, registration, wall-clock start, seconds), None) or (None, the
        error)."""
        started = time.perf_counter()
        try:
            volume, canon, registration = self.prepare(job.source)
            return (volume, canon, registration, started, time.perf_counter() - started), None
        except Exception as exc:
            return None, exc

    @staticmethod
    def _failed(job: Job, exc: Exception, seconds: float, prefix: str = "") -> Outcome:
        log.error("%s: %s%s", job.name, prefix, io.one_line(exc))
        return Outcome(job.name, "failed", prefix + io.one_line(exc), seconds=seconds, error=exc)

    def _finish(self, job: Job, volume: io.Volume, canon: CanonicalInput, registration: Registration | None,
                probs: torch.Tensor, clock: tuple[float, float, float], scrub: bool, force: bool,
                qc: float | None) -> Outcome:
        """Postprocess one image and write its outputs: the mask first (so an existing output always
        has its mask: --skip-existing), the image, then --applyto images and the QC picture."""
        started, read_s, net_s = clock
        try:
            result = self.apply(volume, canon, probs, registration)
            s = result.stats
            s.update(load_preprocess_s=round(read_s, 3), network_s=round(net_s, 3))
            if job.mask is not None:
                io.save_mask(volume, result.mask, job.mask)
            if job.dst is not None:
                io.save(io.scrub_header(volume) if scrub else volume, result.raw, job.dst)
            for other, out in job.applyto:
                self.apply_to(result, Path(other), Path(out), scrub, force)
            row = None
            if qc is not None and job.dst is not None:
                from deface.qc import qc_file

                with QC_LOCK:
                    row = qc_file(volume, result, job.name, job.dst, qc, time.perf_counter() - started)
            status, msg = outcome_of(job.name, s)
            seconds = time.perf_counter() - started
            s["seconds"] = round(seconds, 3)
            log.info("%s -> %s: %s (%.2f s)", job.name, job.dst or "memory", msg, seconds)
            log.debug("%s: seconds: read+preprocess %.2f (registration %.2f), network %.2f, postprocess %.2f, "
                      "whole file %.2f (wall clock)", job.name, read_s, s["atlas_s"], net_s,
                      s["postprocess_s"], seconds)
            return Outcome(job.name, status, msg, s, seconds, result if job.dst is None else None, report_row=row)
        except Exception as exc:
            return self._failed(job, exc, time.perf_counter() - started)
