"""Evaluation helpers: metrics on known masks, the 48 axis orders keep world space."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from deface import BRAIN, FACE
from deface.evaluation import (ACQUISITIONS, CONTRASTS, TILTS, acquisition_variant, axis_codes, contrast_variant, dice,
                               hd95, near_skin, reorient, score_head, undo_reorient)
from tests.conftest import make_phantom, phantom_truth, world_points


def test_dice_and_hd95_on_known_masks():
    a = np.zeros((20, 20, 20), bool)
    a[5:10, 5:10, 5:10] = True
    b = np.roll(a, 2, axis=0)
    assert dice(a, a) == 1.0 and dice(a, b) == pytest.approx(0.6)
    assert hd95(a, b, np.array([1.5, 1.0, 1.0])) == pytest.approx(3.0)
    assert np.isnan(dice(np.zeros_like(a), np.zeros_like(a)))


def test_48_axis_orders_are_the_same_head_in_world_space():
    img = make_phantom(shape=(10, 12, 14))
    data = np.asanyarray(img.dataobj)
    codes = set()
    for perm, flips in axis_codes():
        moved, aff = reorient(data, img.affine, perm, flips)
        codes.add(nib.aff2axcodes(aff))
        idx = np.array([3, 5, 7])
        world = img.affine[:3, :3] @ idx + img.affine[:3, 3]
        new_idx = np.round(np.linalg.inv(aff) @ np.append(world, 1))[:3].astype(int)
        assert moved[tuple(new_idx)] == data[tuple(idx)]
        assert np.array_equal(undo_reorient(moved, perm, flips), data)
    assert len(codes) == 48


@pytest.mark.parametrize("kind", CONTRASTS)
def test_contrast_variants_keep_air_dark(kind):
    img = make_phantom()
    data = np.asanyarray(img.dataobj).astype(np.float32)
    labels = phantom_truth(world_points(img.shape, img.affine))
    out = contrast_variant(data, labels, kind)
    assert out.shape == data.shape and out.dtype == np.float32
    assert out[labels == BRAIN].min() > 0
    if kind == "stored":  # the values as given, the bright tail not clipped
        assert np.array_equal(out, data)
    elif kind == "unilike":  # the air is noise over the whole range, the head as in the T1
        assert out[data == 0].std() > 0.3 and np.allclose(out[labels > 0], contrast_variant(data, labels, "original")[labels > 0])
    elif kind == "noisy":  # a Rician noise floor (mean sigma * sqrt(pi / 2)) everywhere, the head's level kept
        sigma = 0.06
        assert abs(out[data == 0].mean() - sigma * np.sqrt(np.pi / 2)) < 0.005
        plain = contrast_variant(data, labels, "original")
        assert abs(np.median(out[labels == BRAIN] - plain[labels == BRAIN])) < 0.01
    else:
        assert out[data == 0].max() == 0


def test_score_head_counts_brain_voxels_and_recall(defacer):
    img = make_phantom()
    labels = phantom_truth(world_points(img.shape, img.affine))
    score, _ = score_head(defacer, "phantom", img, labels)
    assert score.brain_changed == 0  # the random network is kept off the brain by the margin
    assert 0.0 <= score.recall_face <= 1.0 and score.seconds > 0
    assert (labels == FACE).any()


@pytest.mark.parametrize("kind", ACQUISITIONS)
def test_acquisition_variants_keep_labels_on_the_anatomy(kind):
    """Every re-acquired head keeps its reference labels where the anatomy is, in world space."""
    img = make_phantom(shape=(80, 100, 90), zooms=(2.0, 2.0, 2.0), angle_deg=20.0)
    data = np.asanyarray(img.dataobj).astype(np.float32)
    labels = phantom_truth(world_points(img.shape, img.affine))
    out, out_labels, aff = acquisition_variant(data, labels, img.affine, kind)
    assert out.shape == out_labels.shape and out.dtype == np.float32
    world = aff
    if kind in TILTS:  # the head itself moved in world space: undo that rotation to find the truth
        rotation = aff[:3, :3] @ np.linalg.inv(img.affine[:3, :3])
        assert np.allclose(rotation @ rotation.T, np.eye(3)) and not np.allclose(rotation, np.eye(3))
        world = np.linalg.inv(aff @ np.linalg.inv(img.affine)) @ aff
    truth = phantom_truth(world_points(out.shape, world))
    if kind == "brain_only":  # nothing but the brain is left, in the image and in the labels
        truth = np.where(truth == BRAIN, truth, 0)
    if kind == "brain_only_loose":  # the brain and what lies within LOOSE_STRIP_MM of it
        truth = np.where(out_labels > 0, truth, 0)
    # labels follow the image's own grid (thick slices: within half a slice of the slab centre)
    assert (out_labels == truth).mean() > (0.97 if kind.startswith("thick") or kind == "coarse_3mm" else 0.999)
    face_before = (labels == FACE).sum() * np.prod(np.abs(np.linalg.eigvals(img.affine[:3, :3])))
    face_after = (out_labels == FACE).sum() * np.prod(np.abs(np.linalg.eigvals(aff[:3, :3])))
    if kind == "crop_mouth":
        assert 0.2 * face_before < face_after < 0.8 * face_before  # the cut goes through the face
    elif kind == "crop_nose":
        assert 0.5 * face_before < face_after < 0.99 * face_before
    elif kind == "brain_only":
        assert out[labels != BRAIN].max() == 0 and np.array_equal(out[labels == BRAIN], data[labels == BRAIN])
        for contrast in ("t2like", "pdlike", "flairlike"):  # still skull-stripped in any contrast
            assert contrast_variant(out, out_labels, contrast)[labels != BRAIN].max() == 0
    elif kind == "brain_only_loose":
        from scipy import ndimage as ndi

        from deface.evaluation import LOOSE_STRIP_MM

        brain = labels == BRAIN
        near = ndi.distance_transform_edt(~brain, sampling=(2.0, 2.0, 2.0)) <= LOOSE_STRIP_MM
        assert np.array_equal(out, np.where(near, data, 0)) and np.array_equal(out_labels > 0, near & (labels > 0))
        assert (near & ~brain & (data > 0)).any()  # more than the brain is left
    else:
        assert face_after == pytest.approx(face_before, rel=0.1)
    if kind.startswith("thick") or kind == "coarse_3mm":
        assert np.prod(out.shape) < np.prod(data.shape)


def test_near_skin_is_a_shell():
    tissue = np.zeros((40, 40, 40), bool)
    tissue[5:35, 5:35, 5:35] = True
    shell = near_skin(tissue, np.array([1.0, 1.0, 1.0]), 4.0)
    assert shell[5, 20, 20] and shell[8, 20, 20] and not shell[20, 20, 20] and not shell[0, 0, 0]


def test_brain_gap_is_the_distance_from_the_changes_to_the_brain():
    from deface.evaluation import brain_gap_mm

    brain = np.zeros((30, 20, 10), bool)
    brain[5:10] = True
    changed = np.zeros_like(brain)
    assert np.isnan(brain_gap_mm(changed, brain, np.array([2.0, 1.0, 1.0])))
    changed[16, 3, 4] = True  # 7 voxels of 2 mm beyond the brain's last slab (x = 9)
    assert brain_gap_mm(changed, brain, np.array([2.0, 1.0, 1.0])) == pytest.approx(14.0)
    assert brain_gap_mm(changed, brain, np.array([2.0, 1.0, 1.0]), cap_mm=10.0) == 10.0
    changed[9, 0, 0] = True  # a brain voxel changed
    assert brain_gap_mm(changed, brain, np.array([2.0, 1.0, 1.0])) == 0.0


def test_composed_acquisitions_apply_their_steps_in_order_and_regrid_keeps_the_anatomy():
    """``a+b`` is ``b`` of ``a``; ``regrid`` stores the head on a grid along the world axes at its
    own voxel sizes, its labels still where the anatomy is, and then a cut runs across the world."""
    from deface.preprocessing import Grid, fov_mask

    img = make_phantom(shape=(80, 100, 90), zooms=(2.0, 2.0, 2.0), angle_deg=20.0)
    data = np.asanyarray(img.dataobj).astype(np.float32)
    labels = phantom_truth(world_points(img.shape, img.affine))
    tilted = acquisition_variant(data, labels, img.affine, "tilted")
    for composed, stepwise in zip(acquisition_variant(data, labels, img.affine, "tilted+crop_mouth"),
                                  acquisition_variant(*tilted, "crop_mouth")):
        np.testing.assert_array_equal(composed, stepwise)
    out, out_labels, aff = acquisition_variant(data, labels, img.affine, "tilted+regrid")
    np.testing.assert_allclose(aff[:3, :3], np.diag([2.0, 2.0, 2.0]))
    inside = fov_mask(tilted[2], data.shape, Grid(out.shape, aff)).numpy()
    assert out[~inside].max() == 0 and (out_labels[~inside] == 0).all()
    world = np.linalg.inv(tilted[2] @ np.linalg.inv(img.affine)) @ aff  # the tilt undone: the phantom's frame
    truth = phantom_truth(world_points(out.shape, world))
    assert (out_labels[inside] == truth[inside]).mean() > 0.97
    _, cut_labels, cut_aff = acquisition_variant(data, labels, img.affine, "tilted+regrid+crop_mouth")
    np.testing.assert_allclose(cut_aff[:3, :3], aff[:3, :3])
    assert 0.1 * (out_labels == FACE).sum() < (cut_labels == FACE).sum() < 0.9 * (out_labels == FACE).sum()


def _script(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_downstream_anchors_move_the_head_and_renoise_it_without_changing_it_otherwise():
    downstream = _script("downstream")
    rng = np.random.default_rng(1)
    data = rng.uniform(0, 1, (7, 9, 6)).astype(np.float32)
    moved = downstream.shifted(data)
    assert moved[1, 2, 3] == data[0, 1, 2] and not moved[0].any()
    back = downstream.shifted(moved, back=True)
    np.testing.assert_array_equal(back[:-1, :-1, :-1], data[:-1, :-1, :-1])  # the same values, only moved
    noisy = downstream.renoised(data)
    assert noisy.dtype == data.dtype and noisy.shape == data.shape
    sigma = downstream.NOISE_FRACTION * np.percentile(data, 99)
    assert 0.3 * sigma < np.std(noisy - data) < 2 * sigma  # a new noise realisation at about that level
    np.testing.assert_array_equal(downstream.renoised(data), noisy)  # seeded: the table is reproducible


def test_a_variant_spec_builds_the_image_the_evaluation_builds(tmp_path):
    """``scripts/evaluate.py``'s ``variant`` (shared by the probing scripts): NAME[:ACQUISITION[:CONTRAST]]
    of the cache is the acquisition first, then the contrast, and an independent brain mask already
    in the cache follows the same geometry (no extractor runs)."""
    evaluate = _script("evaluate")
    img = make_phantom()
    labels = phantom_truth(world_points(img.shape, img.affine)).astype(np.uint8)
    data = np.asarray(img.dataobj, np.float32)
    stored = np.round(np.clip(data / data.max(), 0, 1) * 255).astype(np.uint8)
    np.savez(tmp_path / "real_x.npz", image=stored, labels=labels, affine=img.affine)
    (tmp_path / "independent").mkdir()
    brain = (labels == BRAIN).astype(np.uint8)
    nib.save(nib.Nifti1Image(brain, img.affine), str(tmp_path / "independent" / "real_x_fake.nii.gz"))

    cached, cached_labels, affine = evaluate.cache_head(tmp_path, "real_x")
    image, out_labels, out_affine, indep = evaluate.variant(tmp_path, "real_x:crop_mouth:t2like", ["fake"])
    expected, expected_labels, expected_affine = acquisition_variant(cached, cached_labels, affine, "crop_mouth")
    np.testing.assert_array_equal(image, contrast_variant(expected, expected_labels, "t2like"))
    np.testing.assert_array_equal(out_labels, expected_labels)
    np.testing.assert_allclose(out_affine, expected_affine)
    assert indep.shape == image.shape and indep.dtype == bool
    np.testing.assert_array_equal(indep, acquisition_variant(brain.astype(np.float32), cached_labels, affine,
                                                             "crop_mouth")[0] >= 0.5)
    plain, _, _, none = evaluate.variant(tmp_path, "real_x")  # both "original": rescaled, uncropped
    np.testing.assert_array_equal(plain, contrast_variant(cached, cached_labels, "original"))
    assert none is None
