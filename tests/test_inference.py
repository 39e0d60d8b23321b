"""The wrapper's promise: brain untouched, only masked voxels change, same mask in any orientation."""

from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from deface import BRAIN, FACE, inference, io
from deface.postprocessing import grow
from deface.atlas import Registration
from deface.preprocessing import CanonicalInput, Grid
from tests.conftest import make_phantom, oracle_probs, phantom_truth, world_points


def deface_with_oracle(defacer, img):
    volume, canon, registration = defacer.prepare(img)
    return defacer.apply(volume, canon, oracle_probs(defacer, canon), registration)


def test_removes_face_keeps_everything_else(defacer):
    img = make_phantom()
    result = deface_with_oracle(defacer, img)
    truth = phantom_truth(world_points(img.shape, img.affine))
    assert result.stats["face_found"] and result.stats["brain_voxels_changed"] == 0
    face = truth == FACE
    assert result.mask[face].mean() > 0.8  # most of the face is removed
    assert not result.mask[truth == BRAIN].any()
    changed = result.raw != result.volume.raw
    assert not (changed & ~result.mask).any()  # bit-identical outside the mask
    out = result.image
    assert out.shape == img.shape and np.array_equal(out.affine, img.affine)
    assert out.get_data_dtype() == img.get_data_dtype()


def test_brain_protected_even_when_network_says_face(defacer):
    img = make_phantom()
    volume, canon, registration = defacer.prepare(img)
    probs = oracle_probs(defacer, canon)
    brain = probs[BRAIN] > 0.5
    # The network claims face with 0.7 everywhere, brain with 0.3 where the brain is.
    probs = torch.zeros_like(probs)
    probs[FACE] = 0.7
    probs[BRAIN][brain] = 0.3
    probs[0][~brain] = 0.3
    result = defacer.apply(volume, canon, probs, registration)
    truth = phantom_truth(world_points(img.shape, img.affine))
    assert result.mask.any()
    assert not result.mask[truth == BRAIN].any()
    assert result.stats["brain_voxels_changed"] == 0
    assert np.array_equal(result.raw[truth == BRAIN], volume.raw[truth == BRAIN])


def reorder(img: nib.Nifti1Image, perm, flips) -> nib.Nifti1Image:
    """The same image with axes permuted and flipped (a different axis code, same world)."""
    data = np.asanyarray(img.dataobj)
    ornt = np.array([[p, -1 if f else 1] for p, f in zip(perm, flips)])
    inv = nib.orientations.ornt_transform(np.array([[i, 1] for i in range(3)]), ornt)
    new = nib.orientations.apply_orientation(data, inv)
    aff = img.affine @ nib.orientations.inv_ornt_aff(inv, data.shape)
    return nib.Nifti1Image(new, aff)


@pytest.mark.parametrize("perm,flips", [((0, 1, 2), (0, 0, 0)), ((1, 0, 2), (1, 0, 0)), ((2, 1, 0), (0, 1, 1)),
                                        ((1, 2, 0), (1, 1, 1))])
def test_same_world_mask_in_any_axis_order(defacer, perm, flips):
    ref = make_phantom()
    ref_mask = deface_with_oracle(defacer, ref).mask
    img = reorder(ref, perm, flips)
    mask = deface_with_oracle(defacer, img).mask
    back = nib.orientations.apply_orientation(
        mask.astype(np.uint8), nib.orientations.ornt_transform(nib.io_orientation(img.affine), nib.io_orientation(ref.affine)))
    assert np.array_equal(back.astype(bool), ref_mask)


def test_oblique_affine_mask_agrees_in_world(defacer):
    straight, oblique = make_phantom(), make_phantom(angle_deg=20.0)
    for img in (straight, oblique):
        result = deface_with_oracle(defacer, img)
        truth = phantom_truth(world_points(img.shape, img.affine))
        assert result.mask[truth == FACE].mean() > 0.8
        assert not result.mask[truth == BRAIN].any()


def test_a_constant_added_to_the_image_changes_nothing(defacer):
    """Air stored at 5000 (an offset) or at -0.5 (z-scored) is still air: the network input and the
    mask are those of the plain image (the zeros padded outside the field of view once became the
    normaliser's dark end, and an offset head came out "no face found")."""
    from deface.preprocessing import to_canonical

    img = make_phantom(angle_deg=20.0, dtype=np.float32)
    data = np.asarray(img.dataobj, np.float32)
    plain = to_canonical(data, img.affine)
    assert not plain.inside.all()  # the grid reaches past the field of view: the edge band exists
    masks = [deface_with_oracle(defacer, img).mask]
    for shifted in (data + 5000.0, (data - data.mean()) / data.std()):
        canon = to_canonical(shifted, img.affine)
        assert torch.allclose(canon.image, plain.image, atol=1e-4)
        masks.append(deface_with_oracle(defacer, nib.Nifti1Image(shifted, img.affine)).mask)
    assert masks[0].any() and all(np.array_equal(m, masks[0]) for m in masks[1:])


def test_nan_air_gives_the_plain_mask_and_nan_left_nan_is_not_a_change(defacer):
    """A float image with NaN for air (and a few NaN voxels in the brain, e.g. after a masked
    division): same mask as the plain image; "brain voxels changed" and "removed" count values that
    changed, and a NaN left NaN is not one (1,237 "brain voxels changed" were reported on a real
    head whose every brain voxel was bit-identical)."""
    img = make_phantom(dtype=np.float32)
    data = np.asarray(img.dataobj, np.float32).copy()
    plain = deface_with_oracle(defacer, img)
    truth = phantom_truth(world_points(img.shape, img.affine))
    data[data <= 0] = np.nan
    brain = np.argwhere(truth == BRAIN)
    data[tuple(brain[:: max(1, len(brain) // 20)].T)] = np.nan
    result = deface_with_oracle(defacer, nib.Nifti1Image(data, img.affine))
    assert np.array_equal(result.mask, plain.mask) and result.mask.any()
    assert result.stats["brain_voxels_changed"] == 0
    same = (result.raw == data) | (np.isnan(result.raw) & np.isnan(data))
    assert same[truth == BRAIN].all() and same[~result.mask].all()
    assert result.stats["removed_voxels"] == int((~same).sum())


def test_salt_and_pepper_air_is_quieted_and_the_brain_kept(defacer):
    """Air of noise over the whole intensity range (an MP2RAGE UNI image) becomes 0 in the network
    input, the head does not; an image with ordinary air is not touched at all."""
    from deface.preprocessing import quiet_background

    img = make_phantom(dtype=np.float32)
    data = np.asarray(img.dataobj, np.float32)
    truth = phantom_truth(world_points(img.shape, img.affine))
    assert quiet_background(data) is data
    air = data == 0
    rng = np.random.default_rng(0)
    noisy = np.where(air, rng.choice([0.1, 0.9], size=data.shape) * rng.uniform(0, 1, data.shape) * 700, data)
    quiet = quiet_background(noisy.astype(np.float32))
    assert (quiet[air] == 0).mean() > 0.95
    assert np.array_equal(quiet[truth == BRAIN], data[truth == BRAIN])
    plain, result = deface_with_oracle(defacer, img).mask, deface_with_oracle(defacer, nib.Nifti1Image(noisy, img.affine)).mask
    assert not result[truth == BRAIN].any()
    assert result[truth == FACE].mean() >= plain[truth == FACE].mean() - 0.05


def test_a_strong_bias_field_is_flattened_in_the_network_input(monkeypatch):
    """A head times a smooth field from 0.3 to 1.6 (an uncorrected receive-coil bias) reaches the
    network and the registration with its brain one level again; a head without one is not touched."""
    from deface import preprocessing
    from deface.preprocessing import BIAS_GATE, bias_strength, flatten_bias, to_canonical

    img = make_phantom(angle_deg=20.0, dtype=np.float32)
    # one tissue level (the eyes darker): the phantom's bright brain high in the head reads as a field
    data = np.asarray(img.dataobj, np.float32)
    data = np.where(data == data.max(), 300.0, data).astype(np.float32)
    plain = to_canonical(data, img.affine)
    assert bias_strength(plain.image[0].numpy()) < 1.2
    assert flatten_bias(plain.image) is plain.image
    points = world_points(img.shape, img.affine)
    slope = -points[..., 1] + 0.5 * points[..., 2]
    head = data > 0
    t = (slope - slope[head].min()) / np.ptp(slope[head])
    biased = data * 0.3 * (1.6 / 0.3) ** t
    flat = to_canonical(biased, img.affine)
    with monkeypatch.context() as m:
        m.setattr(preprocessing, "BIAS_GATE", float("inf"))
        kept = to_canonical(biased, img.affine)
    assert bias_strength(kept.image[0].numpy()) > BIAS_GATE
    truth = phantom_truth(world_points(flat.grid.shape, flat.grid.affine))
    core = ndi.binary_erosion(truth == BRAIN, iterations=2)

    def spread(canon) -> float:  # of the brain's intensity: 1.0 when it is one level
        values = canon.image[0].numpy()[core]
        return float(np.percentile(values, 95) / np.percentile(values, 5))

    assert spread(kept) > 2.0 and spread(flat) < 1.2
    assert bias_strength(flat.image[0].numpy()) < 1.2


def test_4d_mask_applied_to_every_volume(defacer):
    img3 = make_phantom()
    data = np.stack([np.asanyarray(img3.dataobj)] * 3, -1)
    img = nib.Nifti1Image(data, img3.affine, img3.header)
    result = deface_with_oracle(defacer, img)
    assert result.raw.shape == data.shape
    for t in range(3):
        changed = result.raw[..., t] != data[..., t]
        assert changed.any() and not (changed & ~result.mask).any()


@pytest.mark.parametrize("mode", ["zero", "noise", "blur", "fill"])
def test_modes_change_only_the_mask(tiny_metadata, mode):
    from deface.inference import Defacer
    from deface.network import TINY_ARCHITECTURE, build_network

    d = Defacer(network=build_network(TINY_ARCHITECTURE), metadata=tiny_metadata, device="cpu", mode=mode,
                fill_value=77.0)
    result = deface_with_oracle(d, make_phantom())
    changed = result.raw != result.volume.raw
    assert changed.any() and not (changed & ~result.mask).any()
    if mode == "fill":
        assert np.all(result.raw[result.mask] == 77)


def test_the_network_sees_a_wide_field_of_view_through_a_window_fitted_to_the_head(tiny_metadata):
    """With ``input_shape`` (the training patch) a grid larger than it is seen through a window
    fitted to the head, so the same canonical head with 20 or 30 more voxels of air on every side
    gets the same probabilities (bit for bit); seen whole, the instance norms see the air and the
    answer moves. A grid no larger than the patch is seen whole, as without ``input_shape``."""
    from deface.inference import Defacer
    from deface.network import TINY_ARCHITECTURE, build_network
    from deface.preprocessing import FRAME_MARGIN, FRAME_MIN_MM, head_frame, to_canonical

    torch.manual_seed(0)
    network = build_network(TINY_ARCHITECTURE)
    patch = (52, 56, 56)  # the phantom's grid at 4 mm: 52 x 56 x 56
    framed = dict(tiny_metadata, preprocessing=dict(tiny_metadata["preprocessing"], input_shape=list(patch)))
    img = make_phantom()
    canon = to_canonical(np.asarray(img.dataobj, np.float32), img.affine, spacing=4.0, multiple=4)
    assert all(n <= p for n, p in zip(canon.image.shape[1:], patch))

    def padded(pad: int) -> CanonicalInput:
        big = torch.nn.functional.pad(canon.image, (pad,) * 6)
        affine = canon.grid.affine.copy()
        affine[:3, 3] -= affine[:3, :3] @ np.full(3, pad)
        inside = torch.nn.functional.pad(canon.inside, (pad,) * 6)
        return CanonicalInput(big, Grid(tuple(big.shape[1:]), affine), inside)

    def inner(pad: int) -> tuple[slice, ...]:
        return (slice(None), *(slice(pad, pad + n) for n in canon.image.shape[1:]))

    wide, wider = padded(20), padded(30)
    src = head_frame(wide.image, patch, 4, 4.0)
    head = wide.image[0] > 0.1
    assert head[src].sum() == head.sum()  # the whole head
    for axis in range(3):  # ... with FRAME_MARGIN voxels of air a side, in at least FRAME_MIN_MM, centred
        rows = torch.nonzero(head.any(dim=tuple(a for a in range(3) if a != axis)))[:, 0]
        extent, length = int(rows[-1] - rows[0] + 1), src[axis].stop - src[axis].start
        before, after = int(rows[0] - src[axis].start), int(src[axis].stop - rows[-1] - 1)
        assert length == 4 * -(-max(extent + 2 * FRAME_MARGIN, int(FRAME_MIN_MM[axis] / 4.0)) // 4)
        assert abs(before - after) <= 1 and min(before, after) >= FRAME_MARGIN
    assert head_frame(canon.image, patch, 4, 4.0) == tuple(slice(0, n) for n in canon.image.shape[1:])  # smaller: whole

    d = Defacer(network=network, metadata=framed, device="cpu")
    whole = Defacer(network=network, metadata=tiny_metadata, device="cpu")
    a, b = d.predict([wide, wider])
    assert torch.equal(a[inner(20)], b[inner(30)])
    assert torch.all(a[0][:10] == 1.0)  # air beyond the window is background
    assert torch.equal(d.predict([canon])[0], whole.predict([canon])[0])
    a, b = whole.predict([wide]) + whole.predict([wider])
    assert not torch.allclose(a[inner(20)], b[inner(30)], atol=1e-3)


def test_the_window_on_a_large_grid_is_the_head_box_with_a_margin_inside_the_grid():
    """Along each axis: the head's extent plus ``FRAME_MARGIN`` a side, at least ``FRAME_MIN_MM``,
    rounded up to ``multiple``, centred and moved inside the grid; smaller than the patch where the
    head is, longer where the head is longer, never padded and never cutting the head."""
    from deface.preprocessing import FRAME_MARGIN, FRAME_MIN_MM, head_frame

    assert FRAME_MARGIN == 8 and FRAME_MIN_MM == (192.0, 256.0, 256.0)  # the figures below
    image = torch.zeros((1, 80, 128, 64))
    image[0, 20:50, 10:95, 2:28] = 1.0
    src = head_frame(image, (64, 48, 64), 8, 8.0)  # at least 24 x 32 x 32 voxels of 8 mm
    assert src[0] == slice(11, 59)  # 30 + 16 -> 48 voxels, centred on 35
    assert src[1] == slice(0, 104)  # 85 + 16 -> 104, longer than the patch; centred at 0
    assert src[2] == slice(0, 48)  # 26 + 16 -> 48, centred at 15 - 24 < 0: moved inside the grid
    assert image[(slice(None), *src)].sum() == image.sum()
    small = torch.zeros_like(image)
    small[0, 30:36, 50:60, 30:40] = 1.0  # a small object: 22 x 26 x 26 -> the least, 24 x 32 x 32
    assert head_frame(small, (64, 48, 64), 8, 8.0) == (slice(21, 45), slice(39, 71), slice(19, 51))
    image = torch.zeros((1, 40, 128, 40))
    image[0, :, 30:120, :] = 1.0  # a head filling two axes: the whole of them, nothing padded
    assert head_frame(image, (64, 48, 64), 8, 8.0) == (slice(0, 40), slice(16, 128), slice(0, 40))  # 90 + 16 -> 112, moved in


def test_random_network_runs_end_to_end(defacer):
    result = defacer.deface(make_phantom(angle_deg=10.0))
    assert result.stats["brain_voxels_changed"] == 0
    assert result.stats["changed_outside_mask"] == 0


def test_constant_image_is_refused(defacer):
    with pytest.raises(io.InputError):
        defacer.deface(nib.Nifti1Image(np.zeros((20, 22, 24), np.float32), np.eye(4)))


def stripped_with_frontal_face(defacer):
    """(volume, canon, registration, probs) of the phantom's brain alone, prepared, with oracle
    probabilities that call its frontal lobe face (as a network may on a skull-stripped image)."""
    img = make_phantom()
    truth = phantom_truth(world_points(img.shape, img.affine))
    stripped = nib.Nifti1Image(np.where(truth == BRAIN, np.asanyarray(img.dataobj), 0).astype(np.int16), img.affine)
    volume, canon, registration = defacer.prepare(stripped)
    probs = oracle_probs(defacer, canon)
    points = world_points(canon.grid.shape, canon.grid.affine)
    frontal = (probs[BRAIN] > 0.5) & torch.from_numpy(points[..., 1] > 40)
    probs[FACE][frontal], probs[BRAIN][frontal] = 1.0, 0.0
    return volume, canon, registration, probs


def test_brain_only_image_is_left_whole_even_when_network_sees_a_face(defacer):
    """A skull-stripped head whose frontal lobe the network calls face: nothing may change."""
    volume, canon, registration, probs = stripped_with_frontal_face(defacer)
    result = defacer.apply(volume, canon, probs, registration)
    assert result.stats["brain_only"] and not result.stats["face_found"]
    assert not result.mask.any() and np.array_equal(result.raw, volume.raw)


def test_a_head_known_not_brain_only_is_not_judged_again(defacer):
    """``brain_only=False`` (a registered head: the first pass said it is not skull-stripped)
    removes the face that the brain-only rule would have kept; ``brain_only=True`` (the first pass
    said it is) gives what judging it gives."""
    from deface.postprocessing import canonical_masks

    _, canon, _, probs = stripped_with_frontal_face(defacer)
    args = (probs, defacer.spacing, defacer.post, canon.inside, canon.image[0])
    judged, known = canonical_masks(*args), canonical_masks(*args, brain_only=False)
    assert judged.brain_only and not judged.remove.any()
    assert not known.brain_only and known.face_found and known.remove.any()
    assert torch.equal(judged.protect, known.protect)
    stripped = canonical_masks(*args, brain_only=True)
    assert stripped.brain_only == judged.brain_only and torch.equal(stripped.remove, judged.remove)


def test_whole_head_is_not_taken_for_brain_only(defacer):
    result = deface_with_oracle(defacer, make_phantom())
    assert not result.stats["brain_only"] and result.stats["removed_voxels"] > 0


def test_confused_network_does_not_make_a_whole_head_brain_only(defacer):
    """A network that calls nearly the whole (adult-sized) head brain, as v1 does on a head
    tilted 25 degrees, must not get the face left in place as if the image were skull-stripped."""
    img = make_phantom()
    big = img.affine.copy()
    big[:3, :3] *= 1.3  # the phantom at adult size: about 4.6 L of head
    head_img = nib.Nifti1Image(np.asanyarray(img.dataobj), big)
    volume, canon, registration = defacer.prepare(head_img)
    probs = oracle_probs(defacer, canon)
    points = world_points(canon.grid.shape, canon.grid.affine)
    tissue = canon.image[0] > 0.08
    confused = tissue & (probs[FACE] < 0.5)
    probs[BRAIN][confused], probs[0][confused] = 1.0, 0.0
    face = tissue & torch.from_numpy(points[..., 1] > 128)  # the nose: little tissue beyond the "brain"
    probs[FACE][face], probs[BRAIN][face], probs[0][face] = 1.0, 0.0, 0.0
    result = defacer.apply(volume, canon, probs, registration)
    assert not result.stats["brain_only"] and result.stats["face_found"] and result.stats["removed_voxels"] > 0


def test_already_defaced_head_is_flagged(defacer):
    img = make_phantom(dtype=np.float32)
    noisy = np.asanyarray(img.dataobj) + np.random.default_rng(0).uniform(1, 20, img.shape).astype(np.float32)
    noisy_img = nib.Nifti1Image(noisy, img.affine)
    first = deface_with_oracle(defacer, noisy_img)
    assert first.stats["face_found"] and not first.stats["already_defaced"]
    second = deface_with_oracle(defacer, nib.Nifti1Image(first.volume.scaled(first.raw), img.affine))
    assert second.stats["already_defaced"]


def test_already_defaced_is_zeros_where_the_face_was_in_otherwise_noisy_air():
    """The mark of an earlier defacing: the region is mostly exact zeros and the air elsewhere is
    not; zero-valued air everywhere (a resampled or masked image) or signal in the region is not it."""
    from deface.inference import looks_already_defaced

    rng = np.random.default_rng(1)
    image = rng.uniform(1, 20, (41, 50, 37)).astype(np.float32)
    image[10:30, 10:40, 5:30] = 1000.0  # the head
    remove = np.zeros(image.shape, bool)
    remove[12:28, 40:49, 5:20] = True  # in front of it
    assert not looks_already_defaced(image, remove)  # noise there: a face region never touched
    image[remove] = 0
    assert looks_already_defaced(image, remove)
    image[image < 100] = 0  # the air zero everywhere: no mark of a tool
    assert not looks_already_defaced(image, remove)


def test_a_mask_on_zero_valued_air_removes_nothing_and_says_so(defacer):
    """Two skull-stripped brains were once reported 'face found, removed 51.6 mL' while not one
    voxel changed: removed counts changed voxels, and such an image has no face."""
    img = make_phantom()
    points = world_points(img.shape, img.affine)
    front = (phantom_truth(points) != BRAIN) & (points[..., 1] > 30)  # all but the brain cut off in front
    no_face = nib.Nifti1Image(np.where(front, 0, np.asanyarray(img.dataobj)).astype(np.int16), img.affine)
    result = deface_with_oracle(defacer, no_face)
    assert result.stats["mask_voxels"] > 0 and np.array_equal(result.raw, result.volume.raw)
    assert result.stats["removed_voxels"] == 0 and result.stats["removed_ml"] == 0
    assert not result.stats["face_found"]


def test_noise_mode_samples_the_images_own_background(tiny_metadata):
    """--mode noise once wrote plain zeros where the removed region was zero-valued air: it now
    draws from the image's real background, and says when that background is all zeros."""
    from deface.inference import Defacer
    from deface.network import TINY_ARCHITECTURE, build_network

    d = Defacer(network=build_network(TINY_ARCHITECTURE), metadata=tiny_metadata, device="cpu", mode="noise")
    img = make_phantom(dtype=np.float32)
    points = world_points(img.shape, img.affine)
    data = np.asanyarray(img.dataobj).copy()
    air = data == 0
    data[air] = np.random.default_rng(1).uniform(5, 15, int(air.sum()))
    data[(points[..., 1] > 60) & (phantom_truth(points) != BRAIN)] = 0  # a zero-filled block over the face
    result = deface_with_oracle(d, nib.Nifti1Image(data, img.affine))
    filled = result.raw[result.mask]
    assert result.mask.sum() > 100 and filled.min() >= 5 and filled.max() <= 15 and filled.std() > 1
    assert not result.stats["noise_from_zero_air"]
    plain = deface_with_oracle(d, make_phantom(dtype=np.float32))  # air all zeros: zeros, and it says so
    assert plain.stats["noise_from_zero_air"] and not plain.raw[plain.mask].any()


def test_unknown_postprocessing_key_is_refused(tiny_metadata):
    """A misspelled setting in the weights' metadata (or passed in) is an error, never dropped."""
    from deface.inference import Defacer
    from deface.network import build_network

    meta = {**tiny_metadata, "postprocessing": {**tiny_metadata["postprocessing"], "brain_margn_mm": 2.0}}
    with pytest.raises(ValueError, match="brain_margn_mm"):
        Defacer(network=build_network(meta["architecture"]), metadata=meta, device="cpu")
    with pytest.raises(ValueError, match="atlas_margn"):
        Defacer(network=build_network(tiny_metadata["architecture"]), metadata=tiny_metadata, device="cpu",
                post={"atlas_margn": 1.0})
    ok = Defacer(network=build_network(tiny_metadata["architecture"]), metadata=tiny_metadata, device="cpu",
                 post={"brain_margin_mm": 7.0})
    assert ok.post.brain_margin_mm == 7.0


def test_inference_never_imports_training_code():
    """deface.data is training code (labels, synthesis, caches): the inference path stays free of it."""
    import subprocess
    import sys

    code = ("import sys, deface.cli, deface.inference, deface.atlas, deface.postprocessing, deface.predict; "
            "print(','.join(m for m in sys.modules if m.startswith('deface.data')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_ears_are_removed_on_request_and_the_brain_still_never_changes(tiny_metadata):
    """--ears through a (given) registration that widens the phantom by 1.2 in x, so its sides
    reach the ear region (deface.anatomy): only lateral voxels are added, none of the brain."""
    from deface.anatomy import EAR_MIN_X
    from deface.inference import Defacer
    from deface.network import TINY_ARCHITECTURE, build_network

    img = make_phantom()
    truth = phantom_truth(world_points(img.shape, img.affine))
    points = world_points(img.shape, img.affine)
    to_atlas = np.diag([1.2, 1.0, 1.0, 1.0])
    network = build_network(TINY_ARCHITECTURE)
    volume, canon, _ = Defacer(network=network, metadata=tiny_metadata, device="cpu").prepare(img)  # no atlas
    registration = Registration(to_atlas, "ok", 0.0)
    masks = {}
    for ears in (False, True):
        d = Defacer(network=network, metadata=tiny_metadata, device="cpu", ears=ears)
        result = d.apply(volume, canon, oracle_probs(d, canon), registration)
        assert result.stats["ears_removed"] is ears and result.stats["brain_voxels_changed"] == 0
        assert np.array_equal(result.raw[truth == BRAIN], volume.raw[truth == BRAIN])
        regions = result.regions  # what apply composed, region by region, for the probes
        removal = regions.removal()
        assert (regions.ears is not None) is ears and regions.atlas is None  # the phantom's guard is off
        assert not (removal.remove & removal.protect).any()
        assert bool((removal.remove & ~regions.network.remove).any()) is ears  # the ears add to the network's
        masks[ears] = result.mask
    added = masks[True] & ~masks[False]
    assert added.sum() > 50 and not (masks[False] & ~masks[True]).any()
    assert np.all(np.abs(points[added][:, 0]) * 1.2 >= EAR_MIN_X - 4.0)  # within a native voxel of the region


def test_the_ears_go_by_default_whenever_the_atlas_guard_is_on(tiny_metadata):
    """The default removes the ears wherever the image is registered for the guard (an unchanged
    ear was what the recogniser matched in profile renders); without the guard nothing is
    registered for them unless asked; --keep-ears (False) keeps them either way."""
    from deface.inference import Defacer
    from deface.network import TINY_ARCHITECTURE, build_network

    network = build_network(TINY_ARCHITECTURE)
    guarded = {**tiny_metadata, "postprocessing": {**tiny_metadata["postprocessing"], "atlas": True}}
    for metadata, ears, expected, atlas in ((guarded, None, True, True), (guarded, False, False, True),
                                            (tiny_metadata, None, False, False), (tiny_metadata, True, True, True)):
        d = Defacer(network=network, metadata=metadata, device="cpu", ears=ears)
        assert d.ears is expected and (d.atlas is not None) is atlas


def test_the_ears_go_only_with_a_face(tiny_metadata):
    """An image in which no face is found (a skull-stripped brain, an already defaced scan) is left
    whole, its ears too, even in --mode fill, where the ear region's air would visibly change."""
    from deface.inference import Defacer
    from deface.network import TINY_ARCHITECTURE, build_network

    img = make_phantom()
    d = Defacer(network=build_network(TINY_ARCHITECTURE), metadata=tiny_metadata, device="cpu", ears=True,
                mode="fill", fill_value=7.0)
    volume, canon, _ = Defacer(network=d.network, metadata=tiny_metadata, device="cpu").prepare(img)
    probs = oracle_probs(d, canon)
    probs[BRAIN] += probs[FACE]  # a network that finds no face
    probs[FACE] = 0
    result = d.apply(volume, canon, probs, Registration(np.diag([1.2, 1.0, 1.0, 1.0]), "ok", 0.0))
    assert not result.stats["ears_removed"] and not result.stats["face_found"]
    assert result.stats["removed_voxels"] == 0 and np.array_equal(result.raw, volume.raw)


def test_atlas_completion_removes_the_face_the_network_missed_and_no_brain(tiny_metadata):
    """A network that finds only the lower face: ``atlas_complete`` removes the rest of the
    face region's tissue (through a given registration that stretches the phantom 1.25x front
    to back, so the atlas brain fits inside its brain), still nothing that is protected."""
    from deface.anatomy import face_region_mni
    from deface.inference import Defacer
    from deface.network import TINY_ARCHITECTURE, build_network

    img = make_phantom()
    points = world_points(img.shape, img.affine)
    truth = phantom_truth(points)
    to_atlas = np.diag([1.0, 1.25, 1.0, 1.0])
    in_atlas = points * np.array([1.0, 1.25, 1.0])
    network = build_network(TINY_ARCHITECTURE)
    volume, canon, _ = Defacer(network=network, metadata=tiny_metadata, device="cpu").prepare(img)  # no atlas
    registration = Registration(to_atlas, "ok", 0.0)
    masks = {}
    for complete in (False, True):
        d = Defacer(network=network, metadata=tiny_metadata, device="cpu", post={"atlas": True, "atlas_complete": complete})
        probs = oracle_probs(d, canon)
        upper = torch.from_numpy(world_points(canon.grid.shape, canon.grid.affine)[..., 2] > -20)
        probs[0][upper & (probs[FACE] > 0.5)], probs[FACE][upper] = 1.0, 0.0
        result = d.apply(volume, canon, probs, registration)
        assert result.stats["brain_voxels_changed"] == 0
        assert np.array_equal(result.raw[truth == BRAIN], volume.raw[truth == BRAIN])
        # network and registration agree: the face lies outside the atlas brain, no warning
        assert result.stats["face_in_atlas_brain"] < 0.05 and not result.stats["atlas_network_disagree"]
        masks[complete] = result.mask
    added = masks[True] & ~masks[False]
    upper_face = (truth == FACE) & (points[..., 2] > -10) & face_region_mni(in_atlas)
    assert masks[False][upper_face].mean() < 0.05 < 0.3 < masks[True][upper_face].mean()
    assert face_region_mni(in_atlas[added], 5.0).all()  # only inside the region (within a voxel)


def test_predict_from_files_batches_keeps_order_and_survives_a_broken_file(tmp_path, defacer, monkeypatch):
    from deface.inference import Job

    seen = []

    def oracle(inputs):  # an ideal network, so that every phantom has a face to remove
        seen.append(len(inputs))
        return [oracle_probs(defacer, c) for c in inputs]

    monkeypatch.setattr(defacer, "predict", oracle)

    good = [make_phantom(angle_deg=a) for a in (0.0, 12.0, 25.0)]
    paths = []
    for i, img in enumerate(good):
        paths.append(tmp_path / f"s{i}.nii.gz")
        nib.save(img, str(paths[-1]))
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not an image")
    jobs = [Job(paths[0], tmp_path / "o0.nii.gz", tmp_path / "o0_mask.nii.gz"), Job(broken, tmp_path / "ob.nii.gz"),
            Job(paths[1], tmp_path / "o1.nii.gz"), Job(good[2])]  # the last one is kept in memory
    done = defacer.predict_from_files(jobs, batch_size=2, workers=2)
    assert seen == [1, 2]  # the broken file left its batch with one image
    assert [o.name for o in done] == [str(paths[0]), str(broken), str(paths[1]), "image"]
    assert [o.status == "failed" for o in done] == [False, True, False, False]
    assert done[1].error is not None and not (tmp_path / "ob.nii.gz").exists()
    for i in (0, 1):
        out = nib.load(str(tmp_path / f"o{i}.nii.gz"))
        assert out.shape == good[i].shape and np.array_equal(out.affine, good[i].affine)
        assert done[2 * i].result is None and done[2 * i].seconds > 0  # written, not kept
    mask = nib.load(str(tmp_path / "o0_mask.nii.gz")).get_fdata() > 0
    changed = nib.load(str(tmp_path / "o0.nii.gz")).get_fdata() != good[0].get_fdata()
    assert changed.any() and not (changed & ~mask).any()
    kept = done[3].result
    assert kept is not None and kept.probs.shape[1:] == kept.grid.shape
    assert kept.stats["face_found"] and kept.stats["brain_voxels_changed"] == 0
    assert np.array_equal(kept.raw, defacer.deface(good[2]).raw)  # the same pipeline, batched or alone


def test_predict_from_files_reads_workers_files_at_once(defacer, monkeypatch):
    """With two workers two files are prepared (registered) at the same time, never more; the
    outcomes still come back in order."""
    import threading
    import time

    from deface.inference import Job

    prepare, lock, inside, most = defacer.prepare, threading.Lock(), [0], [0]

    def slow_prepare(source):
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.3)  # a registration
        try:
            return prepare(source)
        finally:
            with lock:
                inside[0] -= 1

    monkeypatch.setattr(defacer, "prepare", slow_prepare)
    images = [make_phantom(angle_deg=a) for a in (0.0, 5.0, 10.0, 15.0, 20.0)]
    done = defacer.predict_from_files([Job(img) for img in images], batch_size=1, workers=2)
    assert most[0] == 2
    assert [o.status == "failed" for o in done] == [False] * 5
    assert all(np.array_equal(o.result.volume.raw, np.asanyarray(img.dataobj)) for o, img in zip(done, images))


def test_class_map_is_argmax_with_ties_to_the_first_class():
    from deface.postprocessing import class_map

    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(4, 9, 7, 5), 0)
    probs[:, 0, 0, 0] = torch.tensor([0.4, 0.4, 0.1, 0.1])  # ties: argmax keeps the first
    probs[:, 1, 0, 0] = torch.tensor([0.1, 0.3, 0.3, 0.3])
    assert torch.equal(class_map(probs), probs.argmax(0))


@pytest.mark.parametrize("margin_mm,spacing", [(6.0, 2.0), (5.0, 2.0), (4.0, 2.0), (3.0, 2.0), (5.0, 1.5), (8.0, 2.0), (9.0, 2.0), (20.0, 2.0),
                                               (21.0, 2.0)])
def test_protection_margin_is_a_euclidean_distance(margin_mm, spacing):
    """The brain grows by the margin in every direction, diagonals included, and no further."""
    from scipy import ndimage as ndi

    from deface.postprocessing import grow

    rng = np.random.default_rng(0)
    brain = ndi.binary_opening(rng.random((23, 19, 17)) > 0.7)
    brain[2, 3, 4] = True  # a lone voxel, so the ball's shape is tested too
    grown = grow(torch.from_numpy(brain), margin_mm, spacing).numpy()
    distance = ndi.distance_transform_edt(~brain)  # voxels to the nearest brain voxel
    assert np.array_equal(grown, distance * spacing <= margin_mm + 1e-6)
    assert not grow(torch.zeros(5, 6, 7, dtype=torch.bool), margin_mm, spacing).any()  # nothing grows from nothing


def test_network_brain_far_from_the_atlas_brain_is_not_protected():
    """Network "brain" far from the registered atlas brain (the tongue of IXI 212) protects nothing
    when the two agree elsewhere; when they do not (a registration far off), all of it is protected."""
    from deface.postprocessing import PostprocessConfig, canonical_masks, grow

    shape = (24, 30, 26)
    probs = torch.zeros((3, *shape))
    probs[0] = 1.0
    image = torch.full(shape, 0.5)
    image[:, 24:] = 0.0  # air in front (+y)
    brain = torch.zeros(shape, dtype=torch.bool)
    brain[4:20, 2:14, 8:24] = True  # the brain
    blob = torch.zeros(shape, dtype=torch.bool)
    blob[10:13, 19:21, 2:5] = True  # a small "brain" inside the face, joined to the brain by a strand
    strand = torch.zeros(shape, dtype=torch.bool)
    strand[11, 13:20, 3:9] = True
    face = torch.zeros(shape, dtype=torch.bool)
    face[:, 17:24, :] = True
    for mask, c in ((face & ~blob & ~strand, FACE), (brain | blob | strand, BRAIN)):
        probs[:, mask] = 0.0
        probs[c, mask] = 1.0
    cfg = PostprocessConfig(brain_margin_mm=4.0, min_face_ml=0.1, min_component_ml=0.01, min_air_ml=0.01)
    plain = canonical_masks(probs, 2.0, cfg, image=image)
    support = torch.zeros(shape, dtype=torch.bool)
    support[3:21, 1:15, 7:25] = True  # the atlas brain grown: holds the brain, not the blob
    guarded = canonical_masks(probs, 2.0, cfg, image=image, brain_support=support)
    around = grow(blob, 4.0, 2.0) & face & ~blob & ~grow(brain | strand, 4.0, 2.0)  # face only the blob kept
    assert around.any()
    assert plain.protect[blob].all() and not plain.remove[around].any() and plain.brain_dropped_ml == 0.0
    assert not guarded.protect[blob].any() and guarded.remove[around].all()
    assert guarded.brain_dropped_ml == pytest.approx(float(((brain | blob | strand) & ~support).sum()) * 8 / 1000)
    assert guarded.protect[brain].all() and not guarded.remove[brain].any()
    far_support = torch.zeros(shape, dtype=torch.bool)  # a registration far off: the network is believed
    far_support[0:3, 25:30, 0:3] = True
    far = canonical_masks(probs, 2.0, cfg, image=image, brain_support=far_support)
    assert far.protect[brain | blob].all() and far.brain_dropped_ml == 0.0
    huge = dataclasses.replace(cfg, brain_only_max_brain_ml=1.0)  # a network "brain" larger than any brain
    assert canonical_masks(probs, 2.0, huge, image=image, brain_support=support).brain_dropped_ml > 0


def test_face_region_grows_downwards_by_its_own_margin():
    from deface.anatomy import FACE_BOTTOM_Z, face_region_mni

    chin = np.array([[0.0, 60.0, FACE_BOTTOM_Z - 30.0]])
    assert not face_region_mni(chin, 10.0)[0]
    assert face_region_mni(chin, 10.0, 40.0)[0]
    assert not face_region_mni(np.array([[0.0, -20.0, FACE_BOTTOM_Z - 30.0]]), 10.0, 40.0)[0]  # not backwards


def test_atlas_margin_widens_where_the_network_missed_the_front_of_the_atlas_brain(defacer, monkeypatch):
    """The atlas brain's margin is the narrow one (over the eyes and brows) only where the
    network's protected brain covers the atlas brain's front; where the network missed brain there
    (a stroke T2 calls its orbitofrontal cortex face) the atlas alone protects, with the wider
    margin. Brain missed further back (a field of view cut at the mouth clips the cerebellum) does
    not widen the margin in front."""
    d = defacer
    atlas = torch.zeros(30, 30, 30, dtype=torch.bool)
    atlas[8:22, 8:22, 8:22] = True
    front = torch.zeros(30, 30, 30, dtype=torch.bool)
    front[:, 16:, :] = True  # in front of MNI y = atlas_front_y_mm
    agreeing = grow(atlas, d.post.brain_margin_mm, d.spacing)
    missing_front, missing_back = agreeing.clone(), agreeing.clone()
    missing_front[:, 18:, :] = False  # the network's brain stops short of the front of the atlas brain
    missing_back[:, :14, :] = False  # ... or of its back (a third of it)
    assert d.atlas_protection(atlas, agreeing, front)[1] == d.post.atlas_margin_front_mm
    assert d.atlas_protection(atlas, missing_front, front)[1] == d.post.atlas_margin_mm > d.post.atlas_margin_front_mm
    assert d.atlas_protection(atlas, missing_back, front)[1] == d.post.atlas_margin_front_mm
    assert d.atlas_front_margin(torch.zeros_like(atlas), agreeing) == d.post.atlas_margin_front_mm  # no atlas brain
    # a head cut short (at the mouth) registers its frontal pole less surely: where the atlas alone
    # protects it there, the wider margin if asked for; where the network agrees, the narrow one
    assert d.atlas_protection(atlas, missing_front, front, cut_short=True)[1] == d.post.atlas_margin_mm  # off by default
    monkeypatch.setattr(d, "post", dataclasses.replace(d.post, atlas_margin_cut_mm=8.0))
    region, margin = d.atlas_protection(atlas, missing_front, front, cut_short=True)
    assert margin == 8.0 > d.post.atlas_margin_mm
    assert torch.equal(region, grow(atlas & front, margin, d.spacing) | grow(atlas & ~front, d.post.atlas_margin_mm, d.spacing))
    assert bool((region & ~d.atlas_protection(atlas, missing_front, front)[0]).any())
    assert d.atlas_protection(atlas, agreeing, front, cut_short=True)[1] == d.post.atlas_margin_front_mm


def test_atlas_margin_is_narrow_only_in_front_over_the_face(defacer, monkeypatch):
    """In front of MNI y = atlas_front_y_mm the atlas brain is protected by atlas_margin_front_mm,
    behind it (the temporal poles) by the full atlas_margin_mm: a voxel 5.5 mm from the atlas brain
    may go in front, not behind."""
    import deface.atlas as atlas_mod
    from deface.postprocessing import CanonicalMasks

    d = defacer
    assert d.post.atlas_margin_front_mm < 5.5 < d.post.atlas_margin_mm
    shape = (8, 40, 8)
    grid = Grid(shape, np.diag([1.0, 1.0, 1.0, 1.0]))  # 1 mm voxels: voxel y index = MNI y with this registration
    canon = CanonicalInput(torch.zeros((1, *shape)), grid, torch.ones(shape, dtype=torch.bool))
    registration = Registration(np.eye(4), "ok", 0.0)
    brain = torch.zeros(shape, dtype=torch.bool)
    y0 = int(d.post.atlas_front_y_mm)
    brain[:, y0 + 6, :] = True  # a slab in front of y0 ...
    brain[:, y0 - 12, :] = True  # ... and one behind it
    monkeypatch.setattr(atlas_mod, "brain_on_grid", lambda *a, **k: brain)
    everything = torch.ones(shape, dtype=torch.bool)
    monkeypatch.setattr(inference, "canonical_masks", lambda *a, **k: CanonicalMasks(
        everything.clone(), grow(brain, 1.0, 1.0), 100.0, True))  # the network's brain + margin covers the atlas brain
    monkeypatch.setattr(d, "atlas", object())  # the phantom fixture has no atlas: its brain is the slabs above
    monkeypatch.setattr(d.post, "atlas", True)
    monkeypatch.setattr(d.post, "atlas_face_margin_mm", 1000.0)
    monkeypatch.setattr(d.post, "atlas_complete", False)
    monkeypatch.setattr(d, "spacing", 1.0)
    protected = {}
    real_to_native = inference.to_native

    def spy(masks, canonical, native):
        protected["canonical"] = masks.protect.clone()
        return real_to_native(masks, canonical, native)

    monkeypatch.setattr(inference, "to_native", spy)
    volume = io.from_image(nib.Nifti1Image(np.ones(shape, np.float32), grid.affine))
    result = d.apply(volume, canon, torch.zeros((4, *shape)), registration)
    assert result.stats["atlas_margin_front_mm"] == d.post.atlas_margin_front_mm
    column = protected["canonical"][4, :, 4]
    assert bool(column[y0 + 6 - 5]) and not bool(column[y0 + 6 - 6])  # in front: 5 mm kept, 6 mm away goes
    assert bool(column[y0 - 12 + 6]) and not bool(column[y0 - 12 + 7])  # behind: 6 mm kept


def test_a_face_far_from_the_brain_is_no_skull_stripped_image():
    """Little tissue beyond the brain (a field of view cut at the mouth) passed as skull-stripped
    and kept its face; a face lying far beyond the brain says it is a head. Face called near the
    brain (frontal lobe, as a network may call it in a skull-stripped image) does not, nor does face
    called behind the brain's centre."""
    from deface.postprocessing import PostprocessConfig, looks_brain_only

    cfg, spacing = PostprocessConfig(), 2.0
    mm = (np.indices((80, 84, 76)).transpose(1, 2, 3, 0) - np.array([40, 38, 38])) * spacing
    r = np.linalg.norm(mm, axis=-1)
    brain = torch.from_numpy(r <= 45.0)
    tissue = r <= 49.0  # the brain and a thin rim of CSF
    nose_and_cheeks = (mm[..., 1] > 61) & (mm[..., 1] <= 81) & (np.abs(mm[..., 0]) <= 35) & (np.abs(mm[..., 2]) <= 25)
    frontal = tissue & (mm[..., 1] > 30)
    assert looks_brain_only(tissue | nose_and_cheeks, brain, spacing, cfg)  # by the tissue rule alone
    assert not looks_brain_only(tissue | nose_and_cheeks, brain, spacing, cfg, nose_and_cheeks)
    assert looks_brain_only(tissue, brain & ~torch.from_numpy(frontal), spacing, cfg, frontal)
    # "face" as far behind the brain (a cerebellum the network missed) is no face: still brain-only
    behind = (mm[..., 1] < -61) & (mm[..., 1] >= -81) & (np.abs(mm[..., 0]) <= 35) & (np.abs(mm[..., 2]) <= 25)
    assert looks_brain_only(tissue | behind, brain, spacing, cfg, behind)


def test_more_than_100_ml_beyond_the_brain_is_not_judged_skull_stripped_by_the_network_alone():
    """A head cut at the mouth whose scalp the network calls brain (the s22 T1 made T2-like: 170 mL
    of tissue beyond 8 mm of that "brain", 8.5 %) was taken for skull-stripped and kept its whole
    face; such an image is left to the registration's check now (``brain_only_ml`` 100 mL; the
    skull-stripped brains of the validation people reach 88 mL but for two, which the registration
    then leaves whole)."""
    from dataclasses import replace as with_

    from deface.postprocessing import PostprocessConfig, brain_only_excess_ml, looks_brain_only

    cfg, spacing = PostprocessConfig(), 2.0
    mm = (np.indices((80, 84, 76)).transpose(1, 2, 3, 0) - np.array([40, 38, 30])) * spacing
    r = np.linalg.norm(mm, axis=-1)
    brain = torch.from_numpy(r <= 55.0)
    tissue = r <= 59.0
    scalp = (r >= 68.0) & (r <= 73.0) & (mm[..., 2] > 0)  # over the top of the head
    beyond_ml = float(scalp.sum()) * spacing**3 / 1000.0
    assert 100 < beyond_ml < 400 and beyond_ml / float((tissue | scalp).sum() * spacing**3 / 1000) < cfg.brain_only_fraction
    assert not looks_brain_only(tissue | scalp, brain, spacing, cfg)
    assert looks_brain_only(tissue | scalp, brain, spacing, with_(cfg, brain_only_ml=400.0))  # the old limit
    assert looks_brain_only(tissue, brain, spacing, cfg)  # the stripped brain alone still is
    # one look serves both limits: the mL beyond, or infinity from the caller's largest limit on
    excess = brain_only_excess_ml(tissue | scalp, brain, spacing, cfg, stop_ml=400.0)
    assert 100 < excess <= beyond_ml  # (the margin's cube reaches a little of the scalp)
    assert brain_only_excess_ml(tissue | scalp, brain, spacing, cfg, stop_ml=excess) == float("inf")
